"""Sizing a training job before it is queued: parameters, FLOPs and model-state memory.

Everything is computed on the meta device (shapes only, no weights, no memory), so the full
SD1.5-size model at 16 frames of 896x512 is sized in seconds on a laptop.

FLOPs are counted with torch's ``FlopCounterMode`` while the real training step runs on meta
tensors (VAE and image encoders, reference pass, ControlNets, the video UNet, backward), so the
count follows the code, not a formula. :func:`analytic_forward_flops` is an independent count from
module shapes (convolutions, linear layers, attention products) used to check it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from . import build_model
from .config import ModelConfig
from .flavours import get_flavour
from .xdyna_model import COMPONENTS, FROZEN_PARTS, XDynaModel

GIB = 1024**3

# Bytes per parameter of model state. DDP with torch autocast keeps fp32 weights and gradients;
# DeepSpeed in bf16/fp16 stores half weights and gradients plus an fp32 master copy. Adam keeps
# two fp32 moments per trainable parameter.
_ADAM_MOMENTS = 8


def _state_bytes(precision: str, sharded_engine: bool) -> dict[str, int]:
    half = precision.startswith(("bf16", "16"))
    if sharded_engine and half:
        return {"weight": 2, "grad": 2, "optimizer": 4 + _ADAM_MOMENTS}
    return {"weight": 4, "grad": 4, "optimizer": _ADAM_MOMENTS}


def model_state_memory(trainable: int, frozen: int, world_size: int, precision: str = "bf16-mixed") -> dict[str, Any]:
    """Model-state bytes per GPU (weights, gradients, Adam states; no activations, no buffers)
    under DDP, ZeRO-2 and ZeRO-3 for ``world_size`` GPUs (the ZeRO paper's accounting)."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    ddp = _state_bytes(precision, sharded_engine=False)
    zero = _state_bytes(precision, sharded_engine=True)
    per_trainable_zero = zero["weight"] + zero["grad"] + zero["optimizer"]
    layouts = {
        # Everything replicated.
        "ddp": frozen * ddp["weight"] + trainable * (ddp["weight"] + ddp["grad"] + ddp["optimizer"]),
        # Gradients and optimizer states sharded, weights replicated.
        "zero2": (frozen + trainable) * zero["weight"] + trainable * (zero["grad"] + zero["optimizer"]) / world_size,
        # Everything sharded (DeepSpeed partitions the frozen weights of the wrapped module too).
        "zero3": (frozen * zero["weight"] + trainable * per_trainable_zero) / world_size,
    }
    out: dict[str, Any] = {"world_size": world_size, "precision": precision,
                           "bytes_per_parameter": {"ddp": ddp, "zero": zero}}
    for name, total in layouts.items():
        out[name] = {"bytes": int(total), "GiB": round(total / GIB, 3)}
    # An EMA of the trainable weights (stage.ema.decay set; xdyna/train/ema.py) adds fp32 per
    # trainable weight: a full copy on each rank under DDP and ZeRO-2, each rank its share under ZeRO-3.
    from ..train.ema_config import ema_bytes_per_rank  # no Lightning there

    ema = {name: ema_bytes_per_rank(trainable, world_size, zero_stage) for name, zero_stage in (("ddp", None), ("zero2", 2), ("zero3", 3))}
    out["ema_if_enabled"] = {name: {"bytes": total, "GiB": round(total / GIB, 3)} for name, total in ema.items()}
    out["note"] = "model states only: add activations (use gradient checkpointing at 16 frames of 896x512) and framework buffers"
    return out


def parameter_counts(model: XDynaModel) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, params in model.parameter_groups().items():
        if params:
            counts[name] = {"total": sum(p.numel() for _, p in params),
                            "trainable": sum(p.numel() for _, p in params if p.requires_grad)}
    counts["all"] = {"total": sum(c["total"] for c in counts.values()), "trainable": sum(c["trainable"] for c in counts.values())}
    return counts


def count_flops(function, *args, **kwargs) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        result = function(*args, **kwargs)
    return counter.get_total_flops(), result


def analytic_forward_flops(module: nn.Module, function, *args, **kwargs) -> int:
    """Forward FLOPs of ``function`` from the shapes each conv, linear and attention layer sees
    (2 per multiply-add), gathered with hooks; an independent check of ``FlopCounterMode``."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def conv_hook(layer: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kernel = layer.kernel_size[0] * layer.kernel_size[1] * (layer.in_channels // layer.groups)
        total += 2 * output.numel() * kernel

    def linear_hook(layer: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += 2 * output.numel() * layer.in_features

    def attention_hook(layer, args, kwargs, output) -> None:
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 1:
            context = args[1]
        keys = (context if context is not None else hidden).shape[1]
        inner = layer.to_q.out_features
        # q k^T and softmax(.) v: two products of (rows, Lq, inner) with Lk keys.
        total += 2 * 2 * hidden.shape[0] * hidden.shape[1] * keys * inner

    handles = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            handles.append(layer.register_forward_hook(conv_hook))
        elif isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_hook(linear_hook))
        elif isinstance(layer, Attention):
            handles.append(layer.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            function(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def sd_unet_forward_flops(flavour_name: str, latent_height: int, latent_width: int, method: str = "flop_counter") -> int:
    """FLOPs of one plain SD UNet forward (one frame, empty-prompt length context) on meta."""
    from diffusers import UNet2DConditionModel

    flavour = get_flavour(flavour_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**flavour.unet)
        sample = torch.zeros(1, 4, latent_height, latent_width)
        context = torch.zeros(1, flavour.prompt_length, flavour.unet["cross_attention_dim"])
        timestep = torch.tensor([500])
    if method == "flop_counter":
        return count_flops(unet, sample, timestep, context)[0]
    if method == "analytic":
        return analytic_forward_flops(unet, unet, sample, timestep, context)
    raise ValueError(f"method {method!r}: flop_counter or analytic")


def _call(phase: str, function, *args, **kwargs):
    return function(*args, **kwargs)


def run_training_step(
    model: XDynaModel,
    conditions: list[str],
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    forward_context=contextlib.nullcontext,
    around=_call,
    cached_latents: bool = False,
) -> None:
    """One training step of ``model`` as ``XDynaTrainingModule.diffusion_loss`` runs it (frozen
    encoders, the image prompt, the denoiser, the loss) and its backward (only what the trainable
    set requires), on zero inputs of ``dtype`` on the model's device (meta or fake tensors for
    sizing). ``forward_context()`` wraps the forward part as the precision plugin does (autocast);
    ``around(phase, function, *args)`` runs each part (``encoders``, ``forward``, ``backward``):
    the FLOP counter and the memory predictor each wrap it their way. ``cached_latents``: the
    batch carries VAE latents (``data.latents``, ``xdyna-data encode``), so no VAE encode runs;
    the image prompt still encodes the reference pixels."""
    device = model.prompt_embeds.device
    video = torch.zeros(batch, frames, 3, height, width, device=device, dtype=dtype)
    reference = torch.zeros(batch, 3, height, width, device=device, dtype=dtype)
    pose = torch.zeros(batch, frames, 3, height, width, device=device, dtype=dtype) if "pose" in conditions else None
    face = torch.zeros(batch, frames, 6, height, width, device=device, dtype=dtype) if "face" in conditions else None
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)

    prompt_trains = model.image_prompt is not None and any(p.requires_grad for p in model.image_prompt.resampler.parameters())

    def encode():
        if cached_latents:  # what the loader delivers instead of the VAE's work: (B, F, 4, h, w)
            vae = model.vae.config
            factor = 2 ** (len(vae.block_out_channels) - 1)  # diffusers' VAE downsampling (8 for SD)
            latent_shape = (vae.latent_channels, height // factor, width // factor)
            latents = torch.zeros(batch, frames, *latent_shape, device=device, dtype=dtype)
            reference_latents = torch.zeros(batch, *latent_shape, device=device, dtype=dtype)
        else:
            latents = model.encode_video(video)
            reference_latents = model.encode_images(reference)
        prompt = None
        if model.image_prompt is not None and not prompt_trains:
            with torch.no_grad():
                prompt = model.encode_image_prompt_for_training(reference)
        return latents, reference_latents, prompt

    with forward_context():
        latents, reference_latents, prompt = around("encoders", encode)
        del video
        if prompt_trains:
            # The Resampler trains in the w/IP-A ablation: its forward belongs to the graph.
            prompt = around("forward", model.encode_image_prompt_for_training, reference)
        prediction = around("forward", model.denoise, latents, timesteps, reference_latents, pose, face, image_prompt=prompt)
        loss = torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(latents, dtype=torch.float32))
    del prediction, latents, reference_latents, prompt
    if loss.requires_grad:
        around("backward", loss.backward)


def training_flops(model: XDynaModel, conditions: list[str], frames: int, height: int, width: int,
                   cached_latents: bool = False) -> dict[str, int]:
    """FLOPs of one training sample on ``model`` (meta device): frozen encoders (no VAE encode
    with ``cached_latents``), the denoiser's forward and its backward (only what the trainable set
    requires)."""
    flops = dict.fromkeys(("encoders", "forward", "backward"), 0)

    def counted(phase, function, *args, **kwargs):
        count, result = count_flops(function, *args, **kwargs)
        flops[phase] += count
        return result

    run_training_step(model, conditions, frames, height, width, around=counted, cached_latents=cached_latents)
    return {**flops, "training": sum(flops.values())}


def sizing_config(model_config: ModelConfig, **changes) -> ModelConfig:
    """The config a meta-device sizing run builds (FLOP count, memory prediction): ``changes``
    applied and blocks eager. Compiled blocks run the same operations (the same FLOPs); what
    torch.compile's fusion would save in memory is not modelled, so the prediction is the eager one."""
    return replace(model_config, compile=None, **changes)


def training_flops_pair(model_config: ModelConfig, trainable: list[str], conditions: list[str], frames: int,
                        height: int, width: int, cached_latents: bool = False) -> dict[str, int]:
    """Training FLOPs of one sample, twice: ``model`` (the math, no recompute: what model-FLOPs
    MFU counts) and ``hardware`` (what the GPU executes: the configured activation checkpointing
    recomputes its blocks' forward in backward). Both counted on meta-device models."""
    counts = {}
    for key, config in (("model", sizing_config(model_config, gradient_checkpointing=False, activation_checkpointing=None)),
                        ("hardware", sizing_config(model_config))):
        model = build_model(config, device="meta")
        model.set_trainable(trainable)
        counts[key] = training_flops(model, conditions, frames, height, width, cached_latents)["training"]
    return counts


def _in_gib(report: dict[str, Any]) -> dict[str, Any]:
    """``*_bytes`` entries (numbers or dicts of numbers) as ``*_GiB``, for reading."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if not key.endswith("_bytes"):
            out[key] = value
            continue
        name = key.removesuffix("_bytes") + "_GiB"
        out[name] = {k: round(v / GIB, 4) for k, v in value.items()} if isinstance(value, dict) else round(value / GIB, 4)
    return out


def describe_job(
    model_config: ModelConfig,
    trainable: list[str],
    conditions: list[str],
    frames: int,
    height: int,
    width: int,
    world_size: int = 8,
    precision: str = "bf16-mixed",
    batch: int = 1,
    engine: str = "zero2",
    checkpointing: Any = None,
    memory: bool = True,
) -> dict[str, Any]:
    """The ``xdyna-info`` report for one model/stage/data composition. ``memory``: also predict
    the peak GPU memory of a step (:func:`xdyna.models.memory.predict_peak`, a fake-tensor run of
    the step at full size: about a minute at SD1.5 size on 2 CPU cores)."""
    from .memory import predict_peak

    if height % 8 or width % 8:
        raise ConfigError(f"height x width {height}x{width}: both must be multiples of 8 (VAE)")
    # Count model FLOPs, not recomputation.
    config = sizing_config(model_config, gradient_checkpointing=False, activation_checkpointing=None)
    model = build_model(config, device="meta")
    model.set_trainable(trainable)
    counts = parameter_counts(model)
    flops = training_flops(model, conditions, frames, height, width)
    flops["unet_forward_per_frame"] = sd_unet_forward_flops(config.flavour, height // 8, width // 8, "analytic")
    # What the GPU executes: the checkpointing policy's recompute on top (hardware-FLOPs MFU).
    policy_config = sizing_config(model_config) if checkpointing is None else sizing_config(model_config, activation_checkpointing=checkpointing)
    hardware = build_model(policy_config, device="meta")
    hardware.set_trainable(trainable)
    flops["training_with_recompute"] = training_flops(hardware, conditions, frames, height, width)["training"]
    trainable_count = counts["all"]["trainable"]
    report = {
        "model": {"flavour": config.flavour, "reference": config.reference, "face": config.face,
                  "image_prompt": config.image_prompt, "resnet_groupnorm": config.resnet_groupnorm},
        "stage": {"trainable": list(trainable), "conditions": list(conditions)},
        "sample": {"frames": frames, "reference_frames": 1, "height": height, "width": width, "latent": [height // 8, width // 8]},
        "parameters": counts,
        "flops_per_sample": flops,
        "memory_per_gpu": model_state_memory(trainable_count, counts["all"]["total"] - trainable_count, world_size, precision),
        "components": list(COMPONENTS),
        "frozen_parts": list(FROZEN_PARTS),
    }
    if memory:
        peak = predict_peak(model_config, trainable, conditions, frames, height, width, batch=batch, precision=precision,
                            engine=engine, world_size=world_size, checkpointing=checkpointing)
        report["peak_memory_per_gpu"] = _in_gib(peak)
    return report
