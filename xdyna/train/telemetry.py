"""Training telemetry, logged by rank 0 to every configured logger (W&B, CSV) and the progress bar.

Per logging interval (``trainer.log_every_n_steps``) and at the last step (``trainer.max_steps``):

- ``perf/samples_per_s``: samples of all ranks per wall second over the interval;
- ``perf/data_wait_fraction``: share of that wall time rank 0 spent waiting for its next batch
  (between the end of one step and the start of the next, where Lightning fetches the batch);
- ``perf/grad_norm``: global L2 norm of the trainable gradients before clipping (DeepSpeed:
  the engine's own global norm, since ZeRO shards the gradients);
- ``perf/peak_mem_gib``: peak CUDA memory allocated on this device, or the process's peak RSS on CPU;
- ``perf/mfu``: model FLOPs utilisation = training FLOPs per sample x samples/s /
  (``telemetry.peak_tflops`` x world size); FLOPs per sample come from
  :func:`xdyna.models.info.training_flops` (torch's FLOP counter on a meta-device copy of the
  model at the batch's shape: encoders, forward, backward of what trains, no recompute), counted once;
- ``perf/hfu``: the same with hardware FLOPs (activation checkpointing's recompute included:
  what the GPU executes; :func:`xdyna.models.info.training_flops_pair`);
- ``data/samples_drawn``, ``data/bad_samples``, ``data/bad_fraction``: rank 0's loader counters
  (bad samples are skipped by the loader; the run stops past ``data.max_bad_fraction``), and the
  same per data source as ``data/<source>/samples_drawn`` etc. (every key of ``loader.stats()``);
- ``data/fresh_shm_batches``: batches rank 0's workers sent in fresh shared memory because all
  their reusable buffers were still held (``data.shm_buffers``; 0 when all is well).

Loss and learning rate are logged by the module (``train/loss``) and Lightning's
LearningRateMonitor. A non-finite loss stops the run in :meth:`XDynaTrainingModule.training_step`.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch

GIB = 1024**3


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / GIB


def flops_per_sample(pl_module, batch: dict[str, Any]) -> dict[str, int]:
    """Training FLOPs of one sample of ``batch``'s shape, counted on meta-device models (no weight
    file is read): ``model`` (no recompute) and ``hardware`` (with activation recompute)."""
    from xdyna.models.info import training_flops_pair

    _, frames, _, height, width = batch["pose"].shape  # the clip's shape; no video in batches from latents
    # From cached latents (data.latents) no VAE encode runs: it is not counted (17 % of a stage-1
    # step at SD1.5 size, docs/performance.md).
    return training_flops_pair(pl_module.model_config, pl_module.trainable_components, pl_module.conditions,
                               frames, height, width, cached_latents="video_latents" in batch)


def logged_step(trainer) -> int:
    """The step under which Lightning writes what ``self.log`` gets during optimizer step
    ``trainer.global_step`` (its 0-based index; ``train/loss`` rows carry it). Metrics of that
    step handed straight to a logger use it too, so that they line up with the loss."""
    return max(trainer.global_step - 1, 0)


def mfu(flops_per_sample_: float, samples_per_s: float, peak_tflops: float, world_size: int) -> float:
    """Achieved model FLOP/s over the peak FLOP/s of all devices."""
    return flops_per_sample_ * samples_per_s / (peak_tflops * 1e12 * world_size)


class TrainingTelemetry(L.Callback):
    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = float(peak_tflops) if peak_tflops else None
        self.flops_per_sample: dict[str, int] | None = None
        self._interval_start: float | None = None
        self._wait_s = 0.0
        self._samples = 0
        self._batch_ready_at: float | None = None
        self._last_step_end: float | None = None
        self._grad_norm: float | None = None

    @staticmethod
    def _interval(trainer) -> int:
        # Lightning's own logging interval: it writes what is logged here in the same row (same
        # step) as the module's train/loss.
        return max(1, int(trainer.log_every_n_steps or 1))

    def on_train_start(self, trainer, pl_module) -> None:
        self._interval_start = self._last_step_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            self._wait_s += now - self._last_step_end
        if self.flops_per_sample is None and self.peak_tflops and trainer.is_global_zero:
            self.flops_per_sample = flops_per_sample(pl_module, batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        if grads:
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += int(batch["reference"].shape[0]) * trainer.world_size
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            norm = engine.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else None
        step = trainer.global_step
        now = time.perf_counter()
        last = 0 < trainer.max_steps <= step
        if last:
            # Lightning writes a step's logged values only every log_every_n_steps, or when
            # should_stop is set: the run stops after this step anyway, and so its last step (all
            # of a run shorter than the interval) gets its loss and telemetry row.
            trainer.should_stop = True
        if (step % self._interval(trainer) == 0 or last) and self._interval_start is not None:
            elapsed = max(now - self._interval_start, 1e-9)
            metrics = {
                "perf/samples_per_s": self._samples / elapsed,
                "perf/data_wait_fraction": min(1.0, self._wait_s / elapsed),
                "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
            }
            if self._grad_norm is not None:
                metrics["perf/grad_norm"] = self._grad_norm
            if self.flops_per_sample and self.peak_tflops:
                for key, kind in (("perf/mfu", "model"), ("perf/hfu", "hardware")):
                    metrics[key] = mfu(self.flops_per_sample[kind], metrics["perf/samples_per_s"], self.peak_tflops,
                                       trainer.world_size)
            loader = getattr(trainer.datamodule, "loader", None) if trainer.datamodule is not None else None
            if loader is not None and hasattr(loader, "stats"):
                metrics.update({f"data/{k}": float(v) for k, v in loader.stats().items()})
            # Through Lightning (rank 0's loggers write), so a row holds one step's loss and telemetry.
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
            self._interval_start, self._wait_s, self._samples = now, 0.0, 0
        # Measured after the logging above so its cost counts as step time, not data wait.
        self._last_step_end = time.perf_counter()
