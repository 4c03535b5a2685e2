"""Inference benchmark: seconds per generated frame against video length, and the speed-up from
sharing the reference features across context windows (ours) over recomputing them in every
window (the public X-Dyna release).

    python tools/benchmarks/bench_inference.py --model tiny --lengths 16,32,64 --steps 2
    python tools/benchmarks/bench_inference.py --model sd15 --device cuda --dtype fp16 \\
        --lengths 16,32,64,128 --steps 5 --json bench.json

Random weights: speed depends on the architecture and the shapes, not on the weight values, so
``sd15`` measures the real model's cost without any weights on disk. Each configuration runs
once untimed (kernel selection, allocator warm-up), then ``--repeats`` timed runs; the median
is reported. Timings cover the whole call: initial latent, denoising loop and chunked VAE decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from xdyna.pipelines import ContextOptions, XDynaPipeline  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(pipeline: XDynaPipeline, frames: int, size: tuple[int, int], steps: int, share: bool,
              windows_per_batch: int, repeats: int) -> float:
    """Median seconds of one animation of ``frames`` frames."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, *size, generator=generator) * 2 - 1
    pose = torch.rand(frames, 3, *size, generator=generator)
    face = torch.rand(frames, 6, *size, generator=generator) if pipeline.has_face_controlnet else None
    context = ContextOptions(windows_per_batch=windows_per_batch)
    times = []
    for run in range(repeats + 1):
        _sync(pipeline.device)
        started = time.perf_counter()
        pipeline(reference, pose, face, num_inference_steps=steps, seed=run, context=context, share_reference_features=share)
        _sync(pipeline.device)
        if run:  # the first run warms up and is not counted
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--lengths", default="16,32,64", help="video lengths in frames")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (time grows linearly with them)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--windows-per-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    pipeline = XDynaPipeline.from_config({"flavour": args.model}, device=args.device, dtype=args.dtype)
    size = (args.height or pipeline.default_size[0], args.width or pipeline.default_size[1])
    lengths = [int(v) for v in args.lengths.split(",")]
    device_name = torch.cuda.get_device_name(0) if pipeline.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model} {size[0]}x{size[1]} {args.dtype} on {device_name}, {args.steps} DDIM steps, "
          f"windows of 16 overlap 4, {args.windows_per_batch} window(s) per forward, no guidance (random weights have no image prompt)")
    print(f"{'frames':>7} {'windows':>8} {'shared s':>9} {'s/frame':>8} {'per-window s':>13} {'s/frame':>8} {'speed-up':>9}")
    rows = []
    for frames in lengths:
        shared = time_call(pipeline, frames, size, args.steps, True, args.windows_per_batch, args.repeats)
        recomputed = time_call(pipeline, frames, size, args.steps, False, args.windows_per_batch, args.repeats)
        windows = 1 if frames <= 16 else -(-frames // 12)  # closed-loop windows of 16 with overlap 4
        row = {"frames": frames, "windows": windows, "shared_s": shared, "shared_s_per_frame": shared / frames,
               "recomputed_s": recomputed, "recomputed_s_per_frame": recomputed / frames, "speedup": recomputed / shared}
        rows.append(row)
        print(f"{frames:>7} {windows:>8} {shared:>9.2f} {shared / frames:>8.3f} {recomputed:>13.2f} "
              f"{recomputed / frames:>8.3f} {recomputed / shared:>8.2f}x", flush=True)
    if len(rows) > 1:
        # Linear growth: a least-squares line through (frames, seconds) and its worst relative miss.
        xs = torch.tensor([r["frames"] for r in rows], dtype=torch.float64)
        ys = torch.tensor([r["shared_s"] for r in rows], dtype=torch.float64)
        slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        intercept = float(ys.mean() - slope * xs.mean())
        worst = max(abs(intercept + slope * r["frames"] - r["shared_s"]) / r["shared_s"] for r in rows)
        print(f"fit: seconds = {intercept:.3f} + {slope:.4f} x frames (worst relative miss {worst:.1%})")
    result = {"model": args.model, "size": size, "dtype": args.dtype, "device": device_name, "steps": args.steps,
              "windows_per_batch": args.windows_per_batch, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
