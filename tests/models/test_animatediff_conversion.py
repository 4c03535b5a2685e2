"""The AnimateDiff motion-module conversion (original ``mm_sd_v15.ckpt`` layout -> diffusers/our
names) against diffusers' own converter, on a tiny original-layout checkpoint with random weights.

The checkpoint is written from the original AnimateDiff module structure (``MotionModule`` ->
``temporal_transformer`` -> ``TemporalTransformerBlock`` with two ``VersatileAttention`` blocks,
``norms``, GEGLU ``ff`` and ``ff_norm``), not by inverting our mapping, so a wrong mapping on
either side shows as a key or tensor that does not match."""

from __future__ import annotations

import math

import torch
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

from xdyna.models import ModelConfig, build_model
from xdyna.models.flavours import TINY
from xdyna.models.loading import convert_animatediff_motion

ADAPTER = TINY.motion_adapter
MAX_LEN = ADAPTER["motion_max_seq_length"]


def original_pe(channels: int, max_len: int = MAX_LEN) -> torch.Tensor:
    """AnimateDiff's ``PositionalEncoding.pe`` buffer, as its code computes it: ``(1, max_len, C)``."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, channels, 2) * (-math.log(10000.0) / channels))
    pe = torch.zeros(1, max_len, channels)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def original_motion_module(channels: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One AnimateDiff v1 ``MotionModule`` (one transformer block, inner dim = channels, GEGLU
    feed-forward of 4x width), keys relative to ``motion_modules.<j>.``."""

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    block = "temporal_transformer.transformer_blocks.0."
    state = {
        "temporal_transformer.norm.weight": rand(channels), "temporal_transformer.norm.bias": rand(channels),
        "temporal_transformer.proj_in.weight": rand(channels, channels), "temporal_transformer.proj_in.bias": rand(channels),
        "temporal_transformer.proj_out.weight": rand(channels, channels), "temporal_transformer.proj_out.bias": rand(channels),
        block + "ff.net.0.proj.weight": rand(8 * channels, channels), block + "ff.net.0.proj.bias": rand(8 * channels),
        block + "ff.net.2.weight": rand(channels, 4 * channels), block + "ff.net.2.bias": rand(channels),
        block + "ff_norm.weight": rand(channels), block + "ff_norm.bias": rand(channels),
    }
    for a in (0, 1):
        attention = f"{block}attention_blocks.{a}."
        state.update({attention + f"{name}.weight": rand(channels, channels) for name in ("to_q", "to_k", "to_v", "to_out.0")})
        state[attention + "to_out.0.bias"] = rand(channels)
        state[attention + "pos_encoder.pe"] = original_pe(channels)
        state[f"{block}norms.{a}.weight"], state[f"{block}norms.{a}.bias"] = rand(channels), rand(channels)
    return state


def original_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A v1 checkpoint (no mid-block motion module) for the tiny UNet's channel widths: each
    down block holds ``motion_layers_per_block`` modules, each up block one more."""
    g = torch.Generator().manual_seed(seed)
    channels = ADAPTER["block_out_channels"]
    per_block = ADAPTER["motion_layers_per_block"]
    layout = [(f"down_blocks.{i}", c, per_block) for i, c in enumerate(channels)]
    layout += [(f"up_blocks.{i}", c, per_block + 1) for i, c in enumerate(reversed(channels))]
    state = {}
    for block, width, count in layout:
        for j in range(count):
            state.update({f"{block}.motion_modules.{j}.{k}": v for k, v in original_motion_module(width, g).items()})
    return state


def test_conversion_equals_diffusers_converter_tensor_for_tensor():
    original = original_checkpoint()
    theirs = convert_animatediff_checkpoint_to_diffusers(original)
    ours, foreign = convert_animatediff_motion(original, prefix="")
    assert not foreign
    # diffusers drops the positional tables (its modules compute them); ours keeps one per block.
    assert set(theirs) == {k for k in ours if not k.endswith(".pos_embed.pe")}
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    # Both name exactly the parameters of a diffusers MotionAdapter of this size, nothing else.
    adapter_keys = set(MotionAdapter(**ADAPTER).state_dict())
    assert set(ours) == adapter_keys


def test_model_loaded_from_the_original_file_equals_diffusers_single_file_adapter(tmp_path):
    """The user-facing paths end to end: our model built from ``mm_tiny.ckpt`` and diffusers'
    ``MotionAdapter.from_single_file`` of the same file hold the same motion-module tensors,
    the positional tables included (ours read from the file, diffusers' computed)."""
    original = original_checkpoint(seed=1)
    torch.save(original, tmp_path / "mm_tiny.ckpt")
    MotionAdapter(**ADAPTER).save_pretrained(tmp_path / "config")  # a local config: nothing is downloaded
    adapter = MotionAdapter.from_single_file(str(tmp_path / "mm_tiny.ckpt"), config=str(tmp_path / "config"),
                                             local_files_only=True)
    expected = adapter.state_dict()

    model = build_model(ModelConfig(pretrained={"motion_module": str(tmp_path / "mm_tiny.ckpt")}))
    got = {k.removeprefix("unet."): v for k, v in model.state_dict().items() if ".motion_modules." in k}
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    # Not vacuous: the file's random weights, not an init, reached both models.
    key = "up_blocks.3.motion_modules.2.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(got[key], original[key.replace("motion_modules.2.", "motion_modules.2.temporal_transformer.")
                                          .replace("attn1", "attention_blocks.0")])
