"""Cached VAE latents beside a sample's frames: the members, their record, the encode pass over a
shard set (distributed as ``pack --parts``) and the loader's checks. No model here: the encoder is
a callable handed in (``xdyna.latents`` builds it from the model's VAE).

A sample of an encoded shard set keeps every member it had and gains two:

* ``<key>.latents.npy``: ``float16 (2, T, C, h, w)``, the VAE posterior's mean (``[0]``) and
  standard deviation (``[1]``) of *every* frame of the video, unscaled (before the VAE's
  ``scaling_factor``). Every frame, because the clip window and the reference frame are drawn at
  load time from the whole video: any draw finds its latents. Mean and std rather than one stored
  sample, so training still draws a fresh posterior sample per step, exactly as
  ``posterior.sample()`` on the VAE's output would (same generator, same shape, same draw).
* ``<key>.latents.json``: what was fixed at encode time (:func:`record`): the resolution, the
  crop (always ``center``: a random crop cannot survive caching), the aspect-ratio buckets, the
  source frame size, the array's shape and the VAE it came from.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from datapipes import schema, shards

LATENTS = "latents.npy"
LATENTS_META = "latents.json"
FORMAT = "xdyna-latents-v1"
CROP = "center"  # the only crop that survives caching: the same for every epoch
PLAN_FORMAT = "xdyna-encode-plan-v1"

# frames uint8 (T, 3, H, W) -> (mean, std), each (T, C, h, w)
Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LatentsError(ValueError):
    """A sample's cached latents are missing or do not fit the loader's clip."""


def fixed_geometry(source: tuple[int, int], buckets: Sequence[Sequence[int]]):
    """The resize and centre crop of a ``source`` (height, width) frame at encode time: the
    nearest bucket by aspect ratio, as the loader picks it, cropped in the middle."""
    from datapipes.clips import ResizeCrop, choose_bucket

    buckets = [tuple(int(v) for v in b) for b in buckets]
    return ResizeCrop.plan(tuple(source), buckets[choose_bucket(*source, buckets)], CROP, rng=None)


def record(buckets: Sequence[Sequence[int]], source: tuple[int, int], target: tuple[int, int],
           shape: tuple[int, ...], vae: dict) -> dict:
    return {"format": FORMAT, "crop": CROP, "buckets": [list(map(int, b)) for b in buckets],
            "height": int(target[0]), "width": int(target[1]), "source": [int(source[0]), int(source[1])],
            "shape": [int(v) for v in shape], "dtype": "float16", "stored": "posterior mean, std (unscaled)",
            "vae": vae}


def to_bytes(mean: torch.Tensor, std: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, torch.stack([mean, std]).to(torch.float16).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def from_members(key: str, members: dict[str, bytes], frames: int) -> tuple[np.ndarray, dict]:
    """``(float16 (2, T, C, h, w), record)`` of a sample; :class:`LatentsError` naming the key when
    absent or malformed."""
    if LATENTS not in members or LATENTS_META not in members:
        raise LatentsError(f"{key}: no cached latents ({key}.{LATENTS}); run xdyna-data encode on these shards")
    try:
        meta = json.loads(members[LATENTS_META])
        array = np.load(io.BytesIO(members[LATENTS]), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise LatentsError(f"{key}: unreadable cached latents: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LatentsError(f"{key}.{LATENTS_META}: not a {FORMAT} record")
    if array.dtype != np.float16 or array.ndim != 5 or array.shape[0] != 2 or array.shape[1] != frames:
        raise LatentsError(f"{key}.{LATENTS}: want float16 (2, {frames}, C, h, w), got {array.dtype} {array.shape}")
    return array, meta


def check_config(meta: dict, buckets: Sequence[Sequence[int]], crop: str, where: str) -> None:
    """One line when a loader asks for another resolution or crop than the cached one."""
    wanted = [list(map(int, b)) for b in buckets]
    if meta["buckets"] != wanted or crop != meta["crop"]:
        shown = lambda bs: ", ".join(f"{h}x{w}" for h, w in bs)  # noqa: E731
        raise LatentsError(f"data.latents: {where} were encoded at {shown(meta['buckets'])} with a {meta['crop']} "
                           f"crop, the config asks for {shown(wanted)} with a {crop} crop; set data.height/width "
                           f"(or data.buckets) and data.crop={meta['crop']} to match, or encode again")


def check_shard_set(urls: list[str], buckets: Sequence[Sequence[int]], crop: str, where: str) -> dict:
    """The latents record of a shard set's first sample, checked against the loader's clip: one
    :class:`LatentsError` line when the shards hold no latents or another resolution/crop."""
    reader = shards.TarSampleReader(urls)
    try:
        sample = next((s for number in range(len(urls)) for s in reader.iter_shard(number)), None)
    finally:
        reader.close()
    if sample is None:
        raise LatentsError(f"data.latents: {where} hold no samples")
    if LATENTS_META not in sample.members:
        raise LatentsError(f"data.latents is true but {where} hold no cached latents (sample {sample.key!r} has no "
                           f"{LATENTS}); run xdyna-data encode on them and point data.shards at its output")
    meta = json.loads(sample.members[LATENTS_META])
    check_config(meta, buckets, crop, where)
    return meta


# --------------------------------------------------------------------------- encode pass


@dataclass(frozen=True)
class EncodeSettings:
    parts: int
    buckets: tuple[tuple[int, int], ...]
    prefix: str = "shard"
    shard_size: int = 1000
    vae: dict | None = None  # what the VAE is (weights, scaling): recorded, part of the plan
    source_index: str | None = None  # the dataset index encoded, if one was given: its curation carries over

    def document(self) -> dict:
        return {"parts": self.parts, "prefix": self.prefix, "shard_size": self.shard_size,
                "latents": {"crop": CROP, "buckets": [list(b) for b in self.buckets], "vae": self.vae},
                **({"source_index": self.source_index} if self.source_index else {})}


def make_plan(urls: list[str], settings: EncodeSettings) -> dict:
    sources = [[os.path.abspath(url), os.path.getsize(url)] for url in urls]
    digest = hashlib.sha256(json.dumps([sources, settings.document()], sort_keys=True).encode()).hexdigest()
    return {"format": PLAN_FORMAT, "fingerprint": digest, "inputs": len(urls), "sources": sources,
            **settings.document()}


def encode_sample(sample: shards.RawSample, settings: EncodeSettings, encoder: Encoder) -> dict:
    """The sample's members plus its latents; ``ValueError`` (a reason) when it cannot be encoded."""
    from datapipes.video import open_video, read_frames

    meta = schema.sample_meta(sample.members.get(shards.META), sample.key)
    if shards.VIDEO not in sample.members:
        raise ValueError("no .mp4 member")
    video = open_video(sample.members[shards.VIDEO], sample.key)
    if len(video) != meta["num_frames"]:
        raise ValueError(f"metadata says {meta['num_frames']} frames, the video has {len(video)}")
    decoded = read_frames(video, np.arange(len(video)), sample.key, sample.members[shards.VIDEO])
    source = tuple(decoded.shape[1:3])
    geometry = fixed_geometry(source, settings.buckets)
    mean, std = encoder(geometry.frames(decoded))
    if mean.shape[0] != len(decoded) or mean.shape != std.shape:
        raise RuntimeError(f"the encoder returned {tuple(mean.shape)} / {tuple(std.shape)} for {len(decoded)} frames")
    document = record(settings.buckets, source, geometry.target, (2, *mean.shape), settings.vae)
    return {"__key__": sample.key, **sample.members, LATENTS: to_bytes(mean, std),
            LATENTS_META: json.dumps(document).encode()}


def encode_part(urls: list[str], out_dir: str, settings: EncodeSettings, part: int, encoder: Encoder,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """Encode part ``part`` (a contiguous range of the source shards) into ``out_dir`` as
    ``pack --parts`` packs one (:mod:`datapipes.parts`): staged, whole shards renamed in, the record
    written last; a part with a record is skipped (``skipped: True``), a killed one is redone from
    scratch. A sample that cannot be encoded is quarantined with the reason."""
    from datapipes.index import rewrite_samples
    from datapipes.pack import _PublishingSink
    from datapipes.parts import begin_part, end_part, part_slice
    from datapipes.video import VideoDecodeError

    chosen = part_slice(len(urls), settings.parts, part)
    plan = make_plan(urls, settings)
    started = time.monotonic()
    finished, removed, staging = begin_part(out_dir, plan, part)
    if finished is not None:
        return finished
    sources = [urls[i] for i in chosen]
    quarantined, encoded = [], [0]

    def encode(sample: shards.RawSample) -> dict | None:
        try:
            written = encode_sample(sample, settings, encoder)
        except (ValueError, VideoDecodeError) as error:  # schema.SchemaError is a ValueError
            quarantined.append({"input": f"{sources[sample.shard]}#{sample.key}", "reason": str(error)})
            return None
        encoded[0] += 1
        return written

    sink = _PublishingSink(staging, f"{settings.prefix}-{part:05d}", settings.shard_size, float("inf"))
    rewrite_samples(sources, sink, encode, lambda number: log(
        f"encode part {part}: shard {number + 1}/{len(sources)} done, {encoded[0]} encoded"))
    seconds = round(time.monotonic() - started, 3)
    return end_part(out_dir, plan, part, sink.urls, staging, {
        "format": "xdyna-encode-part-v1", "inputs": [chosen.start, chosen.stop], "packed": encoded[0],
        "quarantined": quarantined, "warnings": {}, "curation": [],
        "timings": {"encode_s": seconds, "total_s": seconds}, "removed_leftovers": removed})
