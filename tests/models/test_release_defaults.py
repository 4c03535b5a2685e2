"""Released X-Dyna weights reproduce the release by default: its GroupNorm modes when its UNet is
loaded (recorded wherever the model config is saved), the motion modules' GroupNorm group count
of the motion adapter, and the image prompt's pixels as CLIPImageProcessor() prepares them."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import transformers
from diffusers import MotionAdapter
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from model_helpers import perturb, tiny_model
from test_model_loading import randomised, xdyna_release_unet_state

from xdyna.models import ModelConfig, build_model
from xdyna.models.flavours import TINY
from xdyna.models.image_prompt import build_image_prompt
from xdyna.models.motion import FrameGroupNorm
from xdyna.pipelines.pipeline import XDynaPipeline

RELEASE = {"resnet_groupnorm": "across_frames", "motion_groupnorm": "per_frame"}
OURS = {"resnet_groupnorm": "per_frame", "motion_groupnorm": "across_frames"}


def adapter_with_groups(groups: int) -> MotionAdapter:
    assert groups != TINY.unet["norm_num_groups"]  # else the test could not tell the counts apart
    return randomised(MotionAdapter(**{**TINY.motion_adapter, "motion_norm_num_groups": groups}), 4)


@pytest.fixture(scope="module")
def release_files(tmp_path_factory) -> dict[str, str]:
    """A released-format X-Dyna UNet checkpoint (``state_dict`` wrapper, ``module.`` prefix) and a
    motion adapter folder whose GroupNorm group count (4) differs from the ResNets' (8)."""
    folder = tmp_path_factory.mktemp("release")
    source = tiny_model()
    perturb(source)
    torch.save({"state_dict": xdyna_release_unet_state(source), "epoch": 5}, folder / "unet.pth")
    adapter = adapter_with_groups(4)
    adapter.save_pretrained(folder / "motion")
    return {"xdyna_unet": str(folder / "unet.pth"), "motion_adapter": str(folder / "motion")}


@pytest.fixture(scope="module")
def release_model(release_files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto modes: no warning
        return build_model(ModelConfig(pretrained=release_files))


def norm_modes(model) -> dict[str, set[bool]]:
    """Whether the built network's ResNet and motion-module norms span all frames."""
    resnet, motion = set(), set()
    for name, module in model.unet.named_modules():
        if isinstance(module, FrameGroupNorm):
            (motion if ".motion_modules." in name else resnet).add(module.across_frames)
    return {"resnet_groupnorm": resnet, "motion_groupnorm": motion}


def as_norm_modes(modes: dict[str, str]) -> dict[str, set[bool]]:
    return {key: {mode == "across_frames"} for key, mode in modes.items()}


def motion_groups(model) -> list[int]:
    return [module.norm.num_groups for module in model.unet.modules() if isinstance(module, AnimateDiffTransformer3D)]


def test_release_unet_gets_the_release_modes_unless_set(release_files, release_model):
    assert release_model.config.groupnorm_modes() == RELEASE
    assert norm_modes(release_model) == as_norm_modes(RELEASE)
    assert not release_model.caches_reference  # the release's ResNet statistics tie the reference to its clip

    # Without released weights (and for variants the release file cannot load into) nothing moves.
    assert ModelConfig().groupnorm_modes() == OURS
    assert ModelConfig(reference="reference_net", pretrained={"xdyna_unet": "unet.pth"}).groupnorm_modes() == OURS
    assert ModelConfig(**RELEASE, pretrained={"xdyna_unet": "unet.pth"}).release_groupnorm_differences() == []

    # Explicit modes win, with one warning naming each difference from the release.
    with pytest.warns(UserWarning) as caught:
        model = build_model(ModelConfig(resnet_groupnorm="per_frame", motion_norm_groups=2, pretrained=release_files))
    messages = [str(w.message) for w in caught if "xdyna_unet" in str(w.message)]
    assert len(messages) == 1
    assert "model.resnet_groupnorm=per_frame (release: across_frames)" in messages[0]
    assert "motion_groupnorm" not in messages[0]  # left at auto: the release's
    assert model.config.groupnorm_modes() == {"resnet_groupnorm": "per_frame", "motion_groupnorm": "per_frame"}
    assert norm_modes(model) == as_norm_modes(model.config.groupnorm_modes())
    assert set(motion_groups(model)) == {2}  # a configured group count overrides the adapter's


def test_motion_groupnorm_groups_are_the_adapters(release_files, release_model):
    assert motion_groups(release_model) == [4] * 20 and release_model.config.motion_norm_groups == 4
    resnet_norms = {m.num_groups for n, m in release_model.unet.named_modules() if ".resnets." in n and isinstance(m, torch.nn.GroupNorm)}
    assert resnet_norms == {TINY.unet["norm_num_groups"]}
    # The motion module computes what the adapter's own module computes (both normalise over all
    # frames here: compare with the release's per-frame statistics switched off).
    ours = release_model.unet.down_blocks[1].motion_modules[0]
    theirs = MotionAdapter.from_pretrained(release_files["motion_adapter"]).down_blocks[1].motion_modules[0]
    theirs.load_state_dict(ours.state_dict())  # the released UNet's motion weights replaced the adapter's
    frames = 3
    hidden = torch.randn(2 * frames, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    ours.norm.across_frames = True
    try:
        with torch.no_grad():
            assert torch.allclose(ours(hidden, num_frames=frames), theirs(hidden, num_frames=frames), atol=1e-6)
    finally:
        ours.norm.across_frames = False


def test_pipeline_folder_keeps_release_modes_and_motion_groups(tmp_path, release_model):
    """A pipeline folder records no weight paths: the modes and group count travel in its config."""
    XDynaPipeline(release_model).save_pretrained(tmp_path / "pipeline")
    loaded = XDynaPipeline.from_pretrained(tmp_path / "pipeline").model
    assert loaded.config.groupnorm_modes() == RELEASE and norm_modes(loaded) == as_norm_modes(RELEASE)
    assert motion_groups(loaded) == [4] * 20
    # Rebuilding from the saved mapping (what export manifests and checkpoints carry) agrees too.
    assert ModelConfig.from_mapping(asdict(release_model.config)).groupnorm_modes() == RELEASE


def reference_image(height: int, width: int) -> np.ndarray:
    """A non-square uint8 image with structure at every scale (gradients plus noise)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    return np.clip(ramp * 0.6 + rng.integers(0, 256, (height, width, 3)) * 0.4, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width", [(448, 256), (150, 240)])
def test_image_prompt_pixels_are_clip_image_processors(height, width):
    image = reference_image(height, width)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    encoder = dict(TINY.image_encoder, image_size=224)  # CLIPImageProcessor()'s size
    prompt = build_image_prompt(encoder, TINY.image_prompt)
    ours = prompt.preprocess(images)
    # The release's transformers resized with PIL; transformers 5 keeps that as CLIPImageProcessorPil.
    pil_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    expected = torch.as_tensor(np.asarray(pil_processor()(images=image, return_tensors="pt").pixel_values))
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    # transformers 5's default CLIPImageProcessor (torchvision) rounds differently: one uint8 level at most.
    torchvision_like = torch.as_tensor(np.asarray(transformers.CLIPImageProcessor()(images=image, return_tensors="pt").pixel_values))
    level = 1 / 255 / min(prompt.std.flatten().tolist())
    assert (ours - torchvision_like).abs().max() <= level + 1e-5
    # The squash option sees the whole image, stretched: other pixels.
    squashed = build_image_prompt(encoder, TINY.image_prompt, resize="squash").preprocess(images)
    assert (squashed - expected).abs().mean() > 10 * level
    assert ModelConfig().image_prompt_resize == "center_crop"
