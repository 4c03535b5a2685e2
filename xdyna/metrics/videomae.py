"""VideoMAE-v2 features for cd-FVD (Ge et al. 2024, "On the Content Bias in FVD").

The network is transformers' ``VideoMAEModel`` configured as VideoMAE-v2 ViT-g/14 (hidden 1408,
40 layers, 16 heads, MLP 6144, tubelet 2, fixed sinusoidal positions, LayerNorm eps 1e-6) plus
the fine-tuned model's ``fc_norm``; the feature is ``fc_norm(mean of all tokens)``, 1408-d, as
content-debiased-fvd's ``forward_features``. Its preprocessing is kept: frames in [0, 1] resized
to 224x224 bilinearly, no mean/std normalisation, 16 frames.

The public checkpoint (``vit_g_hybrid_pt_1200e_ssv2_ft.pth``) uses the original VideoMAE-v2
key names; :func:`convert_videomae_v2_state_dict` maps them onto transformers' layout
(``blocks.N.attn.qkv.weight`` is split into query/key/value; ``q_bias``/``v_bias`` become the
query/value biases; the SSv2 ``head`` is dropped).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import VideoMAEConfig, VideoMAEModel

VIDEOMAE_V2_GIANT = dict(image_size=224, patch_size=14, num_frames=16, tubelet_size=2, hidden_size=1408,
                         num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144, layer_norm_eps=1e-6)
VIDEOMAE_TINY = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6)


class VideoMAEv2Features(nn.Module):
    """``forward(clips)``: ``(B, T, 3, H, W)`` in [0, 1] with T = ``num_frames`` -> ``(B, hidden)``."""

    def __init__(self, **config_overrides):
        super().__init__()
        config = VideoMAEConfig(**{**VIDEOMAE_V2_GIANT, **config_overrides}, qv_bias=True, use_mean_pooling=True,
                                hidden_act="gelu")
        self.config = config
        self.backbone = VideoMAEModel(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feature_dim = config.hidden_size
        self.eval().requires_grad_(False)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        batch, frames = clips.shape[:2]
        if frames != self.config.num_frames:
            raise ValueError(f"VideoMAE-v2 takes {self.config.num_frames}-frame clips, got {frames}")
        x = F.interpolate(clips.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)
        tokens = self.backbone(pixel_values=x.unflatten(0, (batch, frames))).last_hidden_state
        return self.fc_norm(tokens.mean(dim=1))


def convert_videomae_v2_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original VideoMAE-v2 (timm-style) keys -> :class:`VideoMAEv2Features` keys."""
    renames = {
        "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
    }
    converted: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if key.startswith("head.") or key == "pos_embed":  # classifier / fixed table rebuilt by transformers
            continue
        if key.startswith("patch_embed.proj."):
            converted["backbone.embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("fc_norm."):
            converted[key] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            prefix = f"backbone.encoder.layer.{index}."
            if rest == "attn.qkv.weight":
                query, key_weight, value_weight = value.chunk(3, dim=0)
                converted[prefix + "attention.attention.query.weight"] = query
                converted[prefix + "attention.attention.key.weight"] = key_weight
                converted[prefix + "attention.attention.value.weight"] = value_weight
            elif rest == "attn.q_bias":
                converted[prefix + "attention.attention.query.bias"] = value
            elif rest == "attn.v_bias":
                converted[prefix + "attention.attention.value.bias"] = value
            else:
                module, parameter = rest.rsplit(".", 1)
                if module not in renames:
                    raise KeyError(f"unknown VideoMAE-v2 block key {key!r}")
                converted[prefix + renames[module] + "." + parameter] = value
        else:
            raise KeyError(f"unknown VideoMAE-v2 key {key!r}")
    return converted


def to_videomae_v2_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_videomae_v2_state_dict` (tests write tiny checkpoints in the
    public layout with it, so the converter is exercised on the real key names)."""
    original: dict[str, torch.Tensor] = {}
    inverse = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("backbone.embeddings.patch_embeddings.projection."):
            original["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("fc_norm."):
            original[key] = value
        elif key.startswith("backbone.encoder.layer."):
            index, rest = key[len("backbone.encoder.layer."):].split(".", 1)
            if rest.startswith("attention.attention."):
                part, parameter = rest[len("attention.attention."):].split(".")
                if parameter == "weight":
                    qkv.setdefault(index, {})[part] = value
                else:
                    original[f"blocks.{index}.attn.{part[0]}_bias"] = value
            else:
                module, parameter = rest.rsplit(".", 1)
                original[f"blocks.{index}.{inverse[module]}.{parameter}"] = value
    for index, parts in qkv.items():
        original[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return original
