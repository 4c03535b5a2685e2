"""IP-Adapter-plus image prompt: CLIP ViT-H/14 penultimate features -> Resampler -> 16 tokens.

The tokens enter every cross-attention of the UNet through separate ``to_k_ip``/``to_v_ip``
projections (:class:`xdyna.models.attention.ImagePromptProcessor`). Classifier-free guidance in
X-Dyna differs only in these tokens: the unconditional branch encodes an all-zero (normalised)
image, so training drops the image prompt to that same blank image with a small probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn
from transformers import CLIPVisionModelWithProjection

# CLIPImageProcessor's defaults, which the IP-Adapter and X-Dyna releases use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePrompt(nn.Module):
    """Frozen image encoder + trainable Resampler (``resampler``; key layout of diffusers'
    :class:`IPAdapterPlusImageProjection`, original IP-Adapter files are mapped on load)."""

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, resampler: IPAdapterPlusImageProjection):
        super().__init__()
        self.image_encoder = image_encoder
        self.resampler = resampler
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> CLIP input. The whole (uncropped) reference is resized to
        the encoder's square size, as the X-Dyna release feeds it."""
        size = self.image_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        pixels = ((pixels + 1) / 2).clamp(0, 1)
        return (pixels - self.mean) / self.std

    def tokens(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP input -> ``(B, 16, D)`` tokens. The encoder is frozen (no graph); the Resampler
        keeps its graph so that the ``w/IP-A`` ablation can train it."""
        encoder_dtype = self.image_encoder.dtype
        with torch.no_grad():
            hidden = self.image_encoder(clip_pixels.to(encoder_dtype), output_hidden_states=True).hidden_states[-2]
        return self.resampler(hidden.to(self.resampler.proj_in.weight.dtype))

    def forward(self, images: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of ``images``; rows where ``drop`` (bool ``(B,)``) is set get the blank image's."""
        pixels = self.preprocess(images)
        if drop is not None:
            pixels = torch.where(drop.view(-1, 1, 1, 1).to(pixels.device), torch.zeros_like(pixels), pixels)
        return self.tokens(pixels)

    def blank(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Tokens of the all-zero CLIP input (the unconditional branch), ``(batch, 16, D)``."""
        size = self.image_size
        zeros = torch.zeros(1, 3, size, size, device=like.device)
        return self.tokens(zeros).expand(batch, -1, -1)


def build_image_prompt(encoder_config: dict, resampler_config: dict, image_encoder_folder=None) -> ImagePrompt:
    from transformers import CLIPVisionConfig

    if image_encoder_folder is not None:
        encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder_folder, local_files_only=True)
    else:
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config))
    if encoder.config.hidden_size != resampler_config["embed_dims"]:
        from ..errors import ConfigError

        raise ConfigError(
            f"model.pretrained.image_encoder: hidden size {encoder.config.hidden_size} does not match the Resampler's "
            f"input width {resampler_config['embed_dims']} (IP-Adapter-plus SD1.5 expects CLIP ViT-H/14)"
        )
    return ImagePrompt(encoder, IPAdapterPlusImageProjection(**resampler_config))
