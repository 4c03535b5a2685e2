"""Inputs for the partitioned-pack tests (tests/data and tests/scale): a JSONL manifest of small
clips, and the samples of a packed folder as ``{key: {member: bytes}}``."""
from __future__ import annotations

import json

from datapipes import shards
from datapipes.synthetic import human_clip, scene_clip
from datapipes.video import encode_mp4


def write_manifest(folder, count: int = 7, frames: int = 16) -> str:
    """``count`` clips (every third a scene clip) plus one input that is not a video (quarantined),
    listed in ``folder/list.jsonl``; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        if index % 3 == 2:
            clip = scene_clip(seed=index, frames=frames, height=64, width=64)
            (folder / f"c{index}.mp4").write_bytes(encode_mp4(clip["video"], 8))
            lines.append({"video": f"c{index}.mp4", "kind": "scene", "source": "nature"})
        else:
            clip = human_clip(seed=index, frames=frames, height=64, width=64)
            (folder / f"c{index}.mp4").write_bytes(encode_mp4(clip["video"], 8))
            (folder / f"c{index}.pose.mp4").write_bytes(encode_mp4(clip["pose"], 8))
            lines.append({"video": f"c{index}.mp4", "pose_video": f"c{index}.pose.mp4", "source": "dance"})
    (folder / "broken.mp4").write_bytes(b"not a video\n" * 20)
    lines.insert(3, {"video": "broken.mp4", "source": "dance"})
    manifest = folder / "list.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(manifest)


def packed_samples(spec) -> dict:
    """Every sample of a shard spec (folder, pattern or index) as ``{key: {member: bytes}}``; a
    key seen twice fails."""
    urls = shards.expand_shard_urls(spec)
    reader = shards.TarSampleReader(urls)
    samples = {}
    try:
        for number in range(len(urls)):
            for sample in reader.iter_shard(number):
                assert sample.key not in samples, f"{sample.key} packed twice"
                samples[sample.key] = dict(sample.members)
    finally:
        reader.close()
    return samples
