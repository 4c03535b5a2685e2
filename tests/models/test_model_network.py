"""The X-Dyna network on the tiny flavour: exact equivalences, trainable sets, memory switches."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from model_helpers import B, F, latent_inputs, perturb, tiny_model

from xdyna.errors import ConfigError
from xdyna.models import COMPONENTS, ModelConfig, PretrainedNotFoundError, build_model
from xdyna.models.attention import DynamicsAdapterProcessor, multi_head_attention

STAGE1 = ("dynamics_adapter", "motion_modules", "pose_controlnet")


def base_unet_prediction(model, base: UNet2DConditionModel, noisy, timesteps):
    """Plain SD UNet, frame by frame, with the model's empty-prompt encoding."""
    text = model.prompt_embeds.expand(noisy.shape[0] * noisy.shape[1], -1, -1)
    frames = noisy.shape[1]
    return base(noisy.flatten(0, 1), timesteps.repeat_interleave(frames), text).sample.unflatten(0, noisy.shape[:2])


def test_adapter_on_every_spatial_self_attention():
    model = tiny_model()
    adapters = [m for m in model.unet.modules() if isinstance(m, DynamicsAdapterProcessor)]
    # SD1.5 layout: 6 down + 1 mid + 9 up transformer blocks.
    assert len(adapters) == 16
    assert all("motion_modules" not in a.layer_name and a.layer_name.endswith("attn1") for a in adapters)
    for a in adapters:
        attn = model.unet.get_submodule(a.layer_name)
        assert torch.equal(a.q_ff.weight, attn.to_q.weight)
        assert a.out_ff.weight.abs().sum() == 0 and a.out_ff.bias.abs().sum() == 0
    motion = {n.split(".motion_modules.")[0] for n, _ in model.unet.named_modules() if ".motion_modules." in n}
    # Motion modules at all four resolutions, 2 per down block and 3 per up block, none in mid.
    assert not any(n.startswith("mid_block") for n in motion)
    per_block = {block: len(model.unet.get_submodule(block).motion_modules) for block in motion}
    assert per_block == {**{f"down_blocks.{i}": 2 for i in range(4)}, **{f"up_blocks.{i}": 3 for i in range(4)}}
    first = model.unet.down_blocks[0].motion_modules[0]
    assert first.transformer_blocks[0].attn1.heads == 8 and first.transformer_blocks[0].pos_embed.pe.shape[1] == 24
    assert first.proj_out.weight.abs().sum() == 0


def test_zero_init_equals_base_unet(tiny_sd15_folder):
    """At init the whole X-Dyna model (adapter, motion modules, ControlNets) equals plain SD per frame."""
    model = build_model(ModelConfig(pretrained={"sd15": str(tiny_sd15_folder)}))
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_folder / "unet")
    noisy, reference, timesteps, pose, face = latent_inputs()
    with torch.no_grad():
        ours = model.denoise(noisy, timesteps, reference, pose, face)
        expected = base_unet_prediction(model, base, noisy, timesteps)
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
        # The same comparison fails once the adapter has weights: the check above can fail.
        perturb(model, ["dynamics_adapter"])
        assert (model.denoise(noisy, timesteps, reference, pose, face) - expected).abs().max() > 1e-3


def test_cached_reference_equals_one_pass():
    """Reference features computed once and reused == reference as frame 0 of the same batch.

    Tolerance: 1e-5 absolute (float32; the two paths batch the same products differently)."""
    model = tiny_model()
    perturb(model)
    noisy, reference, timesteps, pose, face = latent_inputs()
    with torch.no_grad():
        cached = model.denoise(noisy, timesteps, reference, pose, face)
        one_pass = model.denoise_joint(noisy, timesteps, reference, pose, face)
        features = model.encode_reference(reference, timesteps)
        reused = model.denoise(noisy, timesteps, pose=pose, face=face, reference=features)
        # Context windows: two windows per sample, rows grouped per reference, read the same features.
        windows = torch.stack([noisy[:, :2], noisy[:, 1:]], dim=1).flatten(0, 1)
        window_pose = torch.stack([pose[:, :2], pose[:, 1:]], dim=1).flatten(0, 1)
        windowed = model.denoise(windows, timesteps.repeat_interleave(2), pose=window_pose, reference=features)
        windowed_alone = model.denoise(noisy[:, 1:], timesteps, reference, pose[:, 1:])
    assert len(features) == 16
    torch.testing.assert_close(cached, one_pass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reused, cached, atol=0, rtol=0)
    torch.testing.assert_close(windowed.unflatten(0, (B, 2))[:, 1], windowed_alone, atol=1e-5, rtol=1e-4)
    assert (cached - model.denoise(noisy, timesteps, reference + 1, pose, face)).abs().max() > 1e-4


@pytest.mark.parametrize("trainable", [STAGE1, ("face_controlnet",)], ids=["stage1", "stage2"])
def test_gradients_reach_exactly_the_trainable_components(trainable):
    model = tiny_model()
    params = model.set_trainable(trainable)
    noisy, reference, timesteps, pose, face = latent_inputs()
    model.denoise(noisy, timesteps, reference, pose, face).square().mean().backward()
    groups = model.parameter_groups()
    for name, named in groups.items():
        for pname, p in named:
            if name in trainable:
                assert p.requires_grad and p.grad is not None, pname
            else:
                assert not p.requires_grad and p.grad is None, pname
    assert sum(p.numel() for p in params) == sum(p.numel() for name in trainable for _, p in groups[name])
    # Every trainable tensor gets a gradient signal somewhere (zero-init layers included).
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


@pytest.mark.parametrize("resnet_groupnorm", ["per_frame", "across_frames"])
def test_gradient_checkpointing_gives_same_gradients(resnet_groupnorm):
    """Checkpointing re-runs blocks during backward; cross-frame GroupNorms must see the frame
    layout of the original call then, not the one current at backward time."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing, resnet_groupnorm=resnet_groupnorm)
        perturb(model)
        params = model.set_trainable(STAGE1)
        model.train()
        noisy, reference, timesteps, pose, _ = latent_inputs()
        model.denoise(noisy, timesteps, reference, pose).square().mean().backward()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_blank_conditions_give_finite_output():
    model = tiny_model()
    perturb(model)
    noisy, reference, timesteps, pose, face = latent_inputs()
    with torch.no_grad():
        out = model.denoise(noisy, timesteps, reference, torch.zeros_like(pose), torch.zeros_like(face))
    assert torch.isfinite(out).all()


def test_temporal_attention_chunking_matches_one_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 5, 16, generator=g) for _ in range(3))
    whole = multi_head_attention(q, k, v, heads=8)
    chunked = multi_head_attention(q, k, v, heads=8, max_batch=24)  # 3 rows x 8 heads per kernel call
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_missing_pretrained_folder_is_named(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match=r"model\.pretrained\.sd15: .*nowhere.* does not exist"):
        build_model(ModelConfig(pretrained={"sd15": str(tmp_path / "nowhere")}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(PretrainedNotFoundError, match=r"lacks \['vae', 'text_encoder'\]"):
        build_model(ModelConfig(pretrained={"sd15": str(tmp_path / "half")}))


def test_unknown_model_keys_and_values_are_rejected():
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_mapping({"flavor": "tiny"})
    with pytest.raises(ConfigError, match="model.face='eyes'"):
        ModelConfig.from_mapping({"face": "eyes"})
    with pytest.raises(ConfigError, match="needs model.image_prompt=true"):
        ModelConfig.from_mapping({"reference": "ip_adapter"})
    with pytest.raises(ConfigError, match="not both"):
        ModelConfig.from_mapping({"pretrained": {"motion_adapter": "a", "motion_module": "b"}})


def test_vae_round_trip_shapes(make_batch):
    model = tiny_model()
    video = make_batch(frames=2)["video"]
    latents = model.encode_video(video)
    assert latents.shape == (2, 2, 4, 128 // 8, 64 // 8)
    assert model.decode_latents(latents).shape == video.shape
