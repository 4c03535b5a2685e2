"""Training-step speed of the X-Dyna network: attention backends, precision, kernel batch limits.

    python -m tools.benchmarks.bench_model_step --flavour sd15 --device cuda --frames 16 \
        --height 896 --width 512 --batch 1 --backends sdpa xformers --json out.json

Random weights (no files needed). Reports seconds per fwd+bwd step of stage 1 (adapter + motion
modules + pose ControlNet trainable), peak memory, FLOPs counted by torch's FlopCounterMode and
the resulting TFLOP/s (and MFU against --peak-tflops). Baseline for ratios: the first backend.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from xdyna.models import ModelConfig, build_model

STAGE1 = ("dynamics_adapter", "motion_modules", "pose_controlnet")


def make_inputs(batch, frames, height, width, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h, w = height // 8, width // 8
    return dict(
        noisy_latents=torch.randn(batch, frames, 4, h, w, generator=g).to(device),
        timesteps=torch.randint(0, 1000, (batch,), generator=g).to(device),
        reference_latents=torch.randn(batch, 4, h, w, generator=g).to(device),
        pose=torch.rand(batch, frames, 3, height, width, generator=g).to(device),
    )


def step(model, inputs, dtype, forward_only=False):
    with torch.autocast(inputs["pose"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        if forward_only:
            with torch.no_grad():
                return model.denoise(**inputs)
        out = model.denoise(**inputs)
    loss = out.float().square().mean()
    loss.backward()
    return loss


def bench(model, inputs, dtype, warmup, iters, forward_only=False):
    device = inputs["pose"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(model, inputs, dtype, forward_only)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step(model, inputs, dtype, forward_only)
        model.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return seconds, peak


def count_flops(model, inputs, dtype, forward_only=False):
    with FlopCounterMode(display=False) as counter:
        step(model, inputs, dtype, forward_only)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--backends", nargs="+", default=["sdpa"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="inference: no_grad forward of one denoising step")
    parser.add_argument("--max-attention-batch", type=int, default=65535)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    flops = None
    for backend in args.backends:
        config = ModelConfig(
            flavour=args.flavour, attention_backend=backend, gradient_checkpointing=args.checkpointing,
            max_attention_batch=args.max_attention_batch,
        )
        try:
            model = build_model(config).to(args.device)
        except Exception as error:  # e.g. xformers unusable here: report it, measure the rest
            results.append(dict(backend=backend, error=str(error)))
            print(json.dumps(results[-1]), flush=True)
            continue
        model.set_trainable(STAGE1)
        model.train()
        inputs = make_inputs(args.batch, args.frames, args.height, args.width, args.device)
        if flops is None:
            flops = count_flops(model, inputs, dtype, args.forward_only)
        seconds, peak = bench(model, inputs, dtype, args.warmup, args.iters, args.forward_only)
        tflops = flops / seconds / 1e12
        row = dict(backend=backend, seconds_per_step=round(seconds, 4), peak_gib=peak and round(peak, 2),
                   tflop_per_step=round(flops / 1e12, 2), tflops=round(tflops, 1),
                   mfu=round(tflops / args.peak_tflops, 3))
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    timed = [row for row in results if "seconds_per_step" in row]
    for row in timed:
        row["speedup_vs_first"] = round(timed[0]["seconds_per_step"] / row["seconds_per_step"], 3)
    summary = dict(vars(args), results=results, torch=torch.__version__,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
