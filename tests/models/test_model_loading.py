"""Loading real artifacts, never downloading: diffusers folders and original single-file formats,
written here by the tests in their original key layouts; mismatches fail without half-loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel
from model_helpers import perturb, tiny_model
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from xdyna.errors import ConfigError
from xdyna.models import (
    COMPONENTS,
    ModelConfig,
    WeightsMismatchError,
    build_model,
    load_component_safetensors,
    save_component_safetensors,
)
from xdyna.models.flavours import TINY
from xdyna.models.loading import ordered_attention_layers


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def assert_same_weights(ours: dict, theirs: dict, prefix: str) -> None:
    for name, tensor in theirs.items():
        assert torch.equal(ours[prefix + name], tensor), prefix + name


def original_motion_key(diffusers_key: str) -> str:
    """Our (diffusers) motion-module key written in the original AnimateDiff layout."""
    block, rest = diffusers_key.split(".motion_modules.")
    index, rest = rest.split(".", 1)
    renames = {"attn1.": "attention_blocks.0.", "attn2.": "attention_blocks.1.", "norm1.": "norms.0.", "norm2.": "norms.1.", "norm3.": "ff_norm."}
    if rest.startswith("transformer_blocks.0."):
        inner = rest.removeprefix("transformer_blocks.0.")
        for ours, theirs in renames.items():
            if inner.startswith(ours):
                inner = theirs + inner.removeprefix(ours)
        rest = "transformer_blocks.0." + inner
    return f"{block}.motion_modules.{index}.temporal_transformer.{rest}"


def animatediff_original_state(motion: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in motion.items():
        if key.endswith("pos_embed.pe"):
            # The original keeps one sinusoid table per temporal attention.
            base = key.split(".motion_modules.")[0] + ".motion_modules." + key.split(".motion_modules.")[1].split(".")[0]
            for attention in (0, 1):
                state[f"{base}.temporal_transformer.transformer_blocks.0.attention_blocks.{attention}.pos_encoder.pe"] = tensor
        else:
            state[original_motion_key(key)] = tensor
    return state


def test_diffusers_folders_round_trip(tmp_path, tiny_sd15_folder):
    adapter = randomised(MotionAdapter(**TINY.motion_adapter), 1)
    adapter.save_pretrained(tmp_path / "motion")
    pose = randomised(ControlNetModel.from_unet(UNet2DConditionModel(**TINY.unet),
                                                conditioning_embedding_out_channels=TINY.controlnet_embedding_channels), 2)
    pose.save_pretrained(tmp_path / "pose")
    encoder = randomised(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY.image_encoder)), 3)
    encoder.save_pretrained(tmp_path / "image_encoder")
    model = build_model(ModelConfig(image_prompt=True, pretrained=dict(
        sd15=str(tiny_sd15_folder), motion_adapter=str(tmp_path / "motion"), pose_controlnet=str(tmp_path / "pose"),
        image_encoder=str(tmp_path / "image_encoder"), vae=str(tiny_sd15_folder / "vae"))))
    state = model.state_dict()
    assert_same_weights(state, {k: v for k, v in adapter.state_dict().items() if ".motion_modules." in k}, "unet.")
    assert_same_weights(state, pose.state_dict(), "pose_controlnet.")
    assert_same_weights(state, encoder.state_dict(), "image_prompt.image_encoder.")
    with pytest.raises(ConfigError, match="takes 3-channel conditions, expected 6"):
        build_model(ModelConfig(pretrained=dict(face_controlnet=str(tmp_path / "pose"))))  # a 3-channel net as S-Face


def test_animatediff_original_ckpt_round_trip(tmp_path):
    source = tiny_model()
    perturb(source, ["motion_modules"])
    motion = {k.removeprefix("unet."): v for k, v in source.state_dict().items() if ".motion_modules." in k}
    torch.save({"state_dict": animatediff_original_state(motion)}, tmp_path / "mm_tiny.ckpt")
    model = build_model(ModelConfig(pretrained={"motion_module": str(tmp_path / "mm_tiny.ckpt")}))
    assert_same_weights(model.state_dict(), motion, "unet.")
    assert model.load_reports[0].loaded and not [n for n in model.load_reports[0].not_in_file if ".motion_modules." in n]


def original_resampler_state(resampler: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout Resampler state written in the original IP-Adapter layout."""
    names = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out", "ff.0": "1.0",
             "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}
    original = {}
    for key, tensor in resampler.items():
        if not key.startswith("layers."):
            original[key] = tensor
            continue
        layer = key.split(".")[1]
        if ".attn.to_k." in key:  # the original fuses key and value projections
            original[f"layers.{layer}.0.to_kv.weight"] = torch.cat([tensor, resampler[key.replace("to_k", "to_v")]])
        elif ".attn.to_v." not in key:
            module, param = key.removeprefix(f"layers.{layer}.").rsplit(".", 1)
            original[f"layers.{layer}.{names[module]}.{param}"] = tensor
    return original


def test_ip_adapter_resampler_mapping_agrees_with_diffusers_converter():
    """diffusers converts original IP-Adapter-plus files itself (assuming depth 4, 64-wide heads):
    our mapping must give the same tensors under the same names."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from xdyna.models.loading import convert_ip_adapter

    resampler = randomised(IPAdapterPlusImageProjection(embed_dims=32, hidden_dims=128, output_dims=32, depth=4,
                                                        dim_head=64, heads=2, num_queries=16), 4).state_dict()
    original = original_resampler_state(resampler)
    theirs = UNet2DConditionModel(**TINY.unet)._convert_ip_adapter_image_proj_to_diffusers(original).state_dict()
    ours, foreign = convert_ip_adapter({f"image_proj.{k}": v for k, v in original.items()}, [], "")
    assert not foreign and set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_ip_adapter_original_file_round_trip(tmp_path):
    """``ip_adapter.<i>`` counts a plain UNet's attention processors (down, up, mid; attn1, attn2)."""
    from diffusers import UNet2DConditionModel

    source = tiny_model(image_prompt=True)
    perturb(source, ["image_prompt"])
    state = source.state_dict()
    plain_order = [n.removesuffix(".processor") for n in UNet2DConditionModel(**TINY.unet).attn_processors]
    assert ordered_attention_layers(source.unet) == plain_order
    ip_layers = {str(i): name for i, name in enumerate(plain_order) if name.endswith("attn2")}
    resampler = {k.removeprefix("image_prompt.resampler."): v for k, v in state.items() if k.startswith("image_prompt.resampler.")}
    original = {"image_proj": original_resampler_state(resampler), "ip_adapter": {
        f"{index}.{kind}.weight": state[f"unet.{name}.processor.{kind}.weight"]
        for index, name in ip_layers.items() for kind in ("to_k_ip", "to_v_ip")}}
    torch.save(original, tmp_path / "ip-adapter-plus_tiny.bin")
    model = build_model(ModelConfig(image_prompt=True, pretrained={"ip_adapter": str(tmp_path / "ip-adapter-plus_tiny.bin")}))
    ours = model.state_dict()
    for name, _ in source.component_parameters()["image_prompt"]:
        assert torch.equal(ours[name], state[name]), name


def xdyna_release_unet_state(model) -> dict[str, torch.Tensor]:
    """The model's UNet in the released X-Dyna layout, wrapped as their training saved it."""
    released = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith("unet."):
            continue
        key = key.removeprefix("unet.")
        if ".motion_modules." in key:
            continue
        key = key.replace("attn1.processor.q_ff.", "attn1.to_q_ff.").replace("attn1.processor.out_ff.", "attn1.to_out_ff.")
        key = key.replace("attn2.processor.to_k_ip.", "attn2.to_k_ip.").replace("attn2.processor.to_v_ip.", "attn2.to_v_ip.")
        released["module." + key] = tensor
    motion = {k.removeprefix("unet."): v for k, v in model.state_dict().items() if ".motion_modules." in k}
    released.update({"module." + k: v for k, v in animatediff_original_state(motion).items()})
    return released


def test_xdyna_release_checkpoints_round_trip(tmp_path):
    source = tiny_model(image_prompt=True)
    perturb(source)
    torch.save({"state_dict": xdyna_release_unet_state(source), "epoch": 5}, tmp_path / "unet.pth")
    torch.save({"module." + k: v for k, v in source.pose_controlnet.state_dict().items()}, tmp_path / "pose.ckpt")
    torch.save(source.face_controlnet.state_dict(), tmp_path / "face.ckpt")
    model = build_model(ModelConfig(image_prompt=True, pretrained=dict(
        xdyna_unet=str(tmp_path / "unet.pth"), xdyna_pose_controlnet=str(tmp_path / "pose.ckpt"),
        xdyna_face_controlnet=str(tmp_path / "face.ckpt"))))
    ours, theirs = model.state_dict(), source.state_dict()
    for key in theirs:
        if not key.startswith("image_prompt.") and key.split(".")[0] in ("unet", "pose_controlnet", "face_controlnet"):
            assert torch.equal(ours[key], theirs[key]), key


def test_component_safetensors_round_trip(tmp_path):
    source = tiny_model(image_prompt=True)
    perturb(source)
    target = tiny_model(image_prompt=True)
    written = {}
    for component, params in source.component_parameters().items():
        if params:
            written[component] = save_component_safetensors(source, component, tmp_path / f"{component}.safetensors")
            load_component_safetensors(target, component, written[component])
    assert set(written) == set(COMPONENTS) - {"reference_net"}
    ours = target.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(ours[name], value), name
    via_config = build_model(ModelConfig(image_prompt=True, pretrained={"components": {k: str(v) for k, v in written.items()}}))
    assert torch.equal(via_config.state_dict()["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.out_ff.weight"],
                       source.state_dict()["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.out_ff.weight"])
    with pytest.raises(WeightsMismatchError, match="holds component 'motion_modules', not 'dynamics_adapter'"):
        load_component_safetensors(target, "dynamics_adapter", written["motion_modules"])


def test_mismatched_checkpoints_fail_listing_what_and_load_nothing(tmp_path):
    source = tiny_model()
    perturb(source, ["motion_modules"])
    motion = {k.removeprefix("unet."): v for k, v in source.state_dict().items() if ".motion_modules." in k}
    original = animatediff_original_state(motion)
    wrong_shape = dict(original)
    first = next(k for k in original if k.endswith("proj_in.weight"))
    wrong_shape[first] = torch.zeros(3, 3)
    foreign = dict(original, **{"mid_block.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(2),
                                "cond_stage_model.weird": torch.zeros(1)})
    missing = {k: v for k, v in original.items() if "up_blocks.3" not in k}
    cases = {"wrong_shape": (wrong_shape, r"1 shape mismatch\(es\): .*proj_in.weight \(3, 3\) vs"),
             "foreign": (foreign, r"key\(s\) of no known layout: cond_stage_model.weird.*no counterpart in this model: unet.mid_block"),
             "missing": (missing, r"required key\(s\) missing: unet.up_blocks.3.motion_modules")}
    for name, (state, message) in cases.items():
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(WeightsMismatchError, match=message):
            build_model(ModelConfig(pretrained={"motion_module": str(tmp_path / f"{name}.safetensors")}))
    # Nothing half-loaded: a failing load leaves the target as it was.
    from xdyna.models.loading import convert_animatediff_motion, load_mapped, module_tensors

    target = tiny_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    converted, unknown = convert_animatediff_motion(wrong_shape)
    with pytest.raises(WeightsMismatchError):
        load_mapped(module_tensors(target.unet, "unet."), converted, "test", unknown)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(WeightsMismatchError, match="no counterpart in this model: unet.*attn1.processor.q_ff"):
        torch.save({"module." + k.removeprefix("unet.").replace("processor.q_ff", "to_q_ff"): v
                    for k, v in source.state_dict().items() if "processor.q_ff" in k}, tmp_path / "xdyna.pth")
        build_model(ModelConfig(reference="reference_net", pretrained={"xdyna_unet": str(tmp_path / "xdyna.pth")}))


class NotAWeight:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_untrusted_pickles_are_read_weights_only(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {"x": NotAWeight()}}, handle)
    with pytest.raises(WeightsMismatchError, match="weights-only"):
        build_model(ModelConfig(pretrained={"motion_module": str(tmp_path / "evil.ckpt")}))
    assert "code ran" not in capsys.readouterr().out
