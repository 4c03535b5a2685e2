"""Generated wrong-shaped JSON (a seeded corpus built here) against every reader of it: the
schema functions, pack's manifest reader, pack itself, inspect and the loader.

Properties: nothing ever crashes; a rejected document is named (sample key and member, or
manifest line) with the field that is wrong; what pack accepts the loader takes; inspect fails
exactly the samples the loader skips; the loader's counts add up.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from datapipes import schema, shards
from datapipes.clips import ClipSpec
from datapipes.face import FaceFrame, face_track_to_json
from datapipes.inspection import InspectOptions, inspect_shards
from datapipes.loader import build_clip_loader
from datapipes.pack import PackItem, PackOptions, items_from_manifest, pack
from datapipes.pose import keypoints_to_json
from datapipes.synthetic import synthetic_sample
from datapipes.validate import Rules
from tests.data.conftest import loader_config

FRAMES, SIZE = 6, 32
NOT_JSON = [b"", b"{", b"NaN", b'{"fps": NaN}', b"\xff\xfe\x00", b"[1, 2", b"{'a': 1}", b"[" * 100_000,
            b'{"a": 1} trailing', b"1e999999"]


# ----------------------------------------------------------------------------- the corpus


def random_value(rng: random.Random, depth: int = 0):
    """Any JSON value: scalars of every type (with edge cases), lists and objects."""
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 7, 10 ** 30, -(10 ** 20)])
    if choice == 3:
        return rng.choice([0.0, -2.5, 1e308, 3.25, 1e-300])
    if choice in (4, 5):
        return rng.choice(["", "human", "scene", "a.mp4", "x" * 300, "\u00e9\u0000", "5"])
    if choice == 6:
        return []
    if choice in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(1, 5))]
    return {rng.choice(["a", "height", "frames", "video", ""]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(1, 4))}


def _paths(value, prefix=()):
    """Every field path of a document (keys and list indices), capped per list."""
    yield prefix
    if isinstance(value, dict):
        for name, child in value.items():
            yield from _paths(child, prefix + (name,))
    elif isinstance(value, list):
        for index, child in list(enumerate(value))[:4] + list(enumerate(value))[-1:]:
            yield from _paths(child, prefix + (index,))


def _field(path) -> str:
    """``("frames", 3, "box")`` -> ``"frames[3].box"`` (the schema's notation)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def mutate(rng: random.Random, document) -> tuple[object, str]:
    """A wrong-shaped variant of ``document`` and the field path it changed ("" = the whole)."""
    document = json.loads(json.dumps(document))
    path = rng.choice([p for p in _paths(document)])
    if not path or rng.random() < 0.1:
        return (rng.choice(NOT_JSON) if rng.random() < 0.4 else random_value(rng)), ""
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    if rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = random_value(rng)
    return document, _field(path)


def _names(error: schema.SchemaError, where: str, field: str) -> bool:
    """The error names the document and a field on the mutated path (or the path's top field)."""
    if error.where != where or "\n" in str(error):
        return False
    if not field:
        return True
    top = field.split(".")[0].split("[")[0]
    return ((error.field != "" and field.startswith(error.field)) or error.field.startswith(field)
            or top in str(error))


def _face_document(rng: np.random.Generator, landmarks: int = 5) -> dict:
    faces = [None if t == 2 else FaceFrame((4.0, 5.0, 20.0, 24.0), rng.uniform(5, 20, (landmarks, 2)), 0.9)
             for t in range(FRAMES)]
    return face_track_to_json(faces, SIZE, SIZE, detector="test")


def _pose_document(rng: np.random.Generator) -> dict:
    keypoints = np.concatenate([rng.uniform(2, SIZE - 2, (FRAMES, 18, 2)), np.ones((FRAMES, 18, 1))], axis=2)
    return keypoints_to_json(keypoints, SIZE, SIZE)


def _meta(key: str = "clip") -> dict:
    return {"fps": 8.0, "num_frames": FRAMES, "height": SIZE, "width": SIZE, "kind": "human",
            "source": f"test:{key}", "license": "CC0-1.0"}


BASES = {
    "json": (lambda rng: _meta(), lambda doc, where: schema.sample_meta(doc, where[: -len(".json")])),
    "pose.json": (_pose_document, lambda doc, where: schema.pose_keypoints(doc, where, FRAMES)),
    "face.json": (_face_document, lambda doc, where: schema.face_track(doc, where, FRAMES)),
    "manifest": (lambda rng: {"video": "a.mp4", "kind": "human", "keypoints": "a.pose.json", "key": "a",
                              "license": "CC0-1.0"},
                 lambda doc, where: schema.manifest_entry(doc if isinstance(doc, bytes) else json.dumps(doc), where)),
}


# ----------------------------------------------------------------------------- the schema itself


@pytest.mark.parametrize("member", list(BASES))
def test_every_wrong_shape_is_a_schema_error_naming_the_document_and_field(member):
    make, check = BASES[member]
    rng, np_rng = random.Random(f"schema-{member}"), np.random.default_rng(0)
    base = make(np_rng)
    where = "list.jsonl:7" if member == "manifest" else f"clip.{member}"
    assert check(base, where) is not None  # the unmutated document is valid
    rejected = 0
    for _ in range(400):
        document, field = mutate(rng, base)  # bytes (not JSON) go to the schema as they are
        try:
            parsed = check(document, where)
        except schema.SchemaError as error:
            rejected += 1
            assert _names(error, where, field), (field, str(error))
            continue
        if member in ("pose.json", "face.json"):  # accepted: one entry per frame, finite numbers
            frames = parsed.keypoints if member == "pose.json" else parsed.faces
            assert len(frames) == FRAMES
    assert rejected > 200  # the corpus is mostly wrong


def test_missing_height_or_width_is_rejected_by_the_one_rule():
    rng = np.random.default_rng(0)
    for member, document, check in (("pose.json", _pose_document(rng), schema.pose_keypoints),
                                     ("face.json", _face_document(rng), schema.face_track)):
        for name in ("height", "width"):
            broken = {k: v for k, v in document.items() if k != name}
            with pytest.raises(schema.SchemaError, match=rf"clip\.{member}: {name}: missing"):
                check(broken, f"clip.{member}")
    document = _face_document(rng)
    with pytest.raises(schema.SchemaError, match=r"clip\.face\.json: frames\[1\]\.points"):
        schema.face_track(dict(document, frames=[document["frames"][0], {"box": [1, 2, 3, 4], "points": [[1, 2]] * 68}]),
                          "clip.face.json")
    for empty in (b"[]", b"null", [], None):
        with pytest.raises(schema.SchemaError, match="face track must be a JSON object"):
            schema.face_track(empty, "clip.face.json")


# ----------------------------------------------------------------------------- pack's manifest


def test_a_manifest_with_one_bad_line_is_an_error_naming_that_line(tmp_path):
    rng = random.Random("manifest")
    good = json.dumps({"video": "a.mp4", "kind": "scene", "license": "CC0-1.0"})
    manifest = tmp_path / "list.jsonl"
    errors = 0
    for trial in range(150):
        bad_line = rng.randrange(1, 4)
        document, _ = mutate(rng, json.loads(good))
        text = document if isinstance(document, bytes) else json.dumps(document).encode()
        text = text.replace(b"\n", b" ")
        lines = [good.encode()] * 3
        lines[bad_line - 1] = text
        manifest.write_bytes(b"\n".join(lines) + b"\n")
        try:
            items = items_from_manifest(str(manifest))
        except ValueError as error:
            errors += 1
            assert type(error) is schema.SchemaError or "lists no video" in str(error), repr(error)
            assert f"list.jsonl:{bad_line}:" in str(error), (text, str(error))
            continue
        assert len(items) in (2, 3) and all(isinstance(item.video, str) and item.video for item in items)
    assert errors > 75
    for line, field in ((b"5", ""), (b'{"video": 5}', "video"), (b'{"video": "a.mp4", "key": 123}', "key")):
        manifest.write_bytes(good.encode() + b"\n" + line + b"\n")
        with pytest.raises(schema.SchemaError, match=rf"list\.jsonl:2: {field}"):
            items_from_manifest(str(manifest))


# ----------------------------------------------------------------------------- pack -> loader


def _corpus_members(seed: int, count: int) -> list[tuple[str, str, object, str]]:
    """``count`` (key, member, document, mutated field) with one mutated JSON member each."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    members = ["pose.json", "face.json", "json"]
    out = []
    for index in range(count):
        member = members[index % 3]
        base = _meta(f"m{index}") if member == "json" else BASES[member][0](np_rng)
        document, field = mutate(rng, base)
        out.append((f"m{index:02d}", member, document, field))
    return out


def _bytes(document) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


def test_pack_rejects_wrong_shaped_members_by_name_and_the_loader_takes_what_pack_accepts(tmp_path):
    sample = synthetic_sample("human", 0, 7, FRAMES, SIZE, SIZE)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "clip.mp4").write_bytes(sample["mp4"])
    items = []
    for key, member, document, _ in _corpus_members(11, 18):
        if member == "json":
            continue  # pack writes the metadata itself
        pose = inputs / f"{key}.pose.json"
        pose.write_bytes(_bytes(document) if member == "pose.json" else sample["pose.json"])
        face = inputs / f"{key}.face.json"
        face.write_bytes(_bytes(document) if member == "face.json" else sample["face.json"])
        items.append((member, PackItem(video=str(inputs / "clip.mp4"), keypoints=str(pose), face=str(face), key=key)))
    # The one rule for pose.json / face.json without height or width: pack rejects them.
    (inputs / "good.pose.json").write_bytes(sample["pose.json"])
    for member, name in (("pose.json", "height"), ("face.json", "width")):
        document = {k: v for k, v in json.loads(sample[member]).items() if k != name}
        path = inputs / f"no-{name}.{member}"
        path.write_bytes(json.dumps(document).encode())
        companions = {"keypoints": str(path) if member == "pose.json" else str(inputs / "good.pose.json"),
                      "face": str(path) if member == "face.json" else None}
        items.append((member, PackItem(video=str(inputs / "clip.mp4"), key=f"no-{name}", **companions)))
    options = PackOptions(Rules(min_frames=1, min_height=16, min_width=16, verify="open"))
    summary = pack([item for _, item in items], str(tmp_path / "out"), options, workers=0)
    assert summary.accepted + summary.rejected == len(items)
    quarantine = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == summary.rejected > 0
    member_of = {item.key: member for member, item in items}
    for entry in quarantine:
        key = entry["input"]["key"]
        assert f"{key}.{member_of[key]}" in entry["reason"], entry
    reasons = {entry["input"]["key"]: entry["reason"] for entry in quarantine}
    assert "no-height.pose.json: height: missing" in reasons["no-height"]
    assert "no-width.face.json: width: missing" in reasons["no-width"]
    if summary.accepted:
        cfg = loader_config(str(tmp_path / "out"), resample=False, with_face=True, num_frames=2,
                            height=SIZE, width=SIZE, max_bad_fraction=0.0, bad_fraction_min_samples=1)
        loader = build_clip_loader(cfg, 0, 1)
        keys = [key for batch in loader for key in batch["__key__"]]
        assert len(keys) == summary.accepted and loader.stats()["bad_samples"] == 0


# ----------------------------------------------------------------------------- inspect == loader


def _write_mutated_shards(directory, seed: int) -> tuple[set, dict]:
    """Good human (pose.json only) and scene samples and 15 with one mutated JSON member;
    returns the good keys and {mutated key: member}."""
    good = [dict(synthetic_sample("human", i, seed, FRAMES, SIZE, SIZE)) for i in range(3)]
    good += [dict(synthetic_sample("scene", i, seed, FRAMES, SIZE, SIZE)) for i in range(3)]
    template = good[0]
    mutated = {}
    samples = []
    for key, member, document, _ in _corpus_members(seed, 15):
        sample = dict(template, __key__=key)
        sample[member] = _bytes(document)
        samples.append(sample)
        mutated[key] = member
    for sample in good + samples:
        sample.pop("pose.mp4", None)  # the loader then reads pose.json
    order = random.Random(seed).sample(good + samples, len(good) + len(samples))
    with shards.ShardSink(str(directory), "fuzz", max_count=5) as sink:
        for sample in order:
            sink.write(sample)
    return {s["__key__"] for s in good}, mutated


@pytest.mark.parametrize("seed", [3, 4])
def test_inspect_fails_exactly_what_the_loader_skips_and_counts_add_up(tmp_path, seed):
    good, mutated = _write_mutated_shards(tmp_path / "shards", seed)
    spec = ClipSpec(2, 1, ((1, 1),), with_face=True)
    report = inspect_shards(str(tmp_path / "shards"), InspectOptions(spec, verify="open"))
    failed = {key: reason for _, key, reason in report.failures}
    assert report.samples == len(good) + len(mutated)

    cfg = loader_config(str(tmp_path / "shards"), resample=False, with_face=True, num_frames=2, frame_stride=1,
                        height=SIZE, width=SIZE, max_bad_fraction=1.0, bad_fraction_min_samples=1)
    loader = build_clip_loader(cfg, 0, 1)
    keys = [key for batch in loader for key in batch["__key__"]]
    stats = loader.stats()
    bad = dict(loader.recent_bad)
    assert stats["samples_drawn"] == len(keys) + stats["bad_samples"] == report.samples
    assert stats["bad_samples"] == len(bad) and set(bad) == set(failed)
    assert good <= set(keys)
    for key, reason in bad.items():
        member = mutated[key]
        assert f"{key}.{member}" in reason, (key, reason)   # names the sample and its member
        assert failed[key] == reason                        # inspect says what the loader says
    assert len(keys) + len(bad) == len(good) + len(mutated)


def test_wrong_shaped_metadata_never_stops_training_with_fusion_on(tmp_path):
    """Resampled, with the shipped scene_probability: bad samples are skipped and counted."""
    good, mutated = _write_mutated_shards(tmp_path / "shards", 5)
    cfg = loader_config(str(tmp_path / "shards"), with_face=True, num_frames=2, frame_stride=1, height=SIZE,
                        width=SIZE, scene_probability=0.25, batches_per_epoch=6, max_bad_fraction=1.0,
                        bad_fraction_min_samples=1)
    loader = build_clip_loader(cfg, 0, 1)
    keys = [key for batch in loader for key in batch["__key__"]]
    assert len(keys) == 12 and set(keys) <= good | set(mutated)
    stats = loader.stats()
    assert stats["samples_drawn"] == len(keys) + stats["bad_samples"]
    assert all(key in mutated for key, _ in loader.recent_bad)
