"""xdyna-info: sizes on the meta device, FLOPs checked against torch's FlopCounterMode."""

from __future__ import annotations

import json

import pytest

from tools.xdyna_info import main as xdyna_info
from xdyna.models.info import model_state_memory, sd_unet_forward_flops


def test_sd15_unet_forward_flops_agree_with_flop_counter():
    counted = sd_unet_forward_flops("sd15", 64, 64, "flop_counter")
    analytic = sd_unet_forward_flops("sd15", 64, 64, "analytic")
    assert counted == pytest.approx(0.80e12, rel=0.01)
    assert analytic == pytest.approx(counted, rel=0.005)


def test_xdyna_info_sd15_stage1_without_weight_paths(capsys):
    """sd15.yaml leaves the SD1.5 and image-encoder folders unset (???): on meta nothing is read."""
    assert xdyna_info(["model=sd15", "stage=stage1", "data.num_frames=2", "--world-size", "8", "--no-memory"]) == 0
    report = json.loads(capsys.readouterr().out)
    params = report["parameters"]
    assert params["dynamics_adapter"]["trainable"] == pytest.approx(24.8e6, rel=0.002)
    assert params["unet"]["total"] == pytest.approx(859.5e6, rel=0.001) and params["unet"]["trainable"] == 0
    assert params["motion_modules"]["trainable"] == params["motion_modules"]["total"] > 0
    assert params["face_controlnet"]["trainable"] == 0 and params["image_encoder"]["trainable"] == 0
    assert params["all"]["trainable"] == sum(params[c]["trainable"] for c in ("dynamics_adapter", "motion_modules", "pose_controlnet"))
    flops = report["flops_per_sample"]
    assert flops["training"] == flops["encoders"] + flops["forward"] + flops["backward"]
    # Backward of a net whose inputs need gradients costs about twice its forward.
    assert 1.0 < flops["backward"] / flops["forward"] < 2.5
    # sd15.yaml checkpoints (diffusers' policy): the GPU executes the recomputed forwards on top.
    assert flops["training"] < flops["training_with_recompute"] < flops["training"] + flops["forward"]
    assert "peak_memory_per_gpu" not in report  # --no-memory
    memory = report["memory_per_gpu"]
    assert memory["world_size"] == 8 and memory["ddp"]["bytes"] > memory["zero2"]["bytes"] > memory["zero3"]["bytes"]


def test_model_state_memory_accounting():
    billion = 10**9
    memory = model_state_memory(trainable=billion, frozen=2 * billion, world_size=8, precision="bf16-mixed")
    assert memory["ddp"]["bytes"] == 2 * billion * 4 + billion * 16
    assert memory["zero2"]["bytes"] == 3 * billion * 2 + billion * 14 // 8
    assert memory["zero3"]["bytes"] == (2 * billion * 2 + billion * 16) // 8


def test_xdyna_info_reports_config_errors_in_one_line(capsys):
    assert xdyna_info(["model=tiny", "stage=stage1", "model/reference=reference_net"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("xdyna-info: error: trainable component(s) ['dynamics_adapter'] are switched off") and "\n" not in error
    capsys.readouterr()
    assert xdyna_info(["model=nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("xdyna-info: error: model=nonexistent: no such option") and "sd15, tiny" in error and "\n" not in error
    assert xdyna_info(["model.flavor=tiny"]) == 2
    error = capsys.readouterr().err.strip()
    assert "model has no key 'flavor' (did you mean flavour?)" in error and "\n" not in error


def test_training_from_cached_latents_counts_no_vae_encode():
    """perf/mfu of a run from cached latents (data.latents) counts the FLOPs the step runs: the
    pixel step's minus exactly the VAE encode of the clip and its reference."""
    import torch

    from xdyna.models import ModelConfig, build_model
    from xdyna.models.info import count_flops, training_flops

    model = build_model(ModelConfig(), device="meta")
    model.set_trainable(["dynamics_adapter", "motion_modules", "pose_controlnet"])
    frames, height, width = 4, 64, 32
    pixels = training_flops(model, ["pose"], frames, height, width)
    cached = training_flops(model, ["pose"], frames, height, width, cached_latents=True)
    vae_encode, _ = count_flops(model.encode_images, torch.zeros(frames + 1, 3, height, width, device="meta"))
    assert vae_encode > 0 and pixels["encoders"] - cached["encoders"] == vae_encode
    assert (pixels["forward"], pixels["backward"]) == (cached["forward"], cached["backward"])
