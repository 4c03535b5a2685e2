"""Data-loading benchmark: clips/s for 16-frame clips at 896x512, stride 2 (video + pose +
reference frame), three ways (ours twice), with the same number of worker processes, interleaved
in rounds so that all see the same machine load:

* ``shards_float32`` / ``shards_uint8``: our streaming loader (``datapipes.loader``) reading
  WebDataset shards, delivering the float32 batch contract or uint8 batches
  (``output_dtype``) that the training device scales;
* ``peer``: a peer-style map-style Dataset that opens each mp4 file (and its pose mp4) from disk
  with decord inside ``__getitem__`` and builds the same tensors;
* ``decoder``: the decoder's own limit, decoding the same frames from bytes in memory with
  nothing else (no tar reading, no tensors, no IPC).

Run: ``python -m tools.benchmarks.bench_data --clips 12 --rounds 3 --workers 2``. Uses the example videos in
../shared/data/xdyna_examples when present, else synthetic 896x512 clips.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "xdyna_examples"
FRAMES, STRIDE, HEIGHT, WIDTH = 16, 2, 896, 512


def _sources(copies: int) -> list[tuple[bytes, bytes]]:
    if (EXAMPLES / "example_1_driving.mp4").is_file():
        pairs = [((EXAMPLES / f"example_{i}_driving.mp4").read_bytes(), (EXAMPLES / f"example_{i}_pose.mp4").read_bytes())
                 for i in (1, 2)]
    else:
        from datapipes.synthetic import human_clip
        from datapipes.video import encode_mp4

        clip = human_clip(0, 96, HEIGHT, WIDTH)
        pairs = [(encode_mp4(clip["video"], 8), encode_mp4(clip["pose"], 8))]
    return [pairs[i % len(pairs)] for i in range(copies)]


def _plan(rng, count):
    span = (FRAMES - 1) * STRIDE + 1
    start = int(rng.integers(0, count - span + 1))
    clip = start + STRIDE * np.arange(FRAMES)
    reference = int(rng.integers(count))
    return clip, reference


class PeerDataset:
    """What peers do: one file path per sample, decode in __getitem__."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import decord
        import torch

        video_path, pose_path = self.paths[index]
        video = decord.VideoReader(video_path, num_threads=1)
        pose = decord.VideoReader(pose_path, num_threads=1)
        clip, reference = _plan(np.random.default_rng(index), len(video))
        frames = video.get_batch(list(clip) + [reference]).asnumpy()
        pose_frames = pose.get_batch(list(clip)).asnumpy()
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {"video": tensor[:-1], "reference": tensor[-1],
                "pose": torch.from_numpy(pose_frames).permute(0, 3, 1, 2).float() / 255}


def _decode_only(job):
    import decord

    index, video_bytes, pose_bytes = job
    video = decord.VideoReader(io.BytesIO(video_bytes), num_threads=1)
    pose = decord.VideoReader(io.BytesIO(pose_bytes), num_threads=1)
    clip, reference = _plan(np.random.default_rng(index), len(video))
    video.get_batch(sorted(set(clip) | {reference})).asnumpy()
    pose.get_batch(list(clip)).asnumpy()
    return index


def _arrivals(items, count: int) -> list[float]:
    """Start time followed by the arrival time of each of ``count`` items."""
    stamps = [time.perf_counter()]
    for _, _item in zip(range(count), items):
        stamps.append(time.perf_counter())
    if len(stamps) != count + 1:
        raise RuntimeError(f"expected {count} clips, got {len(stamps) - 1}")
    return stamps


def bench(clips: int, workers: int, workdir: str, rounds: int = 3) -> dict:
    """``rounds`` rounds; each runs every way on ``clips`` clips, in a rotated order, so all
    ways see the same machine load. Two rates per way, summed over rounds:

    * ``steady``: clips after the first ``workers`` divided by the time from the
      ``workers``-th clip to the last: throughput once the pipeline is full (what a long epoch
      sees; excludes worker start-up, which the warm decoder pool never pays);
    * ``wall``: all clips over the whole time, start-up included.
    """
    from torch.utils.data import DataLoader

    from datapipes import shards
    from datapipes.loader import ClipLoaderConfig, build_clip_loader

    if clips <= workers:
        raise ValueError(f"--clips ({clips}) must exceed --workers ({workers}) to measure a steady rate")
    pairs = _sources(max(clips, 8))
    paths = []
    with shards.ShardSink(os.path.join(workdir, "shards"), "bench", max_count=4) as sink:
        for index, (video, pose) in enumerate(pairs):
            meta = {"fps": 8.0, "num_frames": 0, "height": HEIGHT, "width": WIDTH, "kind": "human",
                    "source": "bench", "license": "Apache-2.0"}
            sink.write(shards.make_sample(f"clip-{index:04d}", video, meta, pose_video=pose))
            video_path, pose_path = (os.path.join(workdir, f"clip-{index:04d}{s}.mp4") for s in ("", ".pose"))
            Path(video_path).write_bytes(video)
            Path(pose_path).write_bytes(pose)
            paths.append((video_path, pose_path))
    jobs = [(i, video, pose) for i, (video, pose) in enumerate(pairs[:clips])]

    def shard_loader(output_dtype: str, seed: int):
        cfg = ClipLoaderConfig(shards=os.path.join(workdir, "shards"), scene_probability=None,
                               num_frames=FRAMES, frame_stride=STRIDE, height=HEIGHT, width=WIDTH,
                               batch_size=1, num_workers=workers, batches_per_epoch=clips,
                               reference="any", crop="center", seed=seed, output_dtype=output_dtype)
        return iter(build_clip_loader(cfg, 0, 1))

    def peer_loader(seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        return iter(DataLoader(PeerDataset(paths[:clips]), batch_size=None, num_workers=workers,
                               shuffle=True, generator=generator))

    results = {"clips_per_round": clips, "rounds": rounds, "workers": workers, "frames": FRAMES,
               "stride": STRIDE, "size": f"{HEIGHT}x{WIDTH}", "cpu_count": os.cpu_count(),
               "load_average_before": os.getloadavg()}
    ways = ["shards_float32", "shards_uint8", "peer", "decoder"]
    steady = {way: [0, 0.0] for way in ways}
    wall = {way: [0, 0.0] for way in ways}
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_only, jobs[:workers])   # warm the processes
        for round_index in range(rounds):
            order = ways[round_index % len(ways):] + ways[:round_index % len(ways)]
            for way in order:
                if way == "decoder":
                    items = pool.imap(_decode_only, jobs, chunksize=1)
                elif way == "peer":
                    items = peer_loader(round_index)
                else:
                    items = shard_loader(way.split("_")[1], round_index)
                stamps = _arrivals(items, clips)
                steady[way][0] += clips - workers
                steady[way][1] += stamps[-1] - stamps[workers]
                wall[way][0] += clips
                wall[way][1] += stamps[-1] - stamps[0]
    results["load_average_after"] = os.getloadavg()
    for way in ways:
        results[f"{way}_clips_per_s"] = steady[way][0] / steady[way][1]
        results[f"{way}_wall_clips_per_s"] = wall[way][0] / wall[way][1]
    for way in ways[:3]:
        results[f"{way}_vs_decoder"] = results[f"{way}_clips_per_s"] / results["decoder_clips_per_s"]
    for way in ways[:2]:
        results[f"{way}_vs_peer"] = results[f"{way}_clips_per_s"] / results["peer_clips_per_s"]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12, help="clips per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        print(json.dumps(bench(args.clips, args.workers, workdir, args.rounds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
