"""Batch dtype handling between the loader and the model.

The loader may ship uint8 tensors (4x less inter-process traffic than float32; see
docs/data.md) and leave the scaling to the training device. This maps either form onto the
float contract of docs/design.md: video/reference in [-1, 1], pose/face in [0, 1].
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

SIGNED = ("video", "reference")  # images the VAE encodes
UNSIGNED = ("pose", "face")  # ControlNet conditions


def to_float_batch(batch: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    out = dict(batch)
    for key in SIGNED + UNSIGNED:
        value = out.get(key)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            # Contiguous: the loader's uint8 images are channels-last views (datapipes.clips.collate).
            scaled = value.to(dtype, memory_format=torch.contiguous_format) / 255.0
            out[key] = scaled * 2 - 1 if key in SIGNED else scaled
    return out
