"""The tiny 2-rank training run the scale tests launch in several ways (local, sbatch, sweep)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
# Resumed and never-stopped runs do the same float32 math in the same order on the same ranks,
# so weights agree to rounding; 1e-6 absolute leaves room for nothing else.
WEIGHT_ATOL = 1e-6
# The learning rate of these runs, warming up over TINY_WARMUP_STEPS: AdamW moves a weight by
# about the step's learning rate (2.5e-4 and more here), far beyond WEIGHT_ATOL, so one step on
# a wrong batch, noise draw or learning rate shows. Stage 1's own (1e-5 over 500 warm-up steps)
# moves weights by 2e-8 per early step: any of those mistakes would pass under 1e-6.
TINY_LR = 1e-3
TINY_WARMUP_STEPS = 4


def tiny_overrides(shards: Path, root: Path, run_id: str, max_steps: int, every_n_steps: int = 2,
                   strategy: str = "deepspeed_cpu_zero2") -> list[str]:
    """xdyna-train overrides of a tiny stage-1 run: ZeRO-2 on the CPU/gloo DeepSpeed path (or
    ``strategy``), fp32, a checkpoint every ``every_n_steps`` steps (all kept), one-step sample
    rendering. No device/node counts: each caller sets those (locally ``trainer.devices=2``,
    under SLURM the launcher does)."""
    return ["model=tiny", "data=synthetic", "stage=stage1", "logger=none",
            f"data.shards={shards}", "data.num_frames=4", "data.batch_size=1",
            f"run.root={root}", f"run.id={run_id}", f"trainer.max_steps={max_steps}",
            f"trainer/strategy={strategy}", "trainer.precision=32-true",
            f"stage.optim.lr={TINY_LR}", f"stage.optim.warmup_steps={TINY_WARMUP_STEPS}",
            f"checkpoint.every_n_steps={every_n_steps}", "checkpoint.keep=0",
            "samples.num_inference_steps=1", "samples.max_samples=1"]


def max_weight_difference(expected: dict, got: dict) -> float:
    """Largest absolute difference between two weight dicts with the same (non-empty) key set."""
    assert expected and expected.keys() == got.keys(), sorted(set(expected) ^ set(got))[:5]
    return max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)


def clean_env(base: dict | None = None) -> dict:
    """The caller's environment minus anything that would pin a run id or a rendezvous."""
    env = dict(base if base is not None else os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for key in ("XDYNA_RUN_ID", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
