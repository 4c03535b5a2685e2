"""The tiny 2-rank training run the scale tests launch in several ways (local, sbatch, sweep)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
# Resumed and never-stopped runs do the same float32 math in the same order on the same ranks,
# so weights agree to rounding; 1e-6 absolute leaves room for nothing else.
WEIGHT_ATOL = 1e-6


def tiny_overrides(shards: Path, root: Path, run_id: str, max_steps: int) -> list[str]:
    """xdyna-train overrides of a tiny stage-1 run: ZeRO-2 on the CPU/gloo DeepSpeed path, fp32,
    a checkpoint every 2 steps (all kept), one-step sample rendering. No device/node counts:
    each caller sets those (locally ``trainer.devices=2``, under SLURM the launcher does)."""
    return ["model=tiny", "data=synthetic", "stage=stage1", "logger=none",
            f"data.shards={shards}", "data.num_frames=4", "data.batch_size=1",
            f"run.root={root}", f"run.id={run_id}", f"trainer.max_steps={max_steps}",
            "trainer/strategy=deepspeed_cpu_zero2", "trainer.precision=32-true",
            "checkpoint.every_n_steps=2", "checkpoint.keep=0",
            "samples.num_inference_steps=1", "samples.max_samples=1"]


def clean_env(base: dict | None = None) -> dict:
    """The caller's environment minus anything that would pin a run id or a rendezvous."""
    env = dict(base if base is not None else os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for key in ("XDYNA_RUN_ID", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
