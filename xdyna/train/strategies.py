"""Distributed strategies for ``trainer.strategy`` configs (``conf/trainer/strategy/*.yaml``).

``make_strategy(kind=...)`` is the one constructor every strategy config targets:

- ``auto``: Lightning's choice (one device, or DDP for several);
- ``ddp``: plain data parallel, frozen parameters excluded from gradient sync;
- ``deepspeed``: ZeRO stage 2 (default for GPUs) or 3, optional optimizer/parameter CPU
  offload, on CUDA through :class:`XDynaDeepSpeedStrategy` (Lightning's stock strategy plus
  atomic checkpoint commits);
- ``deepspeed_cpu``: **the CPU/gloo test path** (:class:`CPUDeepSpeedStrategy`): the same real
  DeepSpeed ZeRO code on CPU processes, so CI exercises sharded optimizer states, sharded
  checkpoints and resume without a GPU. Not meant for training runs.

Frozen Stable Diffusion weights never reach DeepSpeed's optimizer (Lightning hands it only
``requires_grad`` parameters) and ``exclude_frozen_parameters`` keeps them out of checkpoints;
the LightningModule must then load non-strictly (``strict_loading = False``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.strategies.ddp import DDPStrategy as _DDPParent

from xdyna.train import checkpointing, elastic

log = logging.getLogger(__name__)

STRATEGY_KINDS = ("auto", "ddp", "deepspeed", "deepspeed_cpu")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints (DDP, one device) written to a temp file and renamed into place.

    Lightning calls it on global rank 0 only; it also moves the ``latest`` pointer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        checkpointing.save_file_atomic(checkpoint, path)


class XDynaDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy whose sharded checkpoint directories are committed atomically.

    Every rank writes its shards into a hidden temporary directory; rank 0 renames it to the
    final name after a barrier and then updates the ``latest`` pointer (see
    :mod:`xdyna.train.checkpointing`).

    ``zero3`` holds ZeRO-3 settings Lightning does not expose (``stage3_*`` keys of DeepSpeed's
    ``zero_optimization`` config, e.g. ``stage3_max_reuse_distance``); they are merged into the
    config Lightning builds.
    """

    strategy_name = "xdyna_deepspeed"

    def __init__(self, *args: Any, zero3: dict[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in (zero3 or {}).items():
            if not key.startswith("stage3_"):
                raise ValueError(f"trainer.strategy.zero3 takes DeepSpeed's stage3_* keys, got {key!r}")
            self.config["zero_optimization"][key] = value

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        filepath = self.broadcast(str(filepath))
        parent_save = super().save_checkpoint
        checkpointing.save_directory_checkpoint(
            filepath,
            lambda tmp_dir: parent_save(checkpoint, tmp_dir),
            is_global_zero=self.is_global_zero,
            broadcast=self.broadcast,
            barrier=self.barrier,
            metadata={
                "global_step": checkpoint.get("global_step"),
                "epoch": checkpoint.get("epoch"),
                "world_size": self.world_size,
                "zero_stage": (self.config or {}).get("zero_optimization", {}).get("stage"),
            },
            provenance=checkpoint.get("provenance"),
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if self.load_full_weights:
            return super().load_checkpoint(checkpoint_path, weights_only)
        if not checkpointing.is_complete(checkpoint_path):
            raise checkpointing.CheckpointError(
                f"{checkpoint_path} is not a complete checkpoint directory (no {checkpointing.COMPLETE_MARKER} marker)"
            )
        # Written on another world size: its ZeRO shards are re-sliced through DeepSpeed's universal
        # checkpoint (converted once beside it, see xdyna.train.elastic).
        universal = elastic.ensure_universal(checkpoint_path, self.world_size, is_global_zero=self.is_global_zero,
                                             broadcast=self.broadcast, barrier=self.barrier)
        if universal is None:
            return super().load_checkpoint(checkpoint_path, weights_only)
        # DeepSpeed's `"checkpoint": {"load_universal": true}`, for this load only: the engine
        # exists before Lightning restores, and a later load on the same world size (none today)
        # must read the sharded format again.
        engine_config = self.deepspeed_engine._config
        previous = engine_config.load_universal_checkpoint
        engine_config.load_universal_checkpoint = True
        try:
            return super().load_checkpoint(universal, weights_only)
        finally:
            engine_config.load_universal_checkpoint = previous


class CPUDeepSpeedStrategy(XDynaDeepSpeedStrategy):
    """CPU/TEST PATH ONLY: real DeepSpeed ZeRO on CPU processes talking gloo.

    Lightning's strategy refuses any accelerator but CUDA. DeepSpeed itself runs on CPU (its
    accelerator "cpu", gloo, fp32 or bf16), so three CUDA assumptions are lifted here: the CUDA
    check in ``setup_environment``, the CUDA device-index validation in ``setup_distributed``,
    and ``root_device`` (DeepSpeed reads a device index from it). CUDA runs use
    :class:`XDynaDeepSpeedStrategy`.
    """

    strategy_name = "xdyna_deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's "only supported on CUDA GPUs" check, keep DDP's setup.
        _DDPParent.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed minus the CUDA device-index validation.
        reset_seed()
        self.set_world_ranks()
        use_environment_ninja()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def use_environment_ninja(environ=os.environ) -> None:
    """Put this Python environment's ``ninja`` first on PATH (inherited by the ranks it launches).

    On CPU, DeepSpeed's process-group setup JIT-builds its shared-memory comm op through torch's
    cpp_extension, which runs whichever ``ninja`` PATH names into a build folder shared by every
    environment of the user (~/.cache/torch_extensions). Two ninja versions (the pip one beside
    this interpreter, installed with deepspeed, and a system one) hash the same build commands
    differently, so processes started with and without the environment's bin/ on PATH (an
    activated shell, a test's subprocess, a SLURM step) each take the other's build for stale and
    recompile it: 1-2 CPU-minutes per rank, the other ranks blocked on the build lock meanwhile.
    One ninja per environment builds once."""
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "ninja")):
        return
    entries = environ.get("PATH", "").split(os.pathsep)
    if entries[:1] != [bin_dir]:
        environ["PATH"] = os.pathsep.join([bin_dir, *(entry for entry in entries if entry and entry != bin_dir)])


def _deepspeed_kwargs(
    zero_stage: int,
    offload_optimizer: bool,
    offload_parameters: bool,
    exclude_frozen_parameters: bool,
    reduce_bucket_size: int,
    allgather_bucket_size: int,
    zero3: dict[str, int] | None,
) -> dict[str, Any]:
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage}")
    if offload_parameters and zero_stage != 3:
        raise ValueError("offload_parameters needs zero_stage=3 (ZeRO-Infinity); use offload_optimizer with stage 2")
    return dict(
        stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        exclude_frozen_parameters=exclude_frozen_parameters,
        reduce_bucket_size=reduce_bucket_size,
        allgather_bucket_size=allgather_bucket_size,
        zero3=dict(zero3 or {}) if zero_stage == 3 else {},
        logging_level=logging.WARN,
    )


def make_strategy(
    kind: str = "auto",
    *,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    exclude_frozen_parameters: bool = True,
    reduce_bucket_size: int = 200_000_000,
    allgather_bucket_size: int = 200_000_000,
    zero3: dict[str, int] | None = None,
    find_unused_parameters: bool = False,
    process_group_backend: str | None = None,
) -> Strategy | str:
    """Build the strategy a ``conf/trainer/strategy`` config describes (``kind`` in :data:`STRATEGY_KINDS`)."""
    if kind == "auto":
        return "auto"
    if kind == "ddp":
        return DDPStrategy(
            find_unused_parameters=find_unused_parameters,
            process_group_backend=process_group_backend,
            checkpoint_io=AtomicCheckpointIO(),
        )
    if kind in ("deepspeed", "deepspeed_cpu"):
        kwargs = _deepspeed_kwargs(
            zero_stage, offload_optimizer, offload_parameters, exclude_frozen_parameters,
            reduce_bucket_size, allgather_bucket_size, zero3,
        )
        if process_group_backend is not None:
            kwargs["process_group_backend"] = process_group_backend
        cls = CPUDeepSpeedStrategy if kind == "deepspeed_cpu" else XDynaDeepSpeedStrategy
        return cls(**kwargs)
    raise ValueError(f"unknown strategy kind {kind!r}; expected one of {', '.join(STRATEGY_KINDS)}")


def uses_deepspeed(strategy: Strategy | str) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def checkpoint_plugins(strategy: Strategy | str) -> list:
    """Trainer plugins that make non-DeepSpeed checkpoints atomic too (DeepSpeed does its own)."""
    if isinstance(strategy, (DeepSpeedStrategy, DDPStrategy)):
        return []
    return [AtomicCheckpointIO()]
