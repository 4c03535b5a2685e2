"""The DDIM sampling loop, shared by the training-time sample videos (:func:`sample_clip`) and
the inference pipeline (:func:`denoise_latents`).

One denoising step of a video of ``F`` frames:

1. the clean reference latent runs through the UNet once (:meth:`XDynaModel.encode_reference`)
   and its keys/values serve every context window of the step; the public release instead puts
   the reference in front of every window and recomputes it per window
   (``share_reference_features=False`` reproduces that, for the benchmark and the tests);
2. the frames are cut into context windows (:mod:`.context`), each window is denoised, and the
   predictions are averaged per frame;
3. classifier-free guidance combines the predictions with and without the image prompt; the
   two branches ride in one batch, branch-major, so both reference passes are one call too;
4. one DDIM step (eta 0 by default: deterministic given the initial latent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from ..diffusion import ScheduleConfig, add_noise, sampling_scheduler
from ..models import XDynaModel
from .context import ContextOptions, context_windows

INITIAL_LATENTS = ("frame_similarity", "noise")


@dataclass
class ImagePromptTokens:
    """Image-prompt tokens of the reference (``conditional``) and of the blank image
    (``unconditional``), each ``(B, N, D)``. Classifier-free guidance differs only in these.
    (The network that makes them is :class:`xdyna.models.image_prompt.ImagePrompt`.)"""

    conditional: torch.Tensor
    unconditional: torch.Tensor


def model_has_image_prompt(model: XDynaModel) -> bool:
    return getattr(model, "image_prompt", None) is not None


def encode_image_prompt(model: XDynaModel, reference: torch.Tensor) -> ImagePromptTokens | None:
    """The image prompt of ``reference (B, 3, H, W)`` in [-1, 1], or ``None`` when the model has
    no image prompt (then there is nothing to guide on, see :func:`denoise_latents`).

    Contract with the model: ``model.encode_image_prompt(images)`` returns the conditional and
    the unconditional tokens; ``encode_reference``/``denoise`` take them as ``image_prompt=``.
    """
    if not model_has_image_prompt(model):
        return None
    conditional, unconditional = model.encode_image_prompt(reference)
    return ImagePromptTokens(conditional, unconditional)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the generator's device, then moved: a CPU generator gives the same noise for a
    # CUDA run as for a CPU run.
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def _blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, h, w)`` with reflected borders; the kernel shrinks to
    fit small latents (reflection needs padding < size)."""
    height, width = latents.shape[-2:]
    size = min(kernel_size, 2 * ((min(height, width) - 1) // 2) + 1)
    if size < 3:
        return latents
    x = torch.arange(size, dtype=torch.float32, device=latents.device) - size // 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(latents.dtype)
    channels = latents.shape[1]
    pad = size // 2
    out = torch.nn.functional.pad(latents, (pad, pad, pad, pad), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def frame_similarity_prior(
    reference_latents: torch.Tensor,
    num_frames: int,
    scheduler: DDIMScheduler,
    generator: torch.Generator | None = None,
    blur_mix: bool = True,
    blur_kernel: int = 9,
    blur_sigma: float = 18.0,
) -> torch.Tensor:
    """X-Dyna's initial latent ``(B, F, 4, h, w)``: the reference latent repeated per frame, each
    element randomly (p = 0.5) swapped for a blurred copy, then noised to the first timestep.

    Starting from the reference rather than pure noise keeps the scene's layout and colours from
    the first step; the blur mix loosens the copy so that the person can still move.

    The noising uses the sampling schedule's own ``alphas_cumprod``, so it matches what the model
    saw in training at that timestep. Under zero terminal SNR (``schedule=v_zero_snr``) the first
    timestep carries no signal (``alphas_cumprod[999] == 0``): the prior then is pure noise, as
    the model expects there, and the reference reaches the video only through the network.
    """
    batch = reference_latents.shape[0]
    device = reference_latents.device
    clean = reference_latents.float().unsqueeze(1).expand(-1, num_frames, -1, -1, -1).contiguous()
    if blur_mix:
        blurred = _blur(clean.flatten(0, 1), blur_kernel, blur_sigma).view_as(clean)
        source = generator.device if generator is not None else device
        keep = torch.rand(clean.shape, generator=generator, device=source).to(device) >= 0.5
        clean = torch.where(keep, clean, blurred)
    noise = _randn(clean.shape, generator, device)
    first = scheduler.timesteps[0].to(device).expand(batch)
    return add_noise(scheduler, clean, noise, first)


def initial_latents(
    kind: str,
    reference_latents: torch.Tensor,
    num_frames: int,
    scheduler: DDIMScheduler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``frame_similarity`` (X-Dyna inference) or ``noise`` (pure Gaussian, the training-time
    sample videos): ``(B, F, 4, h, w)`` float32."""
    if kind == "frame_similarity":
        return frame_similarity_prior(reference_latents, num_frames, scheduler, generator)
    if kind == "noise":
        shape = (reference_latents.shape[0], num_frames, *reference_latents.shape[1:])
        return _randn(shape, generator, reference_latents.device) * scheduler.init_noise_sigma
    raise ValueError(f"initial latent {kind!r}; choose one of {INITIAL_LATENTS}")


def _windows_for_step(num_frames: int, context: ContextOptions | None, generator: torch.Generator | None) -> list[list[int]]:
    if context is None:
        return [list(range(num_frames))]
    offset = 0
    if context.random_offset and num_frames > context.size:
        source = generator.device if generator is not None else "cpu"
        offset = int(torch.randint(0, context.size, (1,), generator=generator, device=source))
    return context_windows(num_frames, context.size, context.overlap, context.closed_loop, offset)


def _gather(condition: torch.Tensor | None, index: torch.Tensor, branches: int) -> torch.Tensor | None:
    """Frames ``index (W, S)`` of ``condition (B, F, ...)`` as generation rows (branch, b, w)."""
    if condition is None:
        return None
    picked = condition[:, index]  # (B, W, S, ...)
    return picked.unsqueeze(0).expand(branches, *picked.shape).flatten(0, 2)


@torch.no_grad()
def denoise_latents(
    model: XDynaModel,
    latents: torch.Tensor,
    reference_latents: torch.Tensor,
    scheduler: DDIMScheduler,
    pose: torch.Tensor | None = None,
    face: torch.Tensor | None = None,
    image_prompt: ImagePromptTokens | None = None,
    guidance_scale: float = 1.0,
    context: ContextOptions | None = ContextOptions(),
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    share_reference_features: bool = True,
    progress: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run ``scheduler.timesteps`` DDIM steps from ``latents (B, F, 4, h, w)``; returns float32
    latents of the same shape. The network's output is what ``scheduler`` is configured to read
    (``prediction_type``: noise or velocity); window averaging and guidance are linear, so they
    apply to either alike.

    ``pose (B, F, 3, H, W)`` and ``face (B, F, 6, H, W)`` are the per-frame conditions. Guidance
    applies when ``image_prompt`` is given and ``guidance_scale != 1``; without an image prompt
    both branches would be the same network call, so none is made. ``context=None`` denoises all
    frames as one window.
    """
    batch, num_frames = latents.shape[:2]
    device = latents.device
    dtype = model.unet.dtype
    guided = image_prompt is not None and guidance_scale != 1.0
    if guided:
        prompts = torch.cat([image_prompt.unconditional, image_prompt.conditional])  # branch-major
    elif image_prompt is not None:
        prompts = image_prompt.conditional
    else:
        prompts = None
    branches = 2 if guided else 1
    reference_rows = reference_latents.to(dtype).repeat(branches, 1, 1, 1)  # (branch, b)
    latents = latents.float()
    per_batch = context.windows_per_batch if context is not None else 1
    # Some model variants tie the reference to the clip it is denoised with (GroupNorm across
    # frames, as AnimateDiff v1): their reference pass cannot be shared and runs in every window.
    share_reference_features = share_reference_features and getattr(model, "caches_reference", True)

    def prompt_kwargs(rows_per_reference: int) -> dict:
        if prompts is None:
            return {}
        return {"image_prompt": prompts.repeat_interleave(rows_per_reference, dim=0)}

    for step_index, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress)):
        t = t.to(device)
        features = None
        if share_reference_features:
            # One reference pass per step, read by every window (rows grouped per reference).
            features = model.encode_reference(reference_rows, t.expand(reference_rows.shape[0]), **prompt_kwargs(1))
        windows = _windows_for_step(num_frames, context, generator)
        prediction_sum = torch.zeros((branches, *latents.shape), device=device)
        hits = torch.zeros(num_frames, device=device)
        for first in range(0, len(windows), per_batch):
            index = torch.tensor(windows[first : first + per_batch], device=device)  # (W, S)
            count = index.shape[0]
            rows = _gather(latents, index, branches).to(dtype)  # (branch*B*W, S, 4, h, w)
            timesteps = t.expand(rows.shape[0])
            window_pose = _gather(pose, index, branches)
            window_face = _gather(face, index, branches)
            if share_reference_features:
                output = model.denoise(rows, timesteps, pose=window_pose, face=window_face, reference=features, **prompt_kwargs(count))
            else:
                # The public release's way: the reference pass runs again inside every window.
                output = model.denoise(
                    rows, timesteps, reference_rows.repeat_interleave(count, dim=0), pose=window_pose, face=window_face,
                    **prompt_kwargs(count),
                )
            output = output.float().view(branches, batch, count * index.shape[1], *latents.shape[2:])
            prediction_sum.index_add_(2, index.flatten(), output)
            hits.index_add_(0, index.flatten(), torch.ones(index.numel(), device=device))
        prediction = prediction_sum / hits.view(1, 1, num_frames, 1, 1, 1)
        if guided:
            unconditional, conditional = prediction
            model_output = unconditional + guidance_scale * (conditional - unconditional)
        else:
            model_output = prediction[0]
        latents = scheduler.step(model_output, t, latents, eta=eta, generator=generator).prev_sample
        if on_step is not None:
            on_step(step_index, len(scheduler.timesteps))
    return latents


@torch.no_grad()
def sample_clip(
    model: XDynaModel,
    reference: torch.Tensor,
    pose: torch.Tensor,
    face: torch.Tensor | None = None,
    num_inference_steps: int = 25,
    generator: torch.Generator | None = None,
    progress: bool = False,
    schedule: ScheduleConfig | None = None,
) -> torch.Tensor:
    """Generate ``(B, F, 3, H, W)`` in [-1, 1] from a reference ``(B, 3, H, W)`` in [-1, 1] and a
    pose video ``(B, F, 3, H, W)`` in [0, 1]: pure-noise start, one window, no guidance (the
    training-time sample videos, where only the trained components matter). ``schedule``: the
    one the model is trained with (``None``: the default)."""
    scheduler = sampling_scheduler(schedule)
    scheduler.set_timesteps(num_inference_steps, device=pose.device)
    reference_latents = model.encode_images(reference.to(model.vae.dtype), sample_posterior=False)
    latents = initial_latents("noise", reference_latents, pose.shape[1], scheduler, generator)
    # Models with an image prompt need its tokens on every call; conditional branch only (no CFG).
    latents = denoise_latents(
        model, latents, reference_latents, scheduler, pose=pose, face=face,
        image_prompt=encode_image_prompt(model, reference), context=None, generator=generator, progress=progress,
    )
    return model.decode_latents(latents.to(model.vae.dtype))
