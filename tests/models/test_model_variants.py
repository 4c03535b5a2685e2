"""The paper's ablations (Table 4) as config switches: zero-init equivalences, trainable sets,
cross-frame GroupNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from model_helpers import image_prompt_of, latent_inputs, perturb, tiny_model

from xdyna.errors import ConfigError
from xdyna.models.flavours import TINY

VARIANTS = {
    "xdyna_with_image_prompt": dict(image_prompt=True),
    "w_ipa": dict(reference="ip_adapter", image_prompt=True),
    "w_lmk": dict(face="landmarks_in_pose"),
    "wo_face": dict(face="none"),
}
STAGE1 = {"xdyna_with_image_prompt": "dynamics_adapter", "w_ipa": "image_prompt", "w_refnet": "reference_net"}


def plain_unet_of(model) -> UNet2DConditionModel:
    """The model's frozen SD UNet as a plain diffusers UNet (same weights, default processors)."""
    base = UNet2DConditionModel(**TINY.unet)
    own = {k.removeprefix("unet."): v for k, v in model.state_dict().items() if k.startswith("unet.")}
    base.load_state_dict({k: own[k] for k in base.state_dict()})
    return base


def per_frame_base(model, noisy, timesteps):
    base = plain_unet_of(model)
    text = model.prompt_embeds.expand(noisy.shape[0] * noisy.shape[1], -1, -1)
    return base(noisy.flatten(0, 1), timesteps.repeat_interleave(noisy.shape[1]), text).sample.unflatten(0, noisy.shape[:2])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_init_equals_base_unet_for_every_variant(variant):
    model = tiny_model(**VARIANTS[variant])
    noisy, reference, timesteps, pose, face = latent_inputs()
    face = face if model.face_controlnet is not None else None
    prompt = image_prompt_of(model)
    with torch.no_grad():
        expected = per_frame_base(model, noisy, timesteps)
        torch.testing.assert_close(model.denoise(noisy, timesteps, reference, pose, face, image_prompt=prompt), expected, atol=2e-5, rtol=1e-4)
        perturb(model, [STAGE1.get(variant, "dynamics_adapter")])
        assert (model.denoise(noisy, timesteps, reference, pose, face, image_prompt=prompt) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("reference", ["reference_net", "kv_concat"])
def test_reference_net_starts_as_duplicated_keys(reference):
    """K/V concatenation has no zero init (as in AnimateAnyone), but at init the ReferenceNet is the
    UNet (kv_concat: the reference runs through the UNet itself): when a frame equals the reference,
    [k(x); k(x)] attention equals plain attention, so the model equals the base UNet exactly. Wrong
    layer wiring breaks this."""
    model = tiny_model(reference=reference)
    _, reference, timesteps, _, _ = latent_inputs()
    frames = reference.unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()
    with torch.no_grad():
        expected = per_frame_base(model, frames, timesteps)
        torch.testing.assert_close(model.denoise(frames, timesteps, reference), expected, atol=2e-5, rtol=1e-4)
        assert (model.denoise(frames, timesteps, reference + 1) - expected).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="one-pass formulation exists for the Dynamics-Adapter only"):
        model.denoise_joint(frames, timesteps, reference)


@pytest.mark.parametrize("variant", ["w_refnet", "w_ipa", "xdyna_with_image_prompt", "w_kv_concat"])
def test_gradients_reach_exactly_the_ablation_trainable_set(variant):
    overrides = {"w_refnet": dict(reference="reference_net"), "w_kv_concat": dict(reference="kv_concat")}.get(variant, VARIANTS.get(variant))
    model = tiny_model(**overrides)
    # kv_concat's reference path has no weights of its own (experiment=w_kv_concat trains the rest).
    trainable = (*((STAGE1[variant],) if variant in STAGE1 else ()), "motion_modules", "pose_controlnet")
    params = model.set_trainable(trainable)
    noisy, reference, timesteps, pose, _ = latent_inputs()
    prompt = model.encode_image_prompt_for_training(torch.rand(2, 3, 64, 64) * 2 - 1) if model.image_prompt is not None else None
    model.denoise(noisy, timesteps, reference, pose, image_prompt=prompt).square().mean().backward()
    for name, named in model.parameter_groups().items():
        for pname, p in named:
            assert (p.grad is not None) == (name in trainable), pname
    assert all(p.requires_grad for p in params)
    if variant == "w_refnet":
        # The ReferenceNet's tail after its last recorded layer is frozen, everything else trains.
        frozen_tail = [n for n, p in model.reference_net.named_parameters() if not p.requires_grad]
        assert frozen_tail and all(n.startswith(("up_blocks.3.attentions.2.", "conv_norm_out", "conv_out")) for n in frozen_tail)


def test_switched_off_component_cannot_train():
    model = tiny_model(face="none")
    with pytest.raises(ConfigError, match=r"\['face_controlnet'\] are switched off"):
        model.set_trainable(["face_controlnet"])
    with pytest.raises(ConfigError, match="no S-Face ControlNet"):
        noisy, reference, timesteps, pose, face = latent_inputs()
        model.denoise(noisy, timesteps, reference, pose, face)


def test_image_prompt_dropout_uses_the_blank_image():
    model = tiny_model(image_prompt=True, image_prompt_dropout=0.5)
    perturb(model, ["image_prompt"])
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        conditional, unconditional = model.encode_image_prompt(images)
        dropped = model.encode_image_prompt_for_training(images, torch.Generator().manual_seed(0))
    is_blank = (dropped - unconditional).abs().amax(dim=(1, 2)) < 1e-5
    is_kept = (dropped - conditional).abs().amax(dim=(1, 2)) < 1e-5
    assert bool((is_blank ^ is_kept).all()) and 16 < int(is_blank.sum()) < 48


def release_groupnorm(norm: torch.nn.GroupNorm, frames: int):
    """The X-Dyna release's ResNet norm written out on its own: AnimateDiff v1 applies
    ``nn.GroupNorm`` to the 5-D video ``(B, C, F, H, W)``, so statistics span every frame of a
    sample, the reference frame included. Replaces ``norm.forward`` of one module instance."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        video = x.unflatten(0, (-1, frames)).transpose(1, 2)  # (B*F, C, H, W) rows -> (B, C, F, H, W)
        out = torch.nn.functional.group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return out.transpose(1, 2).flatten(0, 1)

    return forward


def test_cross_frame_groupnorm_is_the_one_pass_release_formulation():
    """AnimateDiff v1 / X-Dyna release statistics: ResNet GroupNorms span all frames of a sample,
    the reference included, so the reference cannot be cached; denoise runs the one-pass path.

    The expected output comes from a model built with per-frame norms everywhere whose ResNet
    norms are swapped for :func:`release_groupnorm`: the frame-aware norms of the model under
    test (and their mode switches) take no part in it."""
    model = tiny_model(resnet_groupnorm="across_frames", motion_groupnorm="per_frame")
    perturb(model, ["dynamics_adapter", "motion_modules", "pose_controlnet"])  # off zero init: every path shapes the output
    per_frame = tiny_model(motion_groupnorm="per_frame")
    per_frame.load_state_dict(model.state_dict())
    release = copy.deepcopy(per_frame)
    noisy, reference, timesteps, pose, _ = latent_inputs()
    joint_frames = noisy.shape[1] + 1  # the reference is frame 0 of the one-pass clip
    swapped = 0
    for name, module in release.unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and (".resnets." in name or name == "conv_norm_out"):
            module.forward = release_groupnorm(module, joint_frames)
            swapped += 1
    assert swapped == 2 * (4 * 2 + 4 * 3 + 2) + 1  # 2 norms per ResNet (4x2 down, 4x3 up, 2 mid), conv_norm_out
    with torch.no_grad():
        expected = release.denoise_joint(noisy, timesteps, reference, pose)
        got = model.denoise(noisy, timesteps, reference, pose)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # Statistics are shared across frames: changing one frame changes the others' predictions,
        # and per-frame statistics give another output.
        moved = noisy.clone()
        moved[:, 0] += 3
        assert (model.denoise(moved, timesteps, reference, pose)[:, 1:] - got[:, 1:]).abs().max() > 1e-4
        assert (per_frame.denoise_joint(noisy, timesteps, reference, pose) - got).abs().max() > 1e-4
    assert not model.caches_reference
    with pytest.raises(ConfigError, match="cannot be cached"):
        model.encode_reference(reference, timesteps)
