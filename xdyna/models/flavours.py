"""Architecture configs of the model flavours.

``sd15`` is Stable Diffusion 1.5 with AnimateDiff-v1 motion modules, the size X-Dyna trains at.
``tiny`` keeps every structural feature of ``sd15`` (4 resolutions, 3 cross-attention down blocks +
1 plain, 2 layers per block, so 16 spatial self-attentions and 20 motion modules, 8 motion heads,
max 24 positions, an 8x VAE, a ViT image encoder + 16-token Resampler) at channel widths that run a training step in well under a second on
CPU. Tests and the demo use ``tiny`` through exactly the code ``sd15`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_CROSS_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_CROSS_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Flavour:
    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    motion_adapter: dict[str, Any]
    controlnet_embedding_channels: tuple[int, ...]
    image_encoder: dict[str, Any]  # transformers CLIPVisionConfig kwargs (ViT-H/14 at sd15 size)
    image_prompt: dict[str, Any]  # IP-Adapter-plus Resampler sizes (diffusers IPAdapterPlusImageProjection kwargs)
    # The empty prompt as CLIP token ids: BOS, EOS, then EOS as padding (SD1.5's tokenizer pads with
    # its EOS token). Used when no tokenizer folder is given, i.e. for random-weight flavours.
    prompt_length: int = 77
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    default_height: int = 896
    default_width: int = 512
    extra: dict[str, Any] = field(default_factory=dict)


SD15 = Flavour(
    name="sd15",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=_CROSS_DOWN,
        up_block_types=_CROSS_UP,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    ),
    motion_adapter=dict(
        block_out_channels=(320, 640, 1280, 1280),
        motion_layers_per_block=2,
        motion_num_attention_heads=8,
        motion_norm_num_groups=32,
        motion_max_seq_length=24,
        use_motion_mid_block=False,
    ),
    controlnet_embedding_channels=(16, 32, 96, 256),
    image_encoder=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=1024,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    # ip-adapter-plus_sd15: Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
    # embedding_dim=1280, output_dim=768, ff_mult=4) in the original code's names.
    image_prompt=dict(embed_dims=1280, hidden_dims=768, output_dims=768, depth=4, dim_head=64, heads=12, num_queries=16, ffn_ratio=4),
)

TINY = Flavour(
    name="tiny",
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=_CROSS_DOWN,
        up_block_types=_CROSS_UP,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    ),
    motion_adapter=dict(
        block_out_channels=(32, 32, 64, 64),
        motion_layers_per_block=2,
        motion_num_attention_heads=8,
        motion_norm_num_groups=8,
        motion_max_seq_length=24,
        use_motion_mid_block=False,
    ),
    controlnet_embedding_channels=(8, 8, 16, 16),
    image_encoder=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    image_prompt=dict(embed_dims=32, hidden_dims=32, output_dims=32, depth=2, dim_head=8, heads=4, num_queries=16, ffn_ratio=4),
    default_height=128,
    default_width=64,
)

FLAVOURS = {flavour.name: flavour for flavour in (SD15, TINY)}


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown model flavour {name!r}; known: {', '.join(sorted(FLAVOURS))}") from None
