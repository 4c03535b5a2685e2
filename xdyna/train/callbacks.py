"""Training callbacks: sample videos (with validation metrics) from a fixed batch; the step progress bar;
test-only step delay."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from datapipes.atomic import write_bytes_atomic
from datapipes.video import encode_mp4

from ..latents import decode_cached
from ..metrics.validation import validation_metrics
from ..pipelines import sample_clip
from .ema import sampling_weights
from .batches import to_float_batch
from .collectives import any_rank
from .telemetry import logged_step


def to_uint8_frames(video: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """``(F, 3, H, W)`` float in ``value_range`` -> ``(F, H, W, 3)`` uint8."""
    low, high = value_range
    scaled = ((video.float().clamp(low, high) - low) / (high - low) * 255).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def side_by_side(reference: torch.Tensor, pose: torch.Tensor, generated: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """One sample as ``reference | pose | generated | ground truth`` frames, uint8 ``(F, H, 4W, 3)``."""
    frames = generated.shape[0]
    panels = [
        to_uint8_frames(reference.unsqueeze(0).expand(frames, -1, -1, -1), (-1, 1)),
        to_uint8_frames(pose, (0, 1)),
        to_uint8_frames(generated, (-1, 1)),
        to_uint8_frames(target, (-1, 1)),
    ]
    return np.concatenate(panels, axis=2)


class SampleVideoCallback(L.Callback):
    """Every ``every_n_steps`` (and at the end) generate clips for a fixed batch and save/log them,
    with :func:`xdyna.metrics.validation.validation_metrics` against the batch's real clips
    (``val/psnr``, ``val/ssim``; ``val/lpips`` and ``val/face_det`` when their models are given).

    The fixed batch is the first training batch this rank sees, so it needs no extra data source
    and is the same on resume. Every rank renders its own share and writes its own file; only rank
    0 logs to W&B, so no rank ever waits for another here.
    """

    def __init__(self, every_n_steps: int = 0, num_inference_steps: int = 10, max_samples: int = 2, fps: float = 8.0, seed: int = 0,
                 lpips_net=None, face_detector=None, weights: str = "ema", stopped_early: Callable[[], bool] | None = None):
        # Whether the stage was cut short (preempted, requeued, Ctrl-C): then no end-of-stage
        # samples, the job's grace time before SIGKILL is the checkpoint's, and the resumed run
        # renders the real end of the stage.
        self.stopped_early = stopped_early or (lambda: False)
        self.weights = weights  # "ema" (when the run keeps one) or "raw": see xdyna.train.ema.sampling_weights
        # Optional metric models for validation_metrics: None skips LPIPS / Face-Det.
        self.lpips_net = lpips_net
        self.face_detector = face_detector
        self.last_metrics: dict[str, float] = {}
        self.every_n_steps = every_n_steps
        self.num_inference_steps = num_inference_steps
        self.max_samples = max_samples
        self.fps = fps
        self.seed = seed
        self.fixed_batch: dict[str, Any] | None = None
        self.last_video: Path | None = None
        self.rendered_at_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # max_samples=0: no videos at all (no batch is kept, so render() never runs on any rank).
        if self.fixed_batch is None and self.max_samples > 0:
            n = self.max_samples
            batch = to_float_batch(batch)
            self.fixed_batch = {k: v[:n].detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stopped_early():
            return
        if self.rendered_at_step != trainer.global_step:  # the last step's samples may exist already
            self.render(trainer, pl_module)

    def _write(self, path: Path, frames: np.ndarray) -> Path:
        return write_bytes_atomic(path, encode_mp4(frames, self.fps))  # a reader (W&B, a person) never sees half a file

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module) -> Path | None:
        if self.fixed_batch is None:
            return None
        batch = {k: v.to(pl_module.device) for k, v in self.fixed_batch.items()}
        face = batch.get("face") if "face" in pl_module.conditions else None
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with sampling_weights(trainer, pl_module, self.weights):  # the EMA when the run keeps one
                generated = sample_clip(
                    pl_module.model, batch["reference"], batch["pose"], face, self.num_inference_steps, generator,
                    schedule=pl_module.schedule,
                )
        finally:
            pl_module.train(was_training)
        # From cached latents (data.latents) the ground truth is the VAE's reconstruction of their mean.
        truth = batch["video"] if "video" in batch else decode_cached(pl_module.model, batch["video_latents"])
        frames = np.concatenate(
            [side_by_side(batch["reference"][i], batch["pose"][i], generated[i], truth[i]) for i in range(generated.shape[0])],
            axis=1,
        )
        out_dir = Path(trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = self._write(out_dir / f"step{trainer.global_step:07d}_rank{trainer.global_rank}.mp4", frames)
        # The fixed batch's ground truth is the target clip: cheap fidelity metrics beside the video.
        metrics = validation_metrics(generated, truth, self.lpips_net, self.face_detector, prefix="val/")
        if trainer.world_size > 1:
            # Every rank renders its own share at the same step (same schedule on all ranks), then
            # all take part in the same collectives, so none waits on another that skipped them.
            shares = trainer.strategy.all_gather(torch.from_numpy(frames).to(pl_module.device))
            frames = torch.cat(list(shares.cpu()), dim=1).numpy()  # ranks stacked vertically
            metrics = {k: float(trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="mean"))
                       for k, v in metrics.items()}
            if trainer.global_rank == 0:
                path = self._write(out_dir / f"step{trainer.global_step:07d}.mp4", frames)
        self.last_video = path
        self.last_metrics = metrics
        self.rendered_at_step = trainer.global_step
        if trainer.global_rank == 0:
            step = logged_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=step)
                if hasattr(logger, "log_video"):
                    # A file path: W&B's raw-array route needs moviepy to re-encode what we already encoded.
                    logger.log_video("samples", [str(path)], step=step, format=["mp4"])
        return path


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: ``step N/max_steps``, starting at the resumed step.

    Lightning's bar counts the batches of an epoch; this loader's epochs have a fixed length per
    rank unrelated to ``max_steps``, and the run is step-bounded (``max_epochs=-1``), so it read
    ``Epoch 0/-2`` and ``40/32``.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("step")

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # epochs are the loader's business: the bar goes on counting steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class HoldForSignal(L.Callback):
    """TEST-ONLY (``debug.hold_after_step``): after optimizer step N of a job's first attempt,
    wait until some rank has received a preemption signal or Ctrl-C, then go on (the preemption
    handler saves and stops at the next step end).

    End-to-end preemption tests signal a job "mid-run"; with sleeps alone, a loaded machine can
    let the job finish first. Holding makes "the job is still running when it is signalled" true
    by construction. A requeued attempt (``SLURM_RESTART_COUNT`` > 0) never holds. The ranks agree
    through one all-reduce per poll; ``max_wait_s`` bounds the hold so a forgotten signal cannot
    hang a job for good.
    """

    def __init__(self, after_step: int, signals, poll_s: float = 0.1, max_wait_s: float = 3600.0):
        self.after_step = int(after_step)
        self.signals = signals
        self.poll_s = poll_s
        self.max_wait_s = max_wait_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.after_step or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        deadline = time.monotonic() + self.max_wait_s
        while not any_rank(self.signals.received is not None, trainer.strategy.root_device) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
