"""Pack throughput per core (docs/performance.md, "Packing throughput").

    .venv/bin/python -m tools.benchmarks.bench_pack [--clips 8] [--frames 64] [--face-clips 2] [--slurm]

Inputs are real footage: 64-frame clips cut from the example driving videos and their pose
videos (/work/shared/data/xdyna_examples, 896x512, 8 fps; the cutting is preparation, not timed).
Each figure runs ``pack`` in this process (``--workers 0``, torch on one thread): one core.

* ``pack``: validation (``--verify ends``) + shard writing, clips with a pose video;
* ``pack + face``: the same with ``--face-detector mtcnn`` (MTCNN on every frame);
* ``curate``: ``--shots`` on the raw driving videos (shot detection + Farneback motion at 128 px
  + re-encoding the kept clips at full size + packing them), per raw frame;
* ``--slurm``: the same manifest packed by an array of 1 and of 2 tasks on the local two-node
  test cluster (tests/scale/slurm_cluster.py), wall time from submission to the index.

Pose estimation (DWPose) is not measured: no DWPose weights are on this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(os.environ.get("XDYNA_EXAMPLES", "/work/shared/data/xdyna_examples"))


def make_clips(folder: Path, clips: int, frames: int) -> Path:
    import decord

    from datapipes.video import encode_mp4

    lines = []
    pairs = [(EXAMPLES / f"example_{n}_driving.mp4", EXAMPLES / f"example_{n}_pose.mp4") for n in (1, 2)]
    readers = [(decord.VideoReader(str(v)), decord.VideoReader(str(p))) for v, p in pairs]
    for index in range(clips):
        video, pose = readers[index % 2]
        start = (index // 2) * frames % (min(len(video), len(pose)) - frames)
        span = list(range(start, start + frames))
        fps = video.get_avg_fps()
        (folder / f"c{index}.mp4").write_bytes(encode_mp4(video.get_batch(span).asnumpy(), fps))
        (folder / f"c{index}.pose.mp4").write_bytes(encode_mp4(pose.get_batch(span).asnumpy(), fps))
        lines.append({"video": f"c{index}.mp4", "pose_video": f"c{index}.pose.mp4", "source": f"example{index % 2 + 1}"})
    manifest = folder / "clips.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def timed_pack(argv: list[str]) -> tuple[float, dict]:
    from tools.xdyna_data import main

    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the figures (JSON)
        code = main(argv)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"xdyna-data {' '.join(argv)} exited {code}")
    return seconds, json.loads(Path(argv[argv.index("--out") + 1], "index.json").read_text())


def rates(seconds: float, clips: int, frames: int) -> dict:
    return {"seconds": round(seconds, 2), "clips": clips, "frames": frames,
            "clips_per_s": round(clips / seconds, 3), "frames_per_s": round(frames / seconds, 1)}


def local_figures(work: Path, clips: int, frames: int, face_clips: int) -> dict:
    import torch

    torch.set_num_threads(1)
    inputs = work / "clips"
    inputs.mkdir()
    manifest = make_clips(inputs, clips, frames)
    common = ["--workers", "0", "--parts", "1"]
    results = {}
    seconds, index = timed_pack(["pack", str(manifest), "--out", str(work / "plain"), *common])
    results["pack"] = rates(seconds, index["samples"], index["frames"])
    few = inputs / "few.jsonl"  # beside the clips: the manifest's paths are relative to it
    few.write_text("".join(manifest.read_text().splitlines(keepends=True)[:face_clips]))
    seconds, index = timed_pack(["pack", str(few), "--out", str(work / "face"), *common,
                                 "--face-detector", "mtcnn"])
    results["pack + face (mtcnn)"] = rates(seconds, index["samples"], index["frames"])
    raw = work / "raw"
    raw.mkdir()
    for n in (1, 2):
        os.symlink(EXAMPLES / f"example_{n}_driving.mp4", raw / f"raw{n}.mp4")
    seconds, index = timed_pack(["pack", str(raw), "--out", str(work / "curated"), "--kind", "scene", *common,
                                 "--shots", "--max-clip-frames", str(frames)])
    raw_frames = sum(d["frames"] for d in index["curation"])
    results["curate (--shots)"] = dict(rates(seconds, index["samples"], index["frames"]), raw_frames=raw_frames,
                                       raw_frames_per_s=round(raw_frames / seconds, 1),
                                       motion=[d["motion"] for d in index["curation"]])
    return results


def slurm_figures(work: Path, clips: int, frames: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.scale.slurm_cluster import LocalSlurmCluster, ensure_slurm_installed

    ensure_slurm_installed()
    inputs = work / "slurm-clips"
    inputs.mkdir()
    manifest = make_clips(inputs, clips, frames)
    results = {}
    with LocalSlurmCluster() as cluster:
        for tasks in (1, 2):
            out = work / f"array-{tasks}"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "tools.xdyna_data", "pack", str(manifest), "--out", str(out),
                                   "--parts", str(tasks), "--slurm", "--workers", "0"],
                                  env=cluster.env, capture_output=True, text=True, check=True)
            job = re.search(r"submitted array job (\d+)", done.stdout).group(1)
            while cluster.run(["squeue", "-h", "-j", job, "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            index = json.loads((out / "index.json").read_text())
            results[f"{tasks} array task(s)"] = dict(rates(seconds, index["samples"], index["frames"]),
                                                     per_part_s=index["timings"]["per_part_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--face-clips", type=int, default=2)
    parser.add_argument("--slurm", action="store_true", help="also 1 vs 2 array tasks on the local test cluster")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as work:
        work = Path(work)
        os.chmod(work, 0o755)
        results = local_figures(work, args.clips, args.frames, args.face_clips)
        if args.slurm:
            results.update(slurm_figures(work, args.clips, args.frames))
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
