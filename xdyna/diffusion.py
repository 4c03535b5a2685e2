"""Noise schedules shared by training (DDPM) and sampling (DDIM).

X-Dyna's release uses 1000 steps with *linear* betas 0.00085 -> 0.012 (not SD's scaled_linear),
steps_offset 1, clip_sample off, epsilon prediction.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False)


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One timestep per sample, shared by all its frames and its reference."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``latents (B, F, C, h, w)`` noised at per-sample ``timesteps (B,)``."""
    alphas = scheduler.alphas_cumprod.to(latents.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    signal = alphas.sqrt().reshape(shape)
    sigma = (1 - alphas).sqrt().reshape(shape)
    return (signal * latents.float() + sigma * noise.float()).to(latents.dtype)
