"""IP-Adapter-plus image prompt: CLIP ViT-H/14 penultimate features -> Resampler -> 16 tokens.

The tokens enter every cross-attention of the UNet through separate ``to_k_ip``/``to_v_ip``
projections (:class:`xdyna.models.attention.ImagePromptProcessor`). Classifier-free guidance in
X-Dyna differs only in these tokens: the unconditional branch encodes an all-zero (normalised)
image, so training drops the image prompt to that same blank image with a small probability.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn
from transformers import CLIPVisionModelWithProjection

# CLIPImageProcessor's defaults, which the IP-Adapter and X-Dyna releases use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# PIL's fixed-point resampling of 8-bit images (Pillow's Resample.c): coefficients are rounded to
# multiples of 2**-22, and every pass rounds and clips its output to uint8.
_PIL_PRECISION_BITS = 22


def _pil_bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5), written in Pillow's operation order."""
    a = -0.5
    x = x.abs()
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))


@functools.lru_cache(maxsize=16)
def pil_bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``(out_size, in_size)`` float64 matrix of Pillow's integer bicubic coefficients (scaled by
    ``2**22``) for resizing one axis from ``in_size`` to ``out_size`` pixels (antialiased when
    shrinking: the kernel widens with the scale, as Pillow's ``Image.resize`` does)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = (centre - support + 0.5).floor().clamp(min=0)  # Pillow truncates; the clamp makes it the same
    last = (centre + support + 0.5).floor().clamp(max=in_size)
    taps = int(torch.ceil(torch.tensor(support))) * 2 + 1
    index = first[:, None] + torch.arange(taps, dtype=torch.float64)
    valid = index < last[:, None]
    weights = torch.where(valid, _pil_bicubic((index - centre[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = torch.zeros(out_size, dtype=torch.float64)
    for tap in range(taps):  # Pillow sums the taps in order; so does this (bit-equal coefficients)
        total = total + weights[:, tap]
    weights = weights / torch.where(total != 0, total, 1.0)[:, None]
    fixed = weights * (1 << _PIL_PRECISION_BITS)
    fixed = torch.where(fixed < 0, torch.ceil(fixed - 0.5), torch.floor(fixed + 0.5))
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)[:, None].expand_as(index)
    matrix.index_put_((rows[valid], index[valid].long()), fixed[valid])
    return matrix


def _pil_resample_axis(pixels: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """One Pillow resampling pass over ``dim`` of uint8-valued float64 ``pixels``."""
    if pixels.shape[dim] == size:  # Pillow skips a pass that keeps the size
        return pixels
    matrix = pil_bicubic_matrix(pixels.shape[dim], size).to(pixels.device)
    mixed = torch.movedim(torch.movedim(pixels, dim, -1) @ matrix.T, -1, dim)
    # Exact in float64: |sum| < 2**53. Pillow adds half a unit, shifts and clips to 0..255.
    return torch.floor((mixed + (1 << (_PIL_PRECISION_BITS - 1))) / (1 << _PIL_PRECISION_BITS)).clamp(0, 255)


def clip_processor_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 3, size, size)`` in [0, 1], as ``CLIPImageProcessor()``
    with its defaults prepares the uint8 image the X-Dyna release gives it: the shortest side
    resized to ``size`` (Pillow bicubic, horizontal pass first, each pass rounded to uint8; the long
    side to ``int(size * long / short)``), then the centre ``size x size`` crop. Not differentiable
    (the reference is data). Equal to transformers' PIL-backend processor, pixel for pixel."""
    pixels = ((images.double() + 1) * 127.5).round().clamp(0, 255)  # the uint8 image
    height, width = pixels.shape[-2:]
    if width <= height:
        new_height, new_width = int(size * height / width), size
    else:
        new_height, new_width = size, int(size * width / height)
    pixels = _pil_resample_axis(pixels, new_width, -1)
    pixels = _pil_resample_axis(pixels, new_height, -2)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return pixels[..., top : top + size, left : left + size].float() / 255


def squashed_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> the whole image resized to ``size x size``, in [0, 1]."""
    pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return ((pixels + 1) / 2).clamp(0, 1)


RESIZERS = {"center_crop": clip_processor_pixels, "squash": squashed_pixels}


class ImagePrompt(nn.Module):
    """Frozen image encoder + trainable Resampler (``resampler``; key layout of diffusers'
    :class:`IPAdapterPlusImageProjection`, original IP-Adapter files are mapped on load)."""

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, resampler: IPAdapterPlusImageProjection, resize: str = "center_crop"):
        super().__init__()
        if resize not in RESIZERS:
            raise ValueError(f"image prompt resize {resize!r}; choose one of {sorted(RESIZERS)}")
        self.image_encoder = image_encoder
        self.resampler = resampler
        self.resize = resize
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> CLIP input at the encoder's square size, by ``resize``
        (``center_crop``: the X-Dyna release's pixels; ``squash``: the whole image)."""
        pixels = RESIZERS[self.resize](images, self.image_size).to(self.mean.device)
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


def build_image_prompt(encoder_config: dict, resampler_config: dict, image_encoder_folder=None, resize: str = "center_crop") -> ImagePrompt:
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
    return ImagePrompt(encoder, IPAdapterPlusImageProjection(**resampler_config), resize)
