"""Helpers for the model tests: tiny models (built once per config, handed out as copies) and
latent-space inputs small enough that a test is dominated by its assertions, not by compute."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from xdyna.models import ModelConfig, build_model

# Latent 8x8 passes the tiny UNet's three downsamplings (down to 1x1) like 112x64 passes SD1.5's.
B, F, h, w = 2, 3, 8, 8
_BUILT: dict[str, object] = {}


def tiny_model(**overrides):
    """A fresh tiny model of ``ModelConfig(**overrides)``; later calls copy the first build."""
    key = repr(sorted(overrides.items()))
    if key not in _BUILT:
        _BUILT[key] = build_model(replace(ModelConfig(), **overrides))
    return copy.deepcopy(_BUILT[key])


def latent_inputs(seed: int = 0, batch: int = B, frames: int = F):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, frames, 4, h, w, generator=g)
    reference = torch.randn(batch, 4, h, w, generator=g)
    timesteps = torch.tensor([3, 700][:batch] + [500] * max(0, batch - 2))
    pose = torch.rand(batch, frames, 3, 8 * h, 8 * w, generator=g)
    face = torch.rand(batch, frames, 6, 8 * h, 8 * w, generator=g)
    return noisy, reference, timesteps, pose, face


def image_prompt_of(model, seed: int = 0, batch: int = B):
    if model.image_prompt is None:
        return None
    g = torch.Generator().manual_seed(seed)
    conditional, _ = model.encode_image_prompt(torch.rand(batch, 3, 8 * h, 8 * w, generator=g) * 2 - 1)
    return conditional


def perturb(model, components=None, scale: float = 0.05, seed: int = 1) -> None:
    """Move trainable components off their (zero) init so equivalences are not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, params in model.component_parameters().items():
            if components is None or name in components:
                for _, p in params:
                    p.add_(torch.randn(p.shape, generator=g) * scale)


