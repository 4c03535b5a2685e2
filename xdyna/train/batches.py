"""Batch dtype handling between the loader and the model.

The loader may ship uint8 tensors (4x less inter-process traffic than float32; see
docs/data.md) and leave the scaling to the training device. This maps either form onto the
float contract of docs/design.md: video/reference in [-1, 1], pose/face in [0, 1], with the
data pipeline's own scaling, so a uint8 batch scaled here equals the loader's float32 batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from datapipes.clips import to_batch_contract


def to_float_batch(batch: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """uint8 images -> ``dtype`` in the contract's ranges; float batches pass through untouched."""
    return to_batch_contract(batch, dtype)
