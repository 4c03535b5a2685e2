"""The dataset index of a partitioned pack: ``DIR/index.json``, written once every part is done.

It lists the shards (relative to the index, so a moved dataset stays readable), totals and
histograms, face and person coverage of the human clips, the quarantine with reasons, each
packed clip's facts, and every curation decision with its scores (:mod:`datapipes.curate`), so
thresholds can be retuned from the index without decoding again. The loader and ``inspect``
take the index wherever they take a shard spec (``datapipes.shards.expand_shard_urls``).
"""
from __future__ import annotations

import json
import os
from collections import Counter

from datapipes import shards
from datapipes.atomic import write_bytes_atomic
from datapipes.face import face_track_from_json
from datapipes.pose import keypoints_from_json, person_frames

INDEX = "index.json"
FORMAT = "xdyna-index-v1"


def clip_records(urls: list[str]) -> list[dict]:
    """Facts of every sample of ``urls`` from its JSON members (no decoding): key, shard, kind,
    source, frames, fps, size, seconds, and for human clips the frames with a face (``face.json``)
    and with a person (``pose.json``); ``None`` where that member is absent."""
    reader = shards.TarSampleReader(urls)
    records = []
    try:
        for number, url in enumerate(urls):
            for sample in reader.iter_shard(number):
                meta = sample.meta()
                record = {"key": sample.key, "shard": url, "kind": meta["kind"], "source": meta["source"],
                          "license": meta["license"], "frames": meta["num_frames"], "fps": meta["fps"],
                          "height": meta["height"], "width": meta["width"],
                          "seconds": meta["num_frames"] / meta["fps"], "face_frames": None, "person_frames": None,
                          "pose": next((m for m in (shards.POSE_KEYPOINTS, shards.POSE_VIDEO) if m in sample.members),
                                       None)}
                if shards.FACE in sample.members:
                    track = face_track_from_json(sample.members[shards.FACE], f"{sample.key}.{shards.FACE}")
                    record["face_frames"] = sum(face is not None for face in track)
                if shards.POSE_KEYPOINTS in sample.members:
                    keypoints = keypoints_from_json(sample.members[shards.POSE_KEYPOINTS],
                                                    f"{sample.key}.{shards.POSE_KEYPOINTS}")
                    record["person_frames"] = int(person_frames(keypoints).sum())
                records.append(record)
    finally:
        reader.close()
    return records


def _coverage(clips: list[dict], field: str) -> dict:
    known = [clip[field] / clip["frames"] for clip in clips if clip["kind"] == "human" and clip[field] is not None]
    return {"clips": len(known), "mean": sum(known) / len(known) if known else None,
            "clips_without": sum(value == 0 for value in known)}


def build_index(out_dir: str) -> dict:
    """Gather every part's record of the pack in ``out_dir`` into ``out_dir/index.json``;
    ``ValueError`` naming the unfinished parts when any is missing."""
    from datapipes.parts import PLAN, finished_parts, read_record

    plan_path = os.path.join(out_dir, PLAN)
    if not os.path.isfile(plan_path):
        raise FileNotFoundError(f"{out_dir!r} holds no partitioned pack ({PLAN} missing): "
                                f"pack it with --parts (a single --parts 1 is fine)")
    with open(plan_path) as handle:
        plan = json.load(handle)
    done = set(finished_parts(out_dir, plan))
    missing = [part for part in range(plan["parts"]) if part not in done]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ValueError(f"{out_dir!r}: {len(missing)} of {plan['parts']} part(s) not finished: {shown}; "
                         f"rerun the pack (finished parts are skipped)")
    records = [read_record(out_dir, part) for part in range(plan["parts"])]
    clips = [clip for record in records for clip in record["clips"]]
    quarantine = [entry for record in records for entry in record["quarantined"]]
    curation = [decision for record in records for decision in record["curation"]]
    carried = {}
    if plan.get("source_index"):  # an encoded set keeps the curation of the index it encoded
        with open(plan["source_index"]) as handle:
            source = json.load(handle)
        curation = source.get("curation", [])
        carried = {key: source[key] for key in ("not_packed", "retuned_from") if key in source}
        carried["encoded_from"] = plan["source_index"]
    keys = Counter(clip["key"] for clip in clips)
    duplicates = sorted(key for key, count in keys.items() if count > 1)
    if duplicates:  # cannot happen with one plan (keys are deduplicated before the split): a real fault
        raise ValueError(f"{out_dir!r}: keys packed by more than one part: {duplicates[:10]}")
    index = summarise(clips, quarantine, curation, [name for record in records for name in record["shards"]],
                      fingerprint=plan["fingerprint"], parts=plan["parts"], inputs=plan["inputs"],
                      # an encoded shard set (datapipes.latents): what its latents fixed (resolution, crop, VAE)
                      **({"latents": plan["latents"]} if "latents" in plan else {}), **carried,
                      timings={"total_s": sum(r["timings"]["total_s"] for r in records),
                               "per_part_s": [r["timings"]["total_s"] for r in records]})
    write_bytes_atomic(os.path.join(out_dir, INDEX), json.dumps(index, indent=1, allow_nan=False).encode())
    return index


def summarise(clips: list[dict], quarantine: list[dict], curation: list[dict], shard_names: list[str],
              **extra) -> dict:
    """The index document: ``extra`` (fingerprint, parts, timings ...) and the totals of ``clips``."""
    return {
        "format": FORMAT, **extra, "shards": shard_names,
        "samples": len(clips), "quarantined": len(quarantine),
        "frames": sum(clip["frames"] for clip in clips),
        "seconds": sum(clip["seconds"] for clip in clips),
        "kinds": dict(sorted(Counter(clip["kind"] for clip in clips).items())),
        "sources": dict(sorted(Counter(clip["source"] for clip in clips).items())),
        "frames_per_kind": {kind: sum(c["frames"] for c in clips if c["kind"] == kind)
                            for kind in sorted({c["kind"] for c in clips})},
        "seconds_per_kind": {kind: sum(c["seconds"] for c in clips if c["kind"] == kind)
                             for kind in sorted({c["kind"] for c in clips})},
        "resolutions": dict(sorted(Counter(f"{c['height']}x{c['width']}" for c in clips).items())),
        "face_coverage": _coverage(clips, "face_frames"),
        "person_coverage": _coverage(clips, "person_frames"),
        "curation_decisions": dict(sorted(Counter(d["decision"] for d in curation).items())),
        "quarantine": quarantine, "clips": clips, "curation": curation,
    }


def retune(index_path: str, out_dir: str, min_motion: float | None = None, max_people: int | None = None,
           shard_size: int = 1000, prefix: str = "shard") -> dict:
    """Apply stricter curation thresholds to a packed dataset without decoding: every kept clip is
    re-decided from its recorded scores (``min_motion`` for scene clips, ``max_people`` for human
    clips; ``None`` keeps a rule as it was), the samples still kept are copied byte for byte into
    new shards in ``out_dir``, and a new index is written there. A clip dropped before cannot come
    back (it was never packed): those that a looser threshold would keep are counted in
    ``not_packed`` (rerun ``pack --shots`` to get them)."""
    from datapipes.pack import _PublishingSink

    with open(index_path) as handle:
        old = json.load(handle)
    urls = shards_of_index(index_path)
    curation, dropped, not_packed = [], set(), []
    for decision in old["curation"]:
        decision = dict(decision)
        low = (decision["kind"] == "scene" and min_motion is not None and decision["motion"] is not None
               and decision["motion"] < min_motion)
        crowded = (decision["kind"] == "human" and max_people is not None and decision["people"] is not None
                   and decision["people"] > max_people)
        if decision["decision"] == "keep" and (low or crowded):
            decision.update(decision="drop", reason=(f"scene clip motion {decision['motion']:.3f} < --min-motion "
                                                     f"{min_motion:g} (retuned)") if low else
                            f"{decision['people']} people > --max-people {max_people} (retuned)")
            dropped.add(decision["key"])
        elif decision["decision"] == "drop" and (
                (decision["kind"] == "scene" and min_motion is not None and decision["motion"] is not None
                 and decision["motion"] >= min_motion)
                or (decision["kind"] == "human" and max_people is not None and decision["people"] is not None
                    and decision["people"] <= max_people)):
            not_packed.append(decision["key"])  # passes the new rule, but its frames were never packed
        curation.append(decision)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is not empty; retune writes a new dataset into an empty folder")
    os.makedirs(out_dir, exist_ok=True)
    sink = _PublishingSink(out_dir, prefix, shard_size, float("inf"))
    rewrite_samples(urls, sink, lambda sample: None if sample.key in dropped
                    else {"__key__": sample.key, **sample.members})
    clips = clip_records(sink.urls)
    for clip in clips:
        clip["shard"] = os.path.basename(clip["shard"])
    index = summarise(clips, old["quarantine"], curation, [os.path.basename(url) for url in sink.urls],
                      retuned_from=os.path.abspath(index_path), not_packed=not_packed,
                      thresholds={"min_motion": min_motion, "max_people": max_people})
    write_bytes_atomic(os.path.join(out_dir, INDEX), json.dumps(index, indent=1, allow_nan=False).encode())
    return index


def rewrite_samples(urls: list[str], sink, transform, after_shard=None) -> None:
    """Every sample of ``urls`` through ``transform`` (a sample dict to write, or ``None`` to leave
    it out) into ``sink`` (a ``datapipes.pack._PublishingSink``), closed at the end; on any error
    its unfinished shard is removed. ``after_shard(number)`` follows each source shard."""
    reader = shards.TarSampleReader(urls)
    finished = False
    try:
        for number in range(len(urls)):
            for sample in reader.iter_shard(number):
                written = transform(sample)
                if written is not None:
                    sink.write(written)
            if after_shard is not None:
                after_shard(number)
        sink.close()
        finished = True
    finally:
        reader.close()
        if not finished:
            sink.abort()


def shards_of_index(path: str) -> list[str]:
    """The shard paths an index lists, resolved against the index's folder."""
    with open(path) as handle:
        try:
            index = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset index {path!r} is not JSON: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{path!r} is no dataset index (want a JSON object with format {FORMAT!r} and a shard list)")
    base = os.path.dirname(os.path.abspath(path))
    return [os.path.join(base, name) for name in index["shards"]]
