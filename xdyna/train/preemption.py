"""Preemption: on SIGUSR1/SIGUSR2/SIGTERM checkpoint at the next step boundary, then requeue.

**This callback is the one owner of requeue** for every xdyna job, whether started by
``xdyna-launch slurm`` (sbatch ``--signal=SIGUSR1@90``) or by Hydra's submitit launcher (which
asks SLURM for SIGUSR2): Lightning's own SLURM auto-requeue is switched off
(``SLURMEnvironment(auto_requeue=False)``), and the flag of :mod:`xdyna.train.signals` replaces
Lightning's and submitit's handlers for these signals (``xdyna-train`` installs it before anything
else and keeps it through the end-of-stage export).

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

import lightning as L

from xdyna.train.checkpoint_callbacks import save_step_checkpoint
from xdyna.train.collectives import any_rank
from xdyna.train.signals import DEFAULT_SIGNALS, PreemptionSignals
from xdyna.train.slurm import slurm_job_id

log = logging.getLogger(__name__)


def requeue_slurm_job(job_id: str) -> bool:
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    # An accepted requeue cancels the job's running step at once, and with it every process of the
    # step: scontrol, a child of rank 0, can get the step's SIGTERM before it exits (seen on the
    # local test cluster under load: "failed (-15)" and the job restarted). A refused requeue
    # exits 1 with SLURM's message and cancels nothing.
    if done.returncode == -signal.SIGTERM:
        return True
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, done.returncode, done.stderr.strip())
        return False
    return True


class PreemptionHandler(L.Callback):
    """Checkpoint + requeue on the configured signals; see the module docstring.

    ``signals``: a :class:`PreemptionSignals` the caller installed and will restore itself
    (``xdyna-train`` installs one before anything else and restores it after the end-of-stage
    export, so no preemption signal ever reaches another handler while the job runs); without
    one the handler catches ``DEFAULT_SIGNALS`` from ``setup`` to ``teardown``.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, signals: PreemptionSignals | None = None,
                 requeue: bool = True):
        self.checkpoint_dir = Path(checkpoint_dir)
        self._owns_signals = signals is None
        self.signals = PreemptionSignals(DEFAULT_SIGNALS) if signals is None else signals
        self.requeue = requeue
        self.preempted_at_step: int | None = None
        self.checkpoint_path: Path | None = None
        # Set on every rank when the job asked SLURM to requeue it (rank 0 runs scontrol).
        self.requeued = False

    @property
    def received(self) -> int | None:
        return self.signals.received

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Early, so a signal during model/data setup is not fatal (SIGUSR1's default kills).
        self.signals.install()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers its SIGTERM handler between setup and training: take it back.
        self.signals.install()
        # From now on a step is running or done: a Ctrl-C waits for it and saves it.
        self.signals.deferring_interrupt = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._owns_signals:
            self.signals.restore()
        else:
            # Lightning's signal connector may have put its own handler back at teardown.
            self.signals.install()

    @property
    def preempted(self) -> bool:
        return self.preempted_at_step is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.preempted or not any_rank(self.received is not None, trainer.strategy.root_device):
            return
        name = self.signals.name or "a peer's signal"
        self.checkpoint_path = save_step_checkpoint(trainer, self.checkpoint_dir)
        self.preempted_at_step = trainer.global_step
        job_id = slurm_job_id()
        # A Ctrl-C is the user's stop: saved like a preemption, never requeued.
        self.requeued = bool(self.requeue and job_id and not self.signals.interrupted)
        if trainer.is_global_zero:
            if self.signals.interrupted:
                outcome = "stopped by the user (a second Ctrl-C stops at once)"
            elif not self.requeued:
                outcome = "not requeued (no SLURM job or requeue off)"
            elif requeue_slurm_job(job_id):
                outcome = f"requeued SLURM job {job_id}"
            else:
                outcome = f"requeue of SLURM job {job_id} FAILED (scontrol's error above); resubmit the same command to resume"
            print(f"xdyna-train: {name} -> checkpoint {self.checkpoint_path} at step {trainer.global_step}; {outcome}",
                  flush=True)
        trainer.should_stop = True
