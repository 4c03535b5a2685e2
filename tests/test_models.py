"""The X-Dyna network on the tiny flavour: exact equivalences, trainable sets, loading."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from xdyna.models import COMPONENTS, ModelConfig, PretrainedNotFoundError, build_model
from xdyna.models.attention import DynamicsAdapterProcessor

B, F, H, W = 2, 4, 128, 64


def latents_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(B, F, 4, H // 8, W // 8, generator=g)
    reference = torch.randn(B, 4, H // 8, W // 8, generator=g)
    timesteps = torch.tensor([3, 700])
    return noisy, reference, timesteps


def perturb_trainable(model, scale=0.05, seed=1):
    """Move every trainable component off its (zero) init so equivalences are not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in model.component_parameters().values():
            for _, p in params:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig())


def test_adapter_on_every_spatial_self_attention(tiny_model):
    adapters = [m for m in tiny_model.unet.modules() if isinstance(m, DynamicsAdapterProcessor)]
    # SD1.5 layout: 6 down + 1 mid + 9 up transformer blocks.
    assert len(adapters) == 16
    assert all("motion_modules" not in a.layer_name and a.layer_name.endswith("attn1") for a in adapters)
    for a in adapters:
        attn = tiny_model.unet.get_submodule(a.layer_name)
        assert torch.equal(a.q_ff.weight, attn.to_q.weight)
        assert a.out_ff.weight.abs().sum() == 0 and a.out_ff.bias.abs().sum() == 0
    motion = {n.split(".motion_modules.")[0] for n, _ in tiny_model.unet.named_modules() if ".motion_modules." in n}
    assert not any(n.startswith("mid_block") for n in motion)


def test_zero_init_equals_base_unet(tiny_sd15_folder):
    """At init the whole X-Dyna model (adapter, motion modules, ControlNets) equals plain SD per frame."""
    model = build_model(ModelConfig(pretrained={"sd15": str(tiny_sd15_folder)}))
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_folder / "unet")
    noisy, reference, timesteps = latents_inputs()
    pose = torch.rand(B, F, 3, H, W)
    face = torch.rand(B, F, 6, H, W)
    with torch.no_grad():
        ours = model.denoise(noisy, timesteps, reference, pose, face)
        text = model.prompt_embeds.expand(B * F, -1, -1)
        expected = base(noisy.flatten(0, 1), timesteps.repeat_interleave(F), text).sample.unflatten(0, (B, F))
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_zero_init_is_not_vacuous(tiny_sd15_folder):
    """The same comparison fails once the adapter has weights: the test above can fail."""
    model = build_model(ModelConfig(pretrained={"sd15": str(tiny_sd15_folder)}))
    perturb_trainable(model)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_folder / "unet")
    noisy, reference, timesteps = latents_inputs()
    with torch.no_grad():
        ours = model.denoise(noisy, timesteps, reference, torch.rand(B, F, 3, H, W))
        text = model.prompt_embeds.expand(B * F, -1, -1)
        expected = base(noisy.flatten(0, 1), timesteps.repeat_interleave(F), text).sample.unflatten(0, (B, F))
    assert (ours - expected).abs().max() > 1e-3


def test_cached_reference_equals_one_pass(tiny_model):
    """Reference features computed once and reused == reference as frame 0 of the same batch."""
    model = build_model(ModelConfig())
    perturb_trainable(model)
    noisy, reference, timesteps = latents_inputs()
    pose, face = torch.rand(B, F, 3, H, W), torch.rand(B, F, 6, H, W)
    with torch.no_grad():
        cached = model.denoise(noisy, timesteps, reference, pose, face)
        one_pass = model.denoise_joint(noisy, timesteps, reference, pose, face)
        features = model.encode_reference(reference, timesteps)
        reused = model.denoise(noisy, timesteps, pose=pose, face=face, reference=features)
        reused_again = model.denoise(noisy, timesteps, pose=pose, face=face, reference=features)
    assert len(features) == 16
    torch.testing.assert_close(cached, one_pass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reused, cached, atol=0, rtol=0)
    torch.testing.assert_close(reused_again, cached, atol=0, rtol=0)


def test_reference_changes_output_only_through_adapter():
    model = build_model(ModelConfig())
    noisy, reference, timesteps = latents_inputs()
    with torch.no_grad():
        a = model.denoise(noisy, timesteps, reference)
        b = model.denoise(noisy, timesteps, reference + 1)
    torch.testing.assert_close(a, b)  # zero-init adapter: reference has no effect yet
    perturb_trainable(model)
    with torch.no_grad():
        a = model.denoise(noisy, timesteps, reference)
        b = model.denoise(noisy, timesteps, reference + 1)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize(
    "trainable",
    [("dynamics_adapter", "motion_modules", "pose_controlnet"), ("face_controlnet",)],
    ids=["stage1", "stage2"],
)
def test_gradients_reach_exactly_the_trainable_components(trainable):
    model = build_model(ModelConfig())
    params = model.set_trainable(trainable)
    noisy, reference, timesteps = latents_inputs()
    out = model.denoise(noisy, timesteps, reference, torch.rand(B, F, 3, H, W), torch.rand(B, F, 6, H, W))
    out.square().mean().backward()
    groups = model.component_parameters()
    trainable_ids = {id(p) for p in params}
    for name in COMPONENTS:
        for pname, p in groups[name]:
            if name in trainable:
                assert p.requires_grad and p.grad is not None, pname
            else:
                assert not p.requires_grad and p.grad is None, pname
    frozen = [n for n, p in model.named_parameters() if id(p) not in trainable_ids]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    # Every trainable tensor gets a gradient signal somewhere (zero-init layers included).
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


def test_gradient_checkpointing_gives_same_gradients():
    results = []
    for checkpointing in (False, True):
        model = build_model(ModelConfig(gradient_checkpointing=checkpointing))
        perturb_trainable(model)
        params = model.set_trainable(["dynamics_adapter", "motion_modules", "pose_controlnet"])
        model.train()
        noisy, reference, timesteps = latents_inputs()
        model.denoise(noisy, timesteps, reference, torch.rand(B, F, 3, H, W, generator=torch.Generator().manual_seed(0))).square().mean().backward()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_blank_conditions_give_finite_output():
    model = build_model(ModelConfig())
    perturb_trainable(model)
    noisy, reference, timesteps = latents_inputs()
    with torch.no_grad():
        out = model.denoise(noisy, timesteps, reference, torch.zeros(B, F, 3, H, W), torch.zeros(B, F, 6, H, W))
    assert torch.isfinite(out).all()


def test_missing_pretrained_folder_is_named(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match=r"model\.pretrained\.sd15: .*nowhere.* does not exist"):
        build_model(ModelConfig(pretrained={"sd15": str(tmp_path / "nowhere")}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(PretrainedNotFoundError, match=r"lacks \['vae', 'text_encoder'\]"):
        build_model(ModelConfig(pretrained={"sd15": str(tmp_path / "half")}))


def test_unknown_model_keys_and_values_are_rejected():
    from xdyna.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_mapping({"flavor": "tiny"})
    with pytest.raises(ConfigError, match="model.face='eyes'"):
        ModelConfig.from_mapping({"face": "eyes"})


def test_vae_round_trip_shapes(tiny_model, make_batch):
    video = make_batch(frames=3)["video"]
    latents = tiny_model.encode_video(video)
    assert latents.shape == (2, 3, 4, H // 8, W // 8)
    assert tiny_model.decode_latents(latents).shape == video.shape
