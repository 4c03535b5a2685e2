"""Preemption: on SIGUSR1/SIGUSR2/SIGTERM checkpoint at the next step boundary, then requeue.

**This callback is the one owner of requeue** for every xdyna job, whether started by
``xdyna-launch slurm`` (sbatch ``--signal=SIGUSR1@90``) or by Hydra's submitit launcher (which
asks SLURM for SIGUSR2): Lightning's own SLURM auto-requeue is switched off
(``SLURMEnvironment(auto_requeue=False)``), and the handlers installed here replace Lightning's
and submitit's for these signals while training runs.

Why not Lightning's handler: it saves the checkpoint *inside* the signal handler, i.e. at an
arbitrary point of the step and, under DeepSpeed, with collective calls that may interleave
with the step's own all-reduces on other ranks. Here the handler only sets a flag; at the end
of each optimizer step all ranks agree on it (an all-reduce of one integer), so every rank
checkpoints the same completed step, and the checkpoint is resumable bit for bit.

Sequence on a signal: flag -> (next step end) all ranks agree -> sharded checkpoint committed
atomically -> rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` -> training stops. SLURM then ends
the job's processes and starts it again with the same job id and environment, so the run id,
run directory and W&B run are the same, and the restarted job resumes from the newest
complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from xdyna.train.checkpoint_callbacks import save_step_checkpoint

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


def slurm_job_id(environ=os.environ) -> str | None:
    """``<array job>_<task>`` for array jobs (submitit sweeps), else the plain job id."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, done.returncode, done.stderr.strip())
        return False
    return True


class PreemptionHandler(L.Callback):
    """Checkpoint + requeue on the configured signals; see the module docstring."""

    def __init__(self, checkpoint_dir: str | os.PathLike, signals=DEFAULT_SIGNALS, requeue: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.preempted_at_step: int | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[int, Any] = {}

    # Signal handlers run between bytecodes of the main thread: keep them to setting a flag.
    def _on_signal(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        for sig in self.signals:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Early, so a signal during model/data setup is not fatal (SIGUSR1's default kills).
        self.install()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers its SIGTERM handler between setup and training: take it back.
        self.install()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()

    @property
    def preempted(self) -> bool:
        return self.preempted_at_step is not None

    def _agreed(self, trainer: L.Trainer) -> bool:
        flag = torch.tensor([0 if self.received is None else 1], device=trainer.strategy.root_device)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.preempted or not self._agreed(trainer):
            return
        name = signal.Signals(self.received).name if self.received is not None else "a peer's signal"
        self.checkpoint_path = save_step_checkpoint(trainer, self.checkpoint_dir)
        self.preempted_at_step = trainer.global_step
        job_id = slurm_job_id()
        requeued = False
        if trainer.is_global_zero:
            if self.requeue and job_id:
                requeued = requeue_slurm_job(job_id)
            print(
                f"xdyna-train: {name} -> checkpoint {self.checkpoint_path} at step {trainer.global_step}; "
                + (f"requeued SLURM job {job_id}" if requeued else "not requeued (no SLURM job or requeue off)"),
                flush=True,
            )
        trainer.should_stop = True
