"""The sampling loop on the tiny model: windows, shared reference features, seeds, guidance,
initial latents."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xdyna.diffusion import add_noise, sampling_scheduler
from xdyna.pipelines import ContextOptions, context_windows, denoise_latents, frame_similarity_prior, sample_clip
from xdyna.pipelines.sampling import ImagePromptTokens, _blur

SIZE = (64, 64)  # the output size of the conftest fixtures


def scheduler_at_first_steps(count: int, steps: int = 25):
    """A DDIM scheduler set for ``steps`` steps but holding only the first ``count``."""
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(steps)
    scheduler.timesteps = scheduler.timesteps[:count]
    return scheduler


def drawn_offsets(seed: int, steps: int, size: int) -> list[int]:
    """The window offsets a seeded loop draws, one per step (eta 0: DDIM itself draws nothing)."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, size, (1,), generator=g)) for _ in range(steps)]


def windowed_steps(latents, scheduler, windows_per_step, denoise_window):
    """The context-window loop written out: per step, every window's prediction is added to its
    frames, each frame's sum is divided by the number of windows that hold it, one DDIM step."""
    frames = latents.shape[1]
    for t, windows in zip(scheduler.timesteps, windows_per_step):
        total, hits = torch.zeros_like(latents), [0] * frames
        for window in windows:
            total[:, window] += denoise_window(latents[:, window], t, window)
            for frame in window:
                hits[frame] += 1
        assert min(hits) >= 1 and max(hits) >= 2  # every frame covered, overlaps averaged
        latents = scheduler.step(total / torch.tensor(hits).view(1, -1, 1, 1, 1), t, latents).prev_sample
    return latents


def step_inputs(frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, frames, 4, SIZE[0] // 8, SIZE[1] // 8, generator=g)
    reference_latents = torch.randn(1, 4, SIZE[0] // 8, SIZE[1] // 8, generator=g)
    pose = torch.rand(1, frames, 3, *SIZE, generator=g)
    return latents, reference_latents, pose


def test_steps_average_the_per_window_predictions(tiny_pipeline):
    """The tiny model in the loop: two steps, borders moved by a seeded random offset, closed loop
    (the loop's bookkeeping on videos longer than 16 frames: the probe test below)."""
    model = tiny_pipeline.model
    frames, steps, seed = 7, 2, 0
    context = ContextOptions(size=4, overlap=1, closed_loop=True, random_offset=True)
    latents, reference_latents, pose = step_inputs(frames)
    got = denoise_latents(model, latents, reference_latents, scheduler_at_first_steps(steps), pose=pose, context=context,
                          generator=torch.Generator().manual_seed(seed))

    windows = [context_windows(frames, 4, 1, True, offset) for offset in drawn_offsets(seed, steps, 4)]
    assert windows[0] != windows[1] and all(len(step) == 3 for step in windows)  # e.g. [0-3], [3-6], [6, 0, 1, 2]

    def denoise_window(rows, t, window):
        features = model.encode_reference(reference_latents, t.expand(1))
        return model.denoise(rows, t.expand(1), pose=pose[:, window], reference=features)

    with torch.no_grad():
        expected = windowed_steps(latents, scheduler_at_first_steps(steps), windows, denoise_window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    # Not vacuous: the whole clip as one window is a different computation (temporal attention).
    whole = denoise_latents(model, latents, reference_latents, scheduler_at_first_steps(steps), pose=pose, context=None)
    assert (whole - got).abs().max() > 1e-4


class WindowProbe:
    """A stand-in model whose prediction for a window is a fixed nonlinear function of the
    window's latents and of each frame's place in it (so which frames share a window, and how
    predictions are averaged, both show in the result). Frame ids ride in the pose maps; the
    probe records the windows it was given."""

    unet = SimpleNamespace(dtype=torch.float32)

    def __init__(self):
        self.windows: list[list[int]] = []

    @staticmethod
    def predict(rows: torch.Tensor) -> torch.Tensor:
        place = torch.arange(rows.shape[1], dtype=rows.dtype).view(1, -1, 1, 1, 1)
        return torch.tanh(rows) + 0.3 * rows.mean(dim=1, keepdim=True) + 0.01 * place

    def encode_reference(self, reference_rows, timesteps, image_prompt=None):
        return None

    def denoise(self, rows, timesteps, reference_latents=None, pose=None, face=None, reference=None, image_prompt=None):
        self.windows += pose[:, :, 0, 0, 0].long().tolist()
        return self.predict(rows)


LONG = 40  # frames: several 16-frame windows


@pytest.mark.parametrize("closed_loop", [True, False])
def test_long_video_steps_average_windows_at_random_offsets(closed_loop):
    latents = torch.randn(1, LONG, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    frame_ids = torch.arange(LONG, dtype=torch.float32).view(1, LONG, 1, 1, 1).expand(1, LONG, 3, 2, 2)
    context = ContextOptions(size=16, overlap=4, closed_loop=closed_loop, random_offset=True)
    probe, steps, seed = WindowProbe(), 3, 4
    got = denoise_latents(probe, latents, torch.zeros(1, 4, 2, 2), scheduler_at_first_steps(steps), pose=frame_ids,
                          context=context, generator=torch.Generator().manual_seed(seed))

    offsets = drawn_offsets(seed, steps, context.size)
    assert len(set(offsets)) == steps  # the seed moves the borders at every step
    windows = [context_windows(LONG, 16, 4, closed_loop, offset) for offset in offsets]
    assert probe.windows == [window for step in windows for window in step]
    assert len({tuple(map(tuple, step)) for step in windows}) == steps
    expected = windowed_steps(latents, scheduler_at_first_steps(steps), windows, lambda rows, t, window: WindowProbe.predict(rows))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    # Not vacuous: fixed borders (offset 0 at every step) give another video.
    fixed = ContextOptions(size=16, overlap=4, closed_loop=closed_loop, random_offset=False)
    unmoved = denoise_latents(WindowProbe(), latents, torch.zeros(1, 4, 2, 2), scheduler_at_first_steps(steps), pose=frame_ids,
                              context=fixed, generator=torch.Generator().manual_seed(seed))
    assert (unmoved - got).abs().max() > 1e-3


def test_shared_reference_features_equal_recomputing_per_window(tiny_pipeline):
    model = tiny_pipeline.model
    latents, reference_latents, pose = step_inputs(7, seed=1)
    results = {}
    for share, per_batch in ((True, 1), (False, 1), (True, 3)):
        if True:
            context = ContextOptions(size=4, overlap=1, random_offset=False, windows_per_batch=per_batch)
            results[share, per_batch] = denoise_latents(
                model, latents, reference_latents, scheduler_at_first_steps(1), pose=pose, context=context,
                share_reference_features=share,
            )
    reference = results[True, 1]
    for key, result in results.items():
        torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-4, msg=f"share/batch {key}")


@pytest.fixture(scope="module")
def short_video():
    g = torch.Generator().manual_seed(5)
    return torch.rand(3, *SIZE, generator=g) * 2 - 1, torch.rand(5, 3, *SIZE, generator=g)


@pytest.fixture(scope="module")
def seeded_run(tiny_pipeline, short_video):
    reference, pose = short_video
    return tiny_pipeline(reference, pose, num_inference_steps=2, seed=0)


def test_same_seed_same_video_other_seed_other_video(tiny_pipeline, short_video, seeded_run):
    reference, pose = short_video
    again = tiny_pipeline(reference, pose, num_inference_steps=2, seed=0)
    other = tiny_pipeline(reference, pose, num_inference_steps=2, seed=1)
    assert seeded_run.frames.shape == (5, *SIZE, 3) and seeded_run.frames.dtype == np.uint8
    np.testing.assert_array_equal(again.frames, seeded_run.frames)
    assert np.abs(other.frames.astype(int) - seeded_run.frames).max() > 0


def test_windowed_inference_equals_one_window_when_the_video_fits(tiny_pipeline, short_video, seeded_run):
    reference, pose = short_video
    single = tiny_pipeline(reference, pose, num_inference_steps=2, seed=0, context=None)
    np.testing.assert_array_equal(single.frames, seeded_run.frames)


def test_guidance_is_off_without_an_image_prompt(tiny_pipeline, short_video, seeded_run):
    reference, pose = short_video
    assert not seeded_run.guidance_applied  # default guidance 7.5, the tiny model has no image prompt
    unguided = tiny_pipeline(reference, pose, num_inference_steps=2, seed=0, guidance_scale=1.0)
    np.testing.assert_array_equal(unguided.frames, seeded_run.frames)


def test_per_control_scales_apply_for_one_call(tiny_pipeline, short_video, seeded_run):
    reference, pose = short_video
    config = tiny_pipeline.model.config
    no_pose = tiny_pipeline(reference, pose, num_inference_steps=2, seed=0, pose_scale=0.0)
    assert np.abs(no_pose.frames.astype(int) - seeded_run.frames).max() > 0
    assert config.pose_conditioning_scale == 1.0  # restored after the call


class GuidanceProbe:
    """A stand-in model whose prediction is ``0.1 * x + image-prompt value``: checks how the loop
    lays out the two guidance branches and combines them (the tiny model has no image prompt)."""

    unet = SimpleNamespace(dtype=torch.float32)

    def encode_reference(self, reference_rows, timesteps, image_prompt=None):
        return SimpleNamespace(prompt=image_prompt[:, 0, 0])  # one value per (branch, sample)

    def denoise(self, rows, timesteps, reference_latents=None, pose=None, face=None, reference=None, image_prompt=None):
        per_reference = rows.shape[0] // reference.prompt.shape[0]
        # Rows are grouped contiguously per reference, as the real adapter reads them.
        torch.testing.assert_close(image_prompt[:, 0, 0], reference.prompt.repeat_interleave(per_reference))
        return 0.1 * rows + image_prompt[:, 0, 0].view(-1, 1, 1, 1, 1)


def test_guidance_combines_the_branches():
    latents, reference_latents, _ = step_inputs(6)
    latents = latents.repeat(2, 1, 1, 1, 1)  # two samples with their own prompts
    reference_latents = reference_latents.repeat(2, 1, 1, 1)
    conditional = torch.tensor([1.0, 2.0]).view(2, 1, 1).expand(2, 3, 8)
    unconditional = torch.tensor([-1.0, -3.0]).view(2, 1, 1).expand(2, 3, 8)
    prompt = ImagePromptTokens(conditional, unconditional)
    context = ContextOptions(size=4, overlap=2, random_offset=False, windows_per_batch=2)
    got = denoise_latents(GuidanceProbe(), latents, reference_latents, scheduler_at_first_steps(1), image_prompt=prompt,
                          guidance_scale=7.5, context=context)
    scheduler = scheduler_at_first_steps(1)
    c, u = conditional[:, 0, 0].view(2, 1, 1, 1, 1), unconditional[:, 0, 0].view(2, 1, 1, 1, 1)
    eps = 0.1 * latents + u + 7.5 * (c - u)
    expected = scheduler.step(eps, scheduler.timesteps[0], latents).prev_sample
    torch.testing.assert_close(got, expected)


def test_frame_similarity_prior_is_the_noised_blur_mix_of_the_reference():
    scheduler = scheduler_at_first_steps(1)
    reference = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prior = frame_similarity_prior(reference, 3, scheduler, torch.Generator().manual_seed(7))
    assert scheduler.timesteps[0] == 961
    g = torch.Generator().manual_seed(7)
    clean = reference.unsqueeze(1).expand(2, 3, 4, 8, 8)
    keep = torch.rand(clean.shape, generator=g) >= 0.5
    mixed = torch.where(keep, clean, _blur(clean.flatten(0, 1), 9, 18.0).view_as(clean))
    expected = add_noise(scheduler, mixed, torch.randn(clean.shape, generator=g), torch.tensor([961, 961]))
    torch.testing.assert_close(prior, expected)
    assert 0.3 < keep.float().mean() < 0.7


def test_blur_keeps_constants_and_smooths_noise():
    constant = torch.full((1, 4, 8, 8), 0.7)
    torch.testing.assert_close(_blur(constant, 9, 18.0), constant)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert _blur(noise, 9, 18.0).std() < 0.5 * noise.std()


def test_sample_clip_keeps_its_contract(tiny_pipeline):
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 3, *SIZE, generator=g) * 2 - 1
    pose = torch.rand(2, 3, 3, *SIZE, generator=g)
    video = sample_clip(tiny_pipeline.model, reference, pose, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert video.shape == (2, 3, 3, *SIZE)
    assert torch.isfinite(video).all() and video.min() >= -1 and video.max() <= 1


def test_guidance_applies_with_an_image_prompt_and_survives_save_load(tmp_path, short_video, perturb):
    from xdyna.models import ModelConfig, build_model
    from xdyna.pipelines import XDynaPipeline

    model = build_model(ModelConfig(image_prompt=True))
    perturb(model)
    pipeline = XDynaPipeline(model)
    reference, pose = short_video
    guided = pipeline(reference, pose[:3], num_inference_steps=1, seed=0)
    unguided = pipeline(reference, pose[:3], num_inference_steps=1, seed=0, guidance_scale=1.0)
    assert guided.guidance_applied and not unguided.guidance_applied
    assert np.abs(guided.frames.astype(int) - unguided.frames).max() > 0
    pipeline.save_pretrained(tmp_path / "with_image_prompt")
    assert (tmp_path / "with_image_prompt" / "image_prompt").is_dir()
    loaded = XDynaPipeline.from_pretrained(tmp_path / "with_image_prompt")
    reloaded = loaded(reference, pose[:3], num_inference_steps=1, seed=0).frames.astype(int)
    # Same weights, same seed; freshly loaded tensors may take other (equally exact) kernel paths,
    # so a float-rounding difference can flip a pixel by one uint8 level, never more.
    difference = np.abs(reloaded - guided.frames)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
