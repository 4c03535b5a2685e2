"""The reference-variant registry and its proof variant ``kv_concat`` (the reference through the
shared frozen UNet, its self-attention tokens concatenated to the generated frames' keys/values)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import B, latent_inputs, perturb, tiny_model

from xdyna.errors import ConfigError
from xdyna.models import (
    COMPONENTS,
    REFERENCE_VARIANTS,
    ModelConfig,
    WeightsMismatchError,
    build_model,
    reference_variant,
    save_component_safetensors,
)
from xdyna.models.attention import DynamicsAdapterProcessor

# Image prompt on where the variant needs it (ip_adapter), so every registered variant builds.
VARIANT_CONFIGS = {name: dict(reference=name, image_prompt=name == "ip_adapter") for name in REFERENCE_VARIANTS}


@pytest.mark.parametrize("name", REFERENCE_VARIANTS)
def test_parameter_groups_cover_the_model_once_and_follow_the_variant(name):
    model = tiny_model(**VARIANT_CONFIGS[name])
    variant = reference_variant(name)
    groups = model.parameter_groups()
    filed = [id(param) for named in groups.values() for _, param in named]
    assert len(filed) == len(set(filed))
    frozen_tail = {id(p) for n, p in model.named_parameters() if n.startswith("reference_net.")} - set(filed)
    assert {id(p) for p in model.parameters()} - frozen_tail == set(filed)
    present = {component for component in COMPONENTS if groups[component]}
    for component in variant.components:
        assert component in present
    # A component of another variant is absent here.
    others = {c for other in REFERENCE_VARIANTS for c in reference_variant(other).components} - set(variant.components)
    assert not others & present
    if variant.reference_component is not None:
        assert variant.reference_component in present


def test_unclaimed_processor_parameters_are_an_error_not_a_guess():
    """A processor with weights on attn1 of a variant whose processor has none must not be filed
    under some component by its name (it used to land in dynamics_adapter)."""
    model = tiny_model(reference="kv_concat")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = model.unet.get_submodule(layer)
    attn.set_processor(DynamicsAdapterProcessor(attn, layer))
    with pytest.raises(RuntimeError, match=rf"unet\.{layer}\.processor\.q_ff\.weight: an attention-processor parameter that no component"):
        model.parameter_groups()


def test_kv_concat_is_the_reference_net_variant_with_the_frozen_unet_as_its_reference_net():
    """Independent check of the wiring: w/RefNet whose ReferenceNet holds the UNet's own weights
    records the same tokens as kv_concat's reference pass through the shared UNet (frames differ
    from the reference, motion modules and pose ControlNet moved off their init)."""
    reference_net = tiny_model(reference="reference_net")
    perturb(reference_net, ["motion_modules", "pose_controlnet"])
    shared = tiny_model(reference="kv_concat")
    shared.load_state_dict({k: v for k, v in reference_net.state_dict().items() if not k.startswith("reference_net.")})
    reference_net.reference_net.load_state_dict({k: v for k, v in shared.unet.state_dict().items()
                                                 if k in reference_net.reference_net.state_dict()})
    noisy, reference, timesteps, pose, _ = latent_inputs()
    with torch.no_grad():
        expected = reference_net.denoise(noisy, timesteps, reference, pose)
        got = shared.denoise(noisy, timesteps, reference, pose)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert (shared.denoise(noisy, timesteps, reference + 1, pose) - got).abs().max() > 1e-4


def test_kv_concat_reference_pass_is_cached_and_shared_by_context_windows():
    model = tiny_model(reference="kv_concat")
    perturb(model, ["motion_modules", "pose_controlnet"])
    assert model.caches_reference
    noisy, reference, timesteps, pose, _ = latent_inputs()
    with torch.no_grad():
        features = model.encode_reference(reference, timesteps)
        direct = model.denoise(noisy, timesteps, reference, pose)
        reused = model.denoise(noisy, timesteps, pose=pose, reference=features)
        windows = torch.stack([noisy[:, :2], noisy[:, 1:]], dim=1).flatten(0, 1)
        window_pose = torch.stack([pose[:, :2], pose[:, 1:]], dim=1).flatten(0, 1)
        windowed = model.denoise(windows, timesteps.repeat_interleave(2), pose=window_pose, reference=features)
        alone = model.denoise(noisy[:, 1:], timesteps, reference, pose[:, 1:])
    # One token bank per spatial self-attention of the tiny UNet (16), one row per reference.
    assert len(features) == 16 and not features.keys and features.batch_size == B
    assert direct.shape == noisy.shape
    torch.testing.assert_close(reused, direct, atol=0, rtol=0)
    torch.testing.assert_close(windowed.unflatten(0, (B, 2))[:, 1], alone, atol=1e-5, rtol=1e-4)


def test_kv_concat_trains_no_reference_weights():
    model = tiny_model(reference="kv_concat")
    assert model.config.reference_component is None
    assert not any(model.component_parameters()[c] for c in ("dynamics_adapter", "reference_net"))
    with pytest.raises(ConfigError, match=r"\['dynamics_adapter'\] are switched off .*reference path has no trainable weights"):
        model.set_trainable(["dynamics_adapter", "motion_modules", "pose_controlnet"])
    with pytest.raises(ConfigError, match="kv_concat variant has no such formulation"):
        ModelConfig(reference="kv_concat", resnet_groupnorm="across_frames").validate()
    with pytest.raises(ConfigError, match=r"model.reference='kv_concatenation'; choose one of \('dynamics_adapter'"):
        ModelConfig(reference="kv_concatenation").validate()


def test_kv_concat_components_round_trip_and_refuse_a_dynamics_adapter_file(tmp_path):
    source = tiny_model(reference="kv_concat")
    perturb(source)
    written = {component: save_component_safetensors(source, component, tmp_path / f"{component}.safetensors")
               for component, params in source.component_parameters().items() if params}
    assert set(written) == {"motion_modules", "pose_controlnet", "face_controlnet"}
    loaded = build_model(ModelConfig(reference="kv_concat", pretrained={"components": {k: str(v) for k, v in written.items()}}))
    ours = loaded.state_dict()
    assert all(torch.equal(ours[name], value) for name, value in source.state_dict().items())
    adapter = tiny_model()
    save_component_safetensors(adapter, "dynamics_adapter", tmp_path / "adapter.safetensors")
    with pytest.raises(WeightsMismatchError, match="component 'dynamics_adapter' is switched off"):
        build_model(ModelConfig(reference="kv_concat", pretrained={"components": {"dynamics_adapter": str(tmp_path / "adapter.safetensors")}}))
