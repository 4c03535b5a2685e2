"""Fixtures of the inference tests: a tiny model whose trainable parts are off their zero init
(so the adapter, the motion modules and the ControlNets all shape the output), and small
synthetic driving files written the way users give them (png + mp4 on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datapipes.synthetic import human_clip
from datapipes.video import encode_mp4
from xdyna.models import ModelConfig, build_model
from xdyna.pipelines import XDynaPipeline

SIZE = (64, 64)  # smallest size the tiny UNet takes (latent 8x8): keeps the suite fast on CPU
SOURCE_FPS = 8.0


def perturb_trainable(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable component off its zero init, so that equalities tested on the
    sampling loop are not trivially true (zero-init motion modules ignore other frames)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in model.component_parameters().values():
            for _, param in params:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="session")
def perturb():
    """:func:`perturb_trainable`, for tests that build their own model variant."""
    return perturb_trainable


@pytest.fixture(scope="session")
def tiny_pipeline() -> XDynaPipeline:
    model = build_model(ModelConfig())
    perturb_trainable(model)
    return XDynaPipeline(model)


@pytest.fixture(scope="session")
def synthetic_clip() -> dict:
    """A 24-frame synthetic person at 128x96 (not the output size: resizing is exercised)."""
    return human_clip(seed=3, frames=24, height=128, width=96)


@pytest.fixture(scope="session")
def driving_files(tmp_path_factory, synthetic_clip) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("driving")
    files = {
        "reference": folder / "reference.png",
        "driving": folder / "driving.mp4",
        "pose": folder / "pose.mp4",
        "short_pose": folder / "short_pose.mp4",
        "black_pose": folder / "black_pose.mp4",
        "wide_reference": folder / "wide_reference.png",
    }
    Image.fromarray(synthetic_clip["video"][0]).save(files["reference"])
    files["driving"].write_bytes(encode_mp4(synthetic_clip["video"], SOURCE_FPS))
    files["pose"].write_bytes(encode_mp4(synthetic_clip["pose"], SOURCE_FPS))
    files["short_pose"].write_bytes(encode_mp4(synthetic_clip["pose"][:14], SOURCE_FPS))
    files["black_pose"].write_bytes(encode_mp4(np.zeros_like(synthetic_clip["pose"][:8]), SOURCE_FPS))
    wide = np.zeros((60, 200, 3), dtype=np.uint8)
    wide[:, 90:110] = (255, 0, 0)  # a red band in the centre: a centre crop must keep it
    Image.fromarray(wide).save(files["wide_reference"])
    return files
