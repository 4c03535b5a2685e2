"""Exponential moving average (EMA) of the trainable parameters only (config group ``ema``).

Why not Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` (Lightning 2.6): it wraps the
whole LightningModule in ``torch.optim.swa_utils.AveragedModel``, which deep-copies every
parameter and buffer, the frozen SD1.5 UNet, VAE and image encoder included (gigabytes that never
change); under ZeRO-3 the copy is of DeepSpeed's empty placeholders (``param.data`` is a 0-element
tensor, the values live in ``param.ds_tensor``), so it averages nothing; it saves by replacing
``checkpoint["state_dict"]``, which the DeepSpeed strategy never passes (the shards hold the
weights), and it copies the average over the raw weights at the end of training, so the
checkpoint written last would no longer hold the weights the optimizer trained.

What is kept here instead: one fp32 tensor per ``requires_grad`` parameter, updated with
torch's own EMA rule (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`, a fused lerp).

Where it lives: under DDP, one device and ZeRO-1/2 (parameters replicated on every rank) each
rank keeps a full fp32 copy of the trainable parameters; under ZeRO-3 each rank keeps the EMA of
its own partition of every trainable parameter (``param.ds_tensor``), 1/world of the bytes.
:func:`ema_bytes_per_rank` gives the figure.

Schedule: after optimizer step ``s`` (``trainer.global_step``, 1 after the first step) the EMA is
updated when ``s >= start_step`` and ``(s - start_step) % every_n_steps == 0``. The first update
copies the parameters; each later one is ``ema = decay * ema + (1 - decay) * param``.

Checkpoints carry it under the top-level key ``"ema"`` (rank 0 writes it: under ZeRO-3 the
partitions are gathered into whole tensors first), so a resume, on any world size, restores it
exactly and ``xdyna-export`` writes it as ``<component>.ema.safetensors``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..checkpoint_io import EMA_CHECKPOINT_KEY as CHECKPOINT_KEY
from ..errors import ConfigError
from .ema_config import FP32_BYTES, EMAConfig, check_sample_weights, ema_bytes_per_rank

__all__ = ["CHECKPOINT_KEY", "EMACallback", "EMAConfig", "ema_bytes_per_rank", "sampling_weights"]


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: its values live in ``ds_tensor``, one partition per rank."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def _partition_group(param: torch.nn.Parameter):
    return getattr(param, "ds_process_group", None)


def _local(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's values of ``param``: the whole tensor, or its flat ZeRO-3 partition."""
    return param.ds_tensor if _is_partitioned(param) else param.data


def _partition_of(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's slice of a whole tensor, laid out as ``param.ds_tensor`` (flat, zero-padded)."""
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=_partition_group(param))
    flat = full.reshape(-1)[start:start + size]
    out = torch.zeros(size, dtype=torch.float32)
    out[:flat.numel()] = flat
    return out


def _gather_whole(local: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The whole tensor from every rank's partition (a collective: all ranks call it)."""
    group = _partition_group(param)
    # NCCL moves CUDA tensors only; with ZeRO-3 parameter offload the partitions live on the CPU.
    if dist.get_backend(group) == "nccl" and local.device.type != "cuda":
        return _gather_whole(local.cuda(), param).to(local.device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)[:param.ds_numel].reshape(param.ds_shape)


class EMACallback(L.Callback):
    """Keeps, saves and restores the EMA of ``pl_module``'s trainable parameters (see the module
    docstring). ``weights()`` gives whole tensors; ``applied(pl_module)`` swaps the EMA in for the
    duration of a block (sample videos)."""

    def __init__(self, config: EMAConfig | Mapping[str, Any] | None):
        self.config = config if isinstance(config, EMAConfig) else EMAConfig.from_mapping(config)
        if not self.config.enabled:
            raise ConfigError("EMACallback needs ema.decay (null switches the EMA off: add no callback)")
        self._avg = get_ema_multi_avg_fn(float(self.config.decay))
        self.ema: dict[str, torch.Tensor] | None = None  # name -> fp32, this rank's layout
        self.updates = 0
        self.last_step = 0
        self._loaded: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "XDynaEMA"

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def trainable(pl_module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def _materialise_loaded(self, pl_module) -> None:
        """A checkpoint's whole tensors -> this rank's layout (its partition under ZeRO-3)."""
        state, self._loaded = self._loaded, None
        if state is None:
            return
        self.updates, self.last_step = int(state["updates"]), int(state["last_step"])
        weights = state.get("weights")
        if weights is None:
            self.ema = None
            return
        params = self.trainable(pl_module)
        if set(weights) != set(params):
            missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise ConfigError(f"the checkpoint's EMA does not match the trainable parameters (missing {missing[:3]}, "
                              f"not trainable {extra[:3]}): resume with the stage that wrote it")
        self.ema = {}
        for name, param in params.items():
            whole = weights[name].float()
            local = _partition_of(whole, param) if _is_partitioned(param) else whole.reshape(param.shape).clone()
            self.ema[name] = local.to(_local(param).device)

    def update(self, pl_module) -> None:
        params = self.trainable(pl_module)
        if self.ema is None:  # the first update copies
            self.ema = {name: _local(p).detach().float().clone() for name, p in params.items()}
        else:
            names = list(self.ema)
            self._avg([self.ema[n] for n in names], [_local(params[n]).detach().float() for n in names], self.updates)
        self.updates += 1

    # ------------------------------------------------------------------ training hooks
    def local_bytes(self, pl_module) -> int:
        """Bytes of EMA state on this rank (fp32 of its layout), whether or not it has started."""
        return FP32_BYTES * sum(_local(p).numel() for p in self.trainable(pl_module).values())

    def on_train_start(self, trainer, pl_module) -> None:
        self._materialise_loaded(pl_module)  # ZeRO-3 partitions exist only once the engine is built
        partitioned = any(_is_partitioned(p) for p in self.trainable(pl_module).values())
        rank_zero_info(f"EMA of the trainable weights: decay {self.config.decay}, from step {self.config.start_step} "
                       f"every {self.config.every_n_steps}; {self.local_bytes(pl_module):,} B fp32 on each rank "
                       f"({'its ZeRO-3 partition' if partitioned else 'a full copy'})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps done; several micro-batches share one
        if step > self.last_step:
            self.last_step = step
            if self.config.due(step):
                self.update(pl_module)

    # ------------------------------------------------------------------ whole tensors
    def weights(self, pl_module) -> dict[str, torch.Tensor] | None:
        """Whole fp32 EMA tensors on CPU (a collective under ZeRO-3: every rank calls it)."""
        if self._loaded is not None:
            self._materialise_loaded(pl_module)
        if self.ema is None:
            return None
        params = self.trainable(pl_module)
        return {name: (_gather_whole(local, params[name]) if _is_partitioned(params[name]) else local).detach().cpu().clone()
                for name, local in self.ema.items()}

    @contextlib.contextmanager
    def applied(self, pl_module) -> Iterator[bool]:
        """Within the block the trainable parameters hold the EMA (yields False, and changes
        nothing, before its first update); the raw values are put back after."""
        if self._loaded is not None:
            self._materialise_loaded(pl_module)
        if self.ema is None:
            yield False
            return
        params = self.trainable(pl_module)
        saved = {}
        with torch.no_grad():
            for name, ema in self.ema.items():
                param = params[name]
                local = _local(param)
                saved[name] = local.clone()
                local.copy_(ema.to(local.dtype))
                if _is_partitioned(param) and param.data.numel() == param.ds_numel:
                    # A ZeRO-3 parameter DeepSpeed keeps gathered (persistent): its whole copy too.
                    param.data.copy_(_gather_whole(ema, param).to(param.dtype))
        try:
            yield True
        finally:
            with torch.no_grad():
                for name, raw in saved.items():
                    param = params[name]
                    _local(param).copy_(raw)
                    if _is_partitioned(param) and param.data.numel() == param.ds_numel:
                        param.data.copy_(_gather_whole(raw, param).to(param.dtype))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": self.config.to_dict(),
            "updates": self.updates,
            "last_step": self.last_step,
            "weights": self.weights(pl_module),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            # A checkpoint from before the EMA was switched on: the EMA starts at the next due step.
            self.ema, self.updates, self._loaded = None, 0, None
            self.last_step = int(checkpoint.get("global_step", 0))
            return
        self._loaded = state


def sampling_weights(trainer, pl_module, which: str = "ema"):
    """Context in which ``pl_module`` samples with ``which`` weights: ``"ema"`` swaps in the
    trainer's EMA when it keeps one that has started (else the raw weights are used); ``"raw"``
    changes nothing."""
    check_sample_weights(which)
    callback = next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)
    if which == "raw" or callback is None:
        return contextlib.nullcontext(False)
    return callback.applied(pl_module)
