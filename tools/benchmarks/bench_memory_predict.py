"""Check the step-memory predictor (xdyna.models.memory) against real CPU runs.

    python -m tools.benchmarks.bench_memory_predict --case tiny-fp32 --case sd15-bf16
    python -m tools.benchmarks.bench_memory_predict --list

Each case runs one training step (xdyna.models.info.run_training_step: VAE encode, reference
pass, ControlNets, video UNet, loss, backward) twice: predicted on fake tensors, and for real on the
CPU under ``torch.profiler.profile(profile_memory=True)``, whose allocator events carry the bytes
allocated since profiling started ("Total Allocated"); its maximum is the step's peak above the
weights (activations + gradients + temporaries). The prediction here counts exact bytes (no CUDA
block rounding) and uses CPU autocast's own policy, as the real CPU run does. Random weights, no
files. Prints one JSON line per case (prediction, measurement, ratio). A script, not a test: the
SD1.5 cases need ~6 GiB and minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from xdyna.models import ModelConfig, build_model
from xdyna.models.activation_checkpointing import apply_activation_checkpointing
from xdyna.models.info import run_training_step
from xdyna.models.memory import step_memory

STAGE1 = ["dynamics_adapter", "motion_modules", "pose_controlnet"]
# name: (flavour, frames, height, width, precision, engine, checkpointing, model overrides)
CASES = {
    "tiny-fp32": ("tiny", 4, 128, 64, "32-true", "ddp", "none", {}),
    "tiny-fp32-diffusers": ("tiny", 4, 128, 64, "32-true", "ddp", "diffusers", {}),
    "tiny-fp32-all": ("tiny", 4, 128, 64, "32-true", "ddp", "all", {}),
    "tiny-bf16-mixed": ("tiny", 4, 128, 64, "bf16-mixed", "ddp", "none", {}),
    "tiny-bf16-mixed-unet": ("tiny", 4, 128, 64, "bf16-mixed", "ddp", "unet", {}),
    # SD1.5 size, module cast to bf16 as DeepSpeed does; no S-Face ControlNet to spare memory.
    "sd15-bf16": ("sd15", 2, 128, 64, "bf16-true", "zero2", "diffusers", {"face": "none"}),
    "sd15-bf16-none": ("sd15", 2, 128, 64, "bf16-true", "zero2", "none", {"face": "none"}),
    "sd15-bf16-all": ("sd15", 2, 128, 64, "bf16-true", "zero2", "all", {"face": "none"}),
}


def measure(config: ModelConfig, frames, height, width, precision, checkpointing) -> int:
    """Peak bytes allocated during one real CPU step above what existed before it."""
    half = torch.bfloat16 if precision.startswith("bf16") else None
    model = build_model(replace(config, gradient_checkpointing=checkpointing == "diffusers"))
    model.set_trainable(STAGE1)
    if checkpointing != "diffusers":
        apply_activation_checkpointing(model, checkpointing)
    casts_module = half is not None and precision.endswith("-true")
    if casts_module:
        model.to(half)
    model.train()

    def forward_context():
        return torch.autocast("cpu", dtype=half) if half is not None and not casts_module else contextlib.nullcontext()

    return profiler_peak(lambda: run_training_step(model, ["pose"], frames, height, width,
                                                   dtype=half if casts_module else torch.float32, forward_context=forward_context))


def profiler_peak(function) -> int:
    """Peak bytes the CPU allocator handed out while ``function`` ran, above what existed before:
    the largest "Total Allocated" of torch's memory profiler, less its value before the first
    event. (It counts from the first profiled allocation of the process, not from this profile's
    start: a second profile in one process read 9 MB higher per earlier profile, seen here.)"""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]  # Bytes < 0 for a free
    return max(event["Total Allocated"] for event in events) - before


def run_case(name: str) -> dict:
    flavour, frames, height, width, precision, engine, checkpointing, overrides = CASES[name]
    config = replace(ModelConfig(flavour=flavour), **overrides)
    start = time.perf_counter()
    predicted = step_memory(config, STAGE1, ["pose"], frames, height, width, precision=precision, engine=engine,
                            checkpointing=checkpointing, autocast_policy="cpu", block=1)
    predict_s = time.perf_counter() - start
    measured = measure(config, frames, height, width, precision, checkpointing)
    mib = 2**20
    return dict(case=name, flavour=flavour, frames=frames, size=[height, width], precision=precision,
                checkpointing=checkpointing, predicted_mib=round(predicted["step_peak_bytes"] / mib, 2),
                measured_mib=round(measured / mib, 2), ratio=round(predicted["step_peak_bytes"] / measured, 4),
                weights_mib=round(predicted["weights_bytes"] / mib, 1), predict_seconds=round(predict_s, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default: the tiny cases")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{name}: {spec}" for name, spec in CASES.items()))
        return
    names = args.case or [name for name in CASES if name.startswith("tiny")]
    if len(names) == 1:
        print(json.dumps(run_case(names[0])), flush=True)
        return
    # One process per case: a case measured after another in the same process read 23 % more
    # (tiny-bf16-mixed: 48.0 MiB after tiny-fp32, 39.4 MiB in a fresh process).
    for name in names:
        subprocess.run([sys.executable, "-m", "tools.benchmarks.bench_memory_predict", "--case", name], check=True)


if __name__ == "__main__":
    main()
