"""Peak GPU memory of a training step, predicted on a CPU.

The step runs for real, at full size, on fake tensors (``FakeTensorMode``: shapes, dtypes and
storages, no data, no memory), the same code path as training (:func:`xdyna.models.info.run_training_step`):
VAE encode, reference pass, ControlNets, the video UNet, the loss, and backward with the configured
activation checkpointing (``torch.utils.checkpoint`` frees saved tensors and recomputes exactly as
it does on a GPU). :class:`LiveTensorMemory`, a ``TorchDispatchMode``, counts every storage an op
creates until the storage dies (a weak-reference finalizer), rounded to the CUDA caching
allocator's 512-byte blocks, and records the peak: no shape arithmetic anywhere.

Two things differ between a CPU and a GPU and are handled explicitly:

* attention: the fake CPU tensors take the CPU flash-attention kernel (saves the output and the
  log-sum-exp, like CUDA's flash/memory-efficient kernels), not the math path;
* autocast: CPU autocast runs GroupNorm, LayerNorm and a few pointwise ops in bf16 where CUDA
  autocast runs them in float32 (and so saves float32 copies for backward).
  :func:`cuda_autocast_policy` registers CUDA's float32 list (``AT_FORALL_FP32`` in
  ``aten/src/ATen/autocast_mode.h``) as the AutocastCPU kernels while the prediction runs.

What the fake run cannot see is reported as a stated allowance: kernel workspaces (cuBLAS, cuDNN)
and the caching allocator's block splitting. Optimizer states come from the ZeRO accounting of
:func:`xdyna.models.info.model_state_memory`.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from functools import partial
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError
from .activation_checkpointing import POLICIES, apply_activation_checkpointing, resolve_policy
from .config import ModelConfig
from .xdyna_model import XDynaModel

GIB = 1024**3
# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
CUDA_BLOCK_BYTES = 512
# Stated allowance for what tensors do not show: cuBLAS/cuDNN workspaces and allocator block
# splitting (a large block is not split when less than 1 MiB would remain).
WORKSPACE_BYTES = GIB

# CUDA autocast's float32 ops (AT_FORALL_FP32, aten/src/ATen/autocast_mode.h, torch 2.x).
CUDA_AUTOCAST_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
)
ENGINES = ("ddp", "zero2", "zero3")


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive right now, and the peak, for everything created inside.

    A storage counts from the op that creates it until it is garbage (weak-reference finalizer),
    rounded up to ``block`` bytes. ``existing`` tensors (weights, buffers) are known beforehand:
    ops that return views of them (``weight.t()``, ``expand``) allocate nothing. The peak is kept
    per ``phase`` (set by the caller)."""

    def __init__(self, block: int = CUDA_BLOCK_BYTES, existing=()):
        super().__init__()
        self.block = block
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self.at_phase_start: dict[str, int] = {}
        self._sizes = WeakIdKeyDictionary()
        for tensor in existing:
            self._sizes[tensor.untyped_storage()] = [-1]  # never counted, never resized by the step

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.at_phase_start.setdefault(phase, self.current)

    def _release(self, box: list[int]) -> None:
        self.current -= box[0]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        size = -(-storage.nbytes() // self.block) * self.block
        box = self._sizes.get(storage)
        if box is None:
            box = [size]
            self._sizes[storage] = box
            weakref.finalize(storage, self._release, box)
            self.current += size
        elif box[0] < 0:
            return
        elif box[0] != size:  # resized in place
            self.current += size - box[0]
            box[0] = size
        else:
            return
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def _in_float32(op, *args, **kwargs):
    def upcast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t

    args, kwargs = tree_map_only(torch.Tensor, upcast, (args, kwargs))
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return op(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """CPU autocast with CUDA's float32 list: the AutocastCPU kernels of those ops cast their
    inputs to float32, as AutocastCUDA's do. Only while the context is open."""
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" (CPU's own fp32 entries)
            for name in CUDA_AUTOCAST_FP32:
                packet, _, overload = name.partition(".")
                if not hasattr(torch.ops.aten, packet):
                    continue
                library.impl(name, partial(_in_float32, getattr(getattr(torch.ops.aten, packet), overload or "default")), "AutocastCPU")
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def _real_constants(fake_mode: FakeTensorMode) -> Iterator[None]:
    """Constant tables built from data-dependent ops (the image prompt's Pillow resampling matrix:
    ``nonzero``, ``int(tensor)``) are computed for real and handed to the fake run as fake tensors
    (fake tensors carry no values to build them from)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from . import image_prompt

    original = image_prompt.pil_bicubic_matrix

    def real(*args, **kwargs):
        with unset_fake_temporarily():
            table = original(*args, **kwargs)
        return fake_mode.from_tensor(table)

    image_prompt.pil_bicubic_matrix = real
    try:
        yield
    finally:
        image_prompt.pil_bicubic_matrix = original


def _fake_copy(model: torch.nn.Module, fake_mode: FakeTensorMode, dtype: torch.dtype | None) -> None:
    """Replace the (meta) parameters and buffers of ``model`` by fake CPU tensors, floating ones
    cast to ``dtype`` when given (DeepSpeed casts the whole module). Shared tensors stay shared."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            target = dtype if dtype is not None and t.is_floating_point() else t.dtype
            with fake_mode:
                made[id(t)] = torch.empty(t.shape, dtype=target, device="cpu")
        return made[id(t)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(fake(param), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = fake(buffer)


def _half_dtype(precision: str) -> torch.dtype | None:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("32") or precision.startswith("64"):
        return None
    raise ConfigError(f"precision {precision!r}: expected 32-true, bf16-mixed, bf16-true, 16-mixed or 16-true")


def step_memory(
    model_config: ModelConfig,
    trainable: list[str],
    conditions: list[str],
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    precision: str = "bf16-mixed",
    engine: str = "ddp",
    checkpointing: Any = None,
    autocast_policy: str = "cuda",
    block: int = CUDA_BLOCK_BYTES,
) -> dict[str, Any]:
    """Bytes of one training step on one GPU, from a fake-tensor run at full size.

    ``engine``: ``ddp`` (plain torch / DDP: float32 weights, autocast for ``*-mixed``) or
    ``zero2``/``zero3`` (DeepSpeed: the module cast to the half dtype, no autocast).
    ``checkpointing``: a policy or kinds list (:func:`resolve_policy`); None keeps the config's.
    ``autocast_policy``: ``cuda`` (a GPU's float32 list) or ``cpu`` (CPU autocast as it is, to
    compare with real CPU runs); ``block``: allocation granularity (1: exact bytes, as on a CPU).
    Returns the weights (all, replicated), the step's peak of activations + gradients +
    temporaries, per phase, and the gradients alive at the end."""
    from . import build_model
    from .info import run_training_step, sizing_config

    if autocast_policy not in ("cuda", "cpu"):
        raise ConfigError(f"autocast_policy {autocast_policy!r}: cuda or cpu")
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {ENGINES}")
    for name, value in (("batch", batch), ("frames", frames)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    half = _half_dtype(precision)
    policy_value = model_config.activation_checkpointing if checkpointing is None else checkpointing
    policy, kinds = resolve_policy(policy_value, model_config.gradient_checkpointing)
    # The policy is applied here (not by the build), so an explicit ``checkpointing`` replaces the config's.
    config = sizing_config(model_config, gradient_checkpointing=policy == "diffusers", activation_checkpointing=None)
    model = build_model(config, device="meta")
    model.set_trainable(trainable)
    # A policy name covers the networks this variant has; an explicit list must name existing ones.
    wrapped = apply_activation_checkpointing(model, policy if policy in POLICIES else list(kinds)) if policy != "diffusers" else {}
    model.train()

    casts_module = half is not None and (engine != "ddp" or precision.endswith("-true"))
    autocast = half is not None and not casts_module
    fake_mode = FakeTensorMode()
    _fake_copy(model, fake_mode, half if casts_module else None)
    weights = sum(_rounded(t, block) for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())

    tracker = LiveTensorMemory(block, existing=[*model.parameters(), *model.buffers()])

    def around(phase, function, *args, **kwargs):
        tracker.set_phase(phase)
        return function(*args, **kwargs)

    def forward_context():
        if not autocast:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=half)

    policy_context = cuda_autocast_policy() if autocast and autocast_policy == "cuda" else contextlib.nullcontext()
    with fake_mode, _real_constants(fake_mode), policy_context, tracker:
        run_training_step(model, conditions, frames, height, width, batch=batch,
                          dtype=half if casts_module else torch.float32, forward_context=forward_context, around=around)
    gradients = sum(_rounded(p.grad, block) for p in model.parameters() if p.grad is not None)
    return {
        "batch": batch, "frames": frames, "height": height, "width": width,
        "precision": precision, "engine": engine, "checkpointing": policy, "checkpointed_kinds": list(wrapped),
        "weights_bytes": weights,
        "step_peak_bytes": tracker.peak,
        "phase_peak_bytes": dict(tracker.phase_peaks),
        "saved_for_backward_bytes": tracker.at_phase_start.get("backward", 0),
        "gradient_bytes": gradients,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def vae_encode_memory(model_config: ModelConfig, frames: int, height: int, width: int, batch: int = 1,
                      dtype: torch.dtype = torch.float32, fake: bool = True, block: int = CUDA_BLOCK_BYTES) -> dict[str, int]:
    """Peak bytes of the frozen VAE encode of a ``(batch, frames)`` clip (``model.encode_video``:
    chunks of ``vae_chunk_size`` frames under no_grad), above the weights and the input video,
    counted by :class:`LiveTensorMemory`. ``fake``: on fake tensors at any size (no data, no
    memory; the VAE alone is built, in ``dtype``); else for real on the CPU in float32 (small
    sizes, to check the fake run).
    Returns the peak, the latents' bytes (what the encode hands on), the bytes still alive after
    it (the latents alone when nothing else is kept) and whether the latents carry an autograd
    graph (the VAE's own parameters require grad here, as a freshly built module's do)."""
    from diffusers import AutoencoderKL

    from .flavours import get_flavour

    with torch.device("meta" if fake else "cpu"):
        vae = AutoencoderKL(**get_flavour(model_config.flavour).vae)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    if fake:
        _fake_copy(vae, fake_mode, dtype)
    with fake_mode:
        video = torch.zeros(batch, frames, 3, height, width, dtype=dtype)
    # The model's own encode path (chunking, no_grad, posterior sample, scaling), on a stand-in
    # that holds nothing but the VAE and the config.
    holder = _VAEOnly(vae, model_config)
    tracker = LiveTensorMemory(block, existing=[*vae.parameters(), *vae.buffers(), video])
    with fake_mode, tracker:
        latents = holder.encode_video(video)
    return {"peak_bytes": tracker.peak, "latents_bytes": _rounded(latents, block), "alive_after_bytes": tracker.current,
            "vae_chunk_size": model_config.vae_chunk_size, "has_graph": latents.grad_fn is not None}


class _VAEOnly(torch.nn.Module):
    """The model's own encode path (chunking, no_grad, posterior sample, scaling) over the VAE alone."""

    vae_scale = XDynaModel.vae_scale
    encode_images = XDynaModel.encode_images
    encode_video = XDynaModel.encode_video

    def __init__(self, vae: torch.nn.Module, config: ModelConfig):
        super().__init__()
        self.vae, self.config = vae, config


def _rounded(t: torch.Tensor, block: int) -> int:
    return -(-t.untyped_storage().nbytes() // block) * block


def optimizer_bytes(trainable: int, engine: str, world_size: int, precision: str) -> int:
    """Adam state per GPU: two float32 moments per trainable parameter, plus DeepSpeed's float32
    master copy in half precision; sharded over ``world_size`` under ZeRO."""
    if engine == "ddp":
        return trainable * 8
    master = 4 if _half_dtype(precision) is not None else 0
    return trainable * (8 + master) // world_size


def predict_peak(*step_args, world_size: int = 1, with_optimizer: bool = True, **step_kwargs) -> dict[str, Any]:
    """Predicted peak GPU memory of one training step (``max_memory_allocated`` terms): weights +
    the fake run's peak of activations, gradients and temporaries (:func:`step_memory`, which
    takes the other arguments) + Adam state (per engine and ``world_size``) +
    :data:`WORKSPACE_BYTES`. ``with_optimizer=False``: a bare forward/backward (as
    ``tools/benchmarks/bench_model_step.py`` measures).

    Conservative where ZeRO shards gradients (ZeRO-2/3 at world size > 1 reduce them bucket by
    bucket; here every rank holds the full gradients at the end of backward), and ZeRO-3 weights
    are counted replicated (the gathered layers' working set is not modelled)."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    step = step_memory(*step_args, **step_kwargs)
    engine, precision = step["engine"], step["precision"]
    trainable_count = step.pop("trainable_parameters")
    optimizer = optimizer_bytes(trainable_count, engine, world_size, precision) if with_optimizer else 0
    tensors = step["weights_bytes"] + step["step_peak_bytes"] + optimizer
    # The optimizer step itself (no activations): DeepSpeed makes a float32 copy of its gradient partition.
    fp32_grads = trainable_count * 4 // world_size if with_optimizer and engine != "ddp" else 0
    optimizer_step = step["weights_bytes"] + step["gradient_bytes"] + optimizer + fp32_grads
    peak = max(tensors, optimizer_step) + WORKSPACE_BYTES
    return {
        **step,
        "world_size": world_size,
        "optimizer_bytes": optimizer,
        "forward_backward_peak_bytes": tensors,
        "optimizer_step_peak_bytes": optimizer_step,
        "tensor_peak_bytes": max(tensors, optimizer_step),
        "workspace_allowance_bytes": WORKSPACE_BYTES,
        "peak_bytes": peak,
    }


def parse_bytes(text: str) -> int:
    """``80GiB``, ``40GB`` (read as GiB: GPU memory is sold in binary units), ``24G``, ``512MiB``."""
    units = {"gib": GIB, "gb": GIB, "g": GIB, "mib": 2**20, "mb": 2**20, "m": 2**20}
    cleaned = text.strip().lower().replace(" ", "")
    for suffix, scale in units.items():
        if cleaned.endswith(suffix):
            try:
                value = float(cleaned[: -len(suffix)])
            except ValueError:
                break
            if value > 0:
                return int(value * scale)
    raise ConfigError(f"memory size {text!r}: expected a positive number with a unit, e.g. 80GiB, 40GB or 24G")


# Policies tried by fit(), cheapest recompute first.
FIT_POLICIES = ("none", "diffusers", "all")


def _largest(predict, start: int, limit: int) -> tuple[int, dict | None]:
    """Largest ``n`` in ``[1, limit]`` with ``predict(n)`` fitting (``predict`` returns the report
    or None). Peak memory grows linearly with the batch and about linearly with the frames: two
    runs give the slope, the estimate is then confirmed by runs (stepping down while it fails)."""
    first = predict(start)
    if first is None:
        return 0, None
    second = predict(start + 1) if start + 1 <= limit else None
    if second is None:
        return start, first
    slope = second["peak_bytes"] - first["peak_bytes"]
    if slope <= 0:
        return start + 1, second
    estimate = start + int((second["budget"] - first["peak_bytes"]) // slope)
    n = max(start + 1, min(limit, estimate))
    while n > start + 1:
        report = predict(n)
        if report is not None:
            return n, report
        n -= 1
    return start + 1, second


def fit(
    target_bytes: int,
    model_config: ModelConfig,
    trainable: list[str],
    conditions: list[str],
    frames: int,
    height: int,
    width: int,
    precision: str = "bf16-mixed",
    engine: str = "zero2",
    world_size: int = 1,
    policies: tuple[str, ...] = FIT_POLICIES,
    max_batch: int = 64,
    max_frames: int = 256,
    frame_step: int = 8,
    cache: dict | None = None,
) -> dict[str, Any]:
    """For each checkpointing policy: the largest micro-batch at ``frames`` and the largest frame
    count (multiples of ``frame_step``) at micro-batch 1 whose predicted peak fits ``target_bytes``.
    Names the least recompute that fits the configured sample, and the policy reaching the most.
    ``cache``: predictions by (policy, batch, frames), shared between calls for several targets."""
    from .flavours import get_flavour

    cache = {} if cache is None else cache
    # The motion modules' positional table bounds the frames of one sample.
    max_frames = min(max_frames, int(get_flavour(model_config.flavour).motion_adapter.get("motion_max_seq_length", 32)))
    rows = []
    for policy in policies:
        def predicted(batch: int, n_frames: int) -> dict | None:
            key = (policy, batch, n_frames)
            if key not in cache:
                cache[key] = predict_peak(model_config, trainable, conditions, n_frames, height, width, batch=batch,
                                          precision=precision, engine=engine, world_size=world_size, checkpointing=policy)
            report = {**cache[key], "budget": target_bytes}
            return report if report["peak_bytes"] <= target_bytes else None

        batch, at_batch = _largest(lambda b: predicted(b, frames), 1, max_batch)
        frame_units, at_frames = _largest(lambda k: predicted(1, k * frame_step), 1, max_frames // frame_step)
        rows.append({
            "checkpointing": policy,
            "max_micro_batch": batch, "peak_GiB_at_max_micro_batch": at_batch and round(at_batch["peak_bytes"] / GIB, 2),
            "max_frames": frame_units * frame_step, "peak_GiB_at_max_frames": at_frames and round(at_frames["peak_bytes"] / GIB, 2),
        })
    fits = [row for row in rows if row["max_micro_batch"] >= 1]
    return {
        "target_GiB": round(target_bytes / GIB, 2),
        "frames": frames, "height": height, "width": width, "precision": precision, "engine": engine,
        "world_size": world_size,
        "policies": rows,
        "cheapest_fitting_policy": fits[0]["checkpointing"] if fits else None,
        "largest_micro_batch": max(rows, key=lambda row: row["max_micro_batch"]) if fits else None,
        "largest_frames": max(rows, key=lambda row: row["max_frames"]) if any(r["max_frames"] for r in rows) else None,
    }
