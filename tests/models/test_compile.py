"""``model.compile``: blocks compiled per kind give the eager model's loss and gradients, with and
without activation checkpointing; bad values and ZeRO-3 are one clear error.

Compiling on 2 CPU cores is slow (inductor generates and builds C++ per graph), so the model-level
test compiles one checkpointed block of each UNet kind with the ``aot_eager`` backend (torch's graph capture and
AOTAutograd's forward/backward split and recompute: everything but inductor's code generation),
and inductor itself runs on one ResNet block (marked slow)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import latent_inputs, perturb, tiny_model
from torch._dynamo.utils import counters

from xdyna.errors import ConfigError
from xdyna.models import ModelConfig
from xdyna.models.activation_checkpointing import UNET_KINDS, apply_activation_checkpointing, blocks_of_kind
from xdyna.models.compile import apply_compile, compile_block, compiled_kinds, engine_refusal, resolve_compile
from xdyna.models.info import sizing_config

STAGE1 = ("dynamics_adapter", "motion_modules", "pose_controlnet")


def _step(model, frames: int = 2):
    params = model.set_trainable(STAGE1)
    model.train()
    noisy, reference, timesteps, pose, face = latent_inputs(batch=1, frames=frames)
    loss = model.denoise(noisy, timesteps, reference, pose, face).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _base():
    # across_frames: the ResNets' GroupNorms read the frame layout, which the graphs must respect.
    model = tiny_model(resnet_groupnorm="across_frames")
    perturb(model)
    return model


@pytest.mark.slow  # 15-19 s alone with one thread, 50-70 s on 2 cores shared with other tests
def test_compiled_checkpointed_blocks_match_eager_in_the_model():
    """One block of each UNet kind checkpointed and compiled (the first: the largest latent; the
    checkpoint inside the graph, as build_model orders them), the whole denoiser run forward and
    backward: loss and every trainable gradient equal the eager checkpointed model's. ``aot_eager``
    runs the same ATen ops as eager, so the tolerance is float32 rounding. Without checkpointing:
    the inductor test below (and the same graphs, traced inside the checkpoint here)."""
    eager = _base()
    apply_activation_checkpointing(eager, "unet")
    loss, grads = _step(copy.deepcopy(eager))
    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(eager)
    blocks = [blocks_of_kind(model, kind)[0] for kind in UNET_KINDS]
    assert all(compile_block(block, backend="aot_eager") for block in blocks)
    assert compiled_kinds(model) == dict.fromkeys(UNET_KINDS, 1)
    compiled_loss, compiled_grads = _step(model)
    # Every compiled block ran as captured graphs (no silent eager fallback, no graph break).
    assert counters["stats"]["unique_graphs"] >= len(blocks), dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled_loss, loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _block_inputs(model, kind: str):
    """The first call's arguments of the first block of ``kind`` (and the frame layout then), from
    an eager forward of the model: the block is then tested alone, at the model's real shapes."""
    block = blocks_of_kind(model, kind)[0]
    seen = []
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args, kwargs, model.frame_layout.mode, model.frame_layout.frames)) if not seen else None,
        with_kwargs=True)
    noisy, reference, timesteps, pose, face = latent_inputs(batch=1, frames=2)
    with torch.no_grad():
        model.denoise(noisy, timesteps, reference, pose, face)
    handle.remove()
    return seen[0]


def _block_step(model, block, inputs):
    args, kwargs, mode, frames = inputs
    block.requires_grad_(True)
    args = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    kwargs = {k: v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    with model.frame_layout.use(mode, frames):
        out = block(*args, **kwargs)
    out.square().mean().backward()
    leaves = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.requires_grad]
    return out.detach(), [t.grad for t in leaves] + [p.grad for p in block.parameters()]


@pytest.mark.slow  # 60-75 s cold on 2 busy cores (two inductor compiles), 6 s from its on-disk cache
def test_inductor_block_matches_eager_with_and_without_checkpointing():
    """Inductor (generated C++ kernels) on one ResNet block, plain and checkpointed: output and
    the gradients of its inputs and weights equal eager within 1e-5 (inductor fuses and reorders
    reductions: float32 rounding, measured up to ~1e-6 here)."""
    base = _base()
    base.train()
    inputs = _block_inputs(base, "resnets")
    eager = copy.deepcopy(base)  # a block reads its own model's frame layout
    eager_out, eager_grads = _block_step(eager, blocks_of_kind(eager, "resnets")[0], inputs)
    for checkpointing in (None, ["resnets"]):
        torch._dynamo.reset()
        counters.clear()
        model = copy.deepcopy(base)
        if checkpointing is not None:
            apply_activation_checkpointing(model, checkpointing)
        block = blocks_of_kind(model, "resnets")[0]
        compile_block(block)  # inductor, the default
        out, grads = _block_step(model, block, inputs)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-4)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_policy_names_kinds_and_errors():
    assert resolve_compile(None) == ("none", ())
    assert resolve_compile("unet") == ("unet", UNET_KINDS)
    assert resolve_compile(["motion", "resnets"]) == ("resnets+motion", ("resnets", "motion"))
    with pytest.raises(ConfigError, match=r"model.compile='blocks'"):
        resolve_compile("blocks")
    with pytest.raises(ConfigError, match=r"model.compile: unknown block kind\(s\) \['convs'\]"):
        ModelConfig(compile=["motion", "convs"]).validate()
    model = tiny_model(face="none")
    with pytest.raises(ConfigError, match="model.compile: 'face_controlnet' is not part of this model"):
        apply_compile(model, ["face_controlnet"])
    # A policy covers the networks the variant has; nothing runs until a block is called.
    counts = apply_compile(model, "all")
    assert set(counts) == {*UNET_KINDS, "pose_controlnet"} and all(counts.values())
    assert compiled_kinds(model) == counts
    assert apply_compile(model, "unet") == dict.fromkeys(UNET_KINDS, 0)  # compiled once
    # The compile travels with a deep copy (it is the block's class).
    assert compiled_kinds(copy.deepcopy(model)) == counts
    assert torch._dynamo.config.recompile_limit >= sum(counts.values())
    # Sizing runs (FLOP count, memory prediction on meta/fake tensors) build eager blocks.
    assert sizing_config(ModelConfig(compile="unet")).compile is None


def test_build_model_compiles_the_configured_kinds_after_checkpointing():
    model = tiny_model(compile=["motion"], activation_checkpointing=["motion"])
    assert compiled_kinds(model) == {"motion": len(blocks_of_kind(model, "motion"))}
    # Checkpointing first: the compiled forward is the checkpointing one (checkpoint inside the graph).
    block = blocks_of_kind(model, "motion")[0]
    assert type(block).__name__ == "CompiledCheckpointedReferenceAwareMotionModule"


def test_zero3_is_refused_with_the_reason():
    assert engine_refusal("unet", 2) is None and engine_refusal("unet", None) is None
    assert engine_refusal(None, 3) is None and engine_refusal("none", 3) is None
    line = engine_refusal(["motion"], 3)
    assert line.startswith("model.compile=motion does not work with DeepSpeed ZeRO-3") and "\n" not in line


def test_config_rule_refuses_compile_under_zero3_only():
    from omegaconf import OmegaConf

    from xdyna.train.config_rules import CONFIG_RULES, compile_fits_the_engine

    assert compile_fits_the_engine in CONFIG_RULES

    def job(compile, kind="deepspeed", stage=3):
        return OmegaConf.create({"model": {"compile": compile}, "trainer": {"strategy": {"kind": kind, "zero_stage": stage}}})

    for kind in ("deepspeed", "deepspeed_cpu"):
        (line,) = compile_fits_the_engine(job("unet", kind))
        assert "model.compile=unet does not work with DeepSpeed ZeRO-3" in line
    assert compile_fits_the_engine(job("unet", stage=2)) == []
    assert compile_fits_the_engine(job("unet", kind="ddp")) == []
    assert compile_fits_the_engine(job(None)) == []
