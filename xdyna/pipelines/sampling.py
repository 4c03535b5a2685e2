"""The DDIM sampling loop for one clip (one context window), shared by the training-time sample
videos and the inference pipeline."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..diffusion import sampling_scheduler
from ..models import XDynaModel


@torch.no_grad()
def sample_clip(
    model: XDynaModel,
    reference: torch.Tensor,
    pose: torch.Tensor,
    face: torch.Tensor | None = None,
    num_inference_steps: int = 25,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate ``(B, F, 3, H, W)`` in [-1, 1] from a reference ``(B, 3, H, W)`` in [-1, 1] and a
    pose video ``(B, F, 3, H, W)`` in [0, 1]. Reference features are computed once per step."""
    batch, frames, _, height, width = pose.shape
    device = pose.device
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(num_inference_steps, device=device)
    reference_latents = model.encode_images(reference, sample_posterior=False)
    latent_shape = (batch, frames, reference_latents.shape[1], height // 8, width // 8)
    latents = torch.randn(latent_shape, generator=generator, device=device, dtype=reference_latents.dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        timesteps = t.expand(batch).to(device)
        features = model.encode_reference(reference_latents, timesteps)
        eps = model.denoise(latents, timesteps, pose=pose, face=face, reference=features)
        latents = scheduler.step(eps, t, latents).prev_sample
    return model.decode_latents(latents)
