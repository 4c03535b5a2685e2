"""Data-loading benchmark: clips/s for 16-frame clips at 896x512, stride 2 (video + pose +
reference frame), three ways (ours twice), with the same number of worker processes, interleaved
in rounds so that all see the same machine load:

* ``shards_float32`` / ``shards_uint8``: our streaming loader (``datapipes.loader``) reading
  WebDataset shards, delivering the float32 batch contract or uint8 batches
  (``output_dtype``) that the training device scales;
* ``shards_uint8_fresh_shm``: the same with ``shm_buffers: 0``: every batch in fresh shared
  memory (torch's way) instead of the workers' reusable buffers (``datapipes.batch_buffers``);
* ``peer``: a peer-style map-style Dataset that opens each mp4 file (and its pose mp4) from disk
  with decord inside ``__getitem__`` and builds the same tensors;
* ``decoder``: the decoder's own limit, decoding the same frames from bytes in memory with
  nothing else (no tar reading, no tensors, no IPC).

All ways decode exactly the frames our loader samples (see :func:`bench`).

Run: ``python -m tools.benchmarks.bench_data --clips 16 --rounds 3 --workers 2``. Uses the example videos in
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


class PeerDataset:
    """What peers do: one file path per sample, decode in __getitem__ (here the frames our
    loader chose, so that every way decodes the same frames)."""

    def __init__(self, items):
        self.items = items  # (video path, pose path, clip frame indices, reference index)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        import decord
        import torch

        video_path, pose_path, clip, reference = self.items[index]
        video = decord.VideoReader(video_path, num_threads=1)
        pose = decord.VideoReader(pose_path, num_threads=1)
        frames = video.get_batch(list(clip) + [reference]).asnumpy()
        pose_frames = pose.get_batch(list(clip)).asnumpy()
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {"video": tensor[:-1], "reference": tensor[-1],
                "pose": torch.from_numpy(pose_frames).permute(0, 3, 1, 2).float() / 255}


def _decode_only(job):
    import decord

    video_bytes, pose_bytes, clip, reference = job
    video = decord.VideoReader(io.BytesIO(video_bytes), num_threads=1)
    pose = decord.VideoReader(io.BytesIO(pose_bytes), num_threads=1)
    video.get_batch(sorted(set(clip) | {reference})).asnumpy()
    pose.get_batch(list(clip)).asnumpy()
    return clip


def _arrivals(items, count: int, frames_of) -> tuple[list[float], list[list[int]]]:
    """Start time followed by the arrival time of each of ``count`` items, and each item's clip
    frame indices (``frames_of(item)``, ``None`` where a way does not report them)."""
    stamps, frames = [time.perf_counter()], []
    for _, item in zip(range(count), items):
        stamps.append(time.perf_counter())
        frames.append(frames_of(item))
    if len(stamps) != count + 1:
        raise RuntimeError(f"expected {count} clips, got {len(stamps) - 1}")
    return stamps, frames


def bench(clips: int, workers: int, workdir: str, rounds: int = 3) -> dict:
    """``rounds`` rounds; each runs every way on ``clips`` clips, in a rotated order, so all
    ways see the same machine load. Every way decodes the same frames: an untimed pass of our
    loader per round's seed records which clip and reference frames of which video it samples
    (``frame_index``, ``reference_index``), and the peer and decoder ways replay that plan
    (decode cost depends on where a clip starts relative to the video's keyframes, so drawing
    separate random clips would compare different work). Two rates per way, summed over rounds:

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
    paths, index_of = [], {}
    with shards.ShardSink(os.path.join(workdir, "shards"), "bench", max_count=4) as sink:
        for index, (video, pose) in enumerate(pairs):
            meta = {"fps": 8.0, "num_frames": 0, "height": HEIGHT, "width": WIDTH, "kind": "human",
                    "source": "bench", "license": "Apache-2.0"}
            key = f"clip-{index:04d}"
            sink.write(shards.make_sample(key, video, meta, pose_video=pose))
            video_path, pose_path = (os.path.join(workdir, f"{key}{s}.mp4") for s in ("", ".pose"))
            Path(video_path).write_bytes(video)
            Path(pose_path).write_bytes(pose)
            paths.append((video_path, pose_path))
            index_of[key] = index

    def shard_loader(output_dtype: str, seed: int, shm_buffers: int = ClipLoaderConfig.shm_buffers):
        cfg = ClipLoaderConfig(shards=os.path.join(workdir, "shards"), scene_probability=None,
                               num_frames=FRAMES, frame_stride=STRIDE, height=HEIGHT, width=WIDTH,
                               batch_size=1, num_workers=workers, batches_per_epoch=clips,
                               reference="any", crop="center", seed=seed, output_dtype=output_dtype,
                               shm_buffers=shm_buffers)
        return iter(build_clip_loader(cfg, 0, 1))

    # The plan of each round: (source index, clip frames, reference frame) per clip, in order.
    # uint8 and float32 loaders with the same seed sample the same clips.
    plans = [[(index_of[batch["__key__"][0]], batch["frame_index"][0].tolist(), int(batch["reference_index"][0]))
              for batch in shard_loader("uint8", seed)] for seed in range(rounds)]
    decoder_jobs = [[(*pairs[source], clip, reference) for source, clip, reference in plan] for plan in plans]

    def peer_loader(plan):
        items = [(*paths[source], clip, reference) for source, clip, reference in plan]
        return iter(DataLoader(PeerDataset(items), batch_size=None, num_workers=workers, shuffle=False))

    def clip_frames(way):
        if way.startswith("shards"):
            return lambda batch: batch["frame_index"][0].tolist()
        return (lambda clip: list(clip)) if way == "decoder" else (lambda _batch: None)

    results = {"clips_per_round": clips, "rounds": rounds, "workers": workers, "frames": FRAMES,
               "stride": STRIDE, "size": f"{HEIGHT}x{WIDTH}", "cpu_count": os.cpu_count(),
               "load_average_before": os.getloadavg()}
    ways = ["shards_float32", "shards_uint8", "shards_uint8_fresh_shm", "peer", "decoder"]
    steady = {way: [0, 0.0] for way in ways}
    wall = {way: [0, 0.0] for way in ways}
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_only, decoder_jobs[0][:workers])   # warm the processes
        for round_index in range(rounds):
            order = ways[round_index % len(ways):] + ways[:round_index % len(ways)]
            for way in order:
                if way == "decoder":
                    items = pool.imap(_decode_only, decoder_jobs[round_index], chunksize=1)
                elif way == "peer":
                    items = peer_loader(plans[round_index])
                elif way == "shards_uint8_fresh_shm":
                    items = shard_loader("uint8", round_index, shm_buffers=0)
                else:
                    items = shard_loader(way.split("_")[1], round_index)
                stamps, frames = _arrivals(items, clips, clip_frames(way))
                planned = [clip for _, clip, _ in plans[round_index]]
                if way != "peer" and frames != planned:
                    raise RuntimeError(f"{way} decoded other clips than the plan of round {round_index}")
                steady[way][0] += clips - workers
                steady[way][1] += stamps[-1] - stamps[workers]
                wall[way][0] += clips
                wall[way][1] += stamps[-1] - stamps[0]
    results["load_average_after"] = os.getloadavg()
    for way in ways:
        results[f"{way}_clips_per_s"] = steady[way][0] / steady[way][1]
        results[f"{way}_wall_clips_per_s"] = wall[way][0] / wall[way][1]
    for way in ways[:4]:
        results[f"{way}_vs_decoder"] = results[f"{way}_clips_per_s"] / results["decoder_clips_per_s"]
    for way in ways[:3]:
        results[f"{way}_vs_peer"] = results[f"{way}_clips_per_s"] / results["peer_clips_per_s"]
    results["shards_uint8_vs_fresh_shm"] = results["shards_uint8_clips_per_s"] / results["shards_uint8_fresh_shm_clips_per_s"]
    return results


def fill_costs(repeats: int = 20) -> dict:
    """Milliseconds to write one clip's images (video + reference + pose: 33 frames of 896x512x3)
    into fresh shared memory (what torch's collate does per batch), into a shared buffer that is
    already mapped (what a reused ``shm_buffers`` buffer costs), and into fresh private memory."""
    import torch

    frame = torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8)
    nbytes = (2 * FRAMES + 1) * frame.numel()
    reused = torch.UntypedStorage._new_shared(nbytes)

    def fill(storage):
        torch.empty(0, dtype=torch.uint8).set_(storage, 0, (2 * FRAMES + 1, HEIGHT, WIDTH, 3)).copy_(frame)

    makers = {"fresh_shared": lambda: torch.UntypedStorage._new_shared(nbytes),
              "reused_shared": lambda: reused, "fresh_private": lambda: torch.UntypedStorage(nbytes)}
    costs = {}
    for name, make in makers.items():
        fill(make())  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fill(make())
        costs[f"fill_{name}_ms"] = (time.perf_counter() - start) / repeats * 1000
    costs["fill_bytes"] = nbytes
    return costs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12, help="clips per way per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        print(json.dumps(fill_costs() | bench(args.clips, args.workers, workdir, args.rounds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
