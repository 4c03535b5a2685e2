"""Inference: the sampling loop, context windows, driving-signal preparation, ``XDynaPipeline``
and the ``xdyna-animate`` command.

Names are imported on first use (PEP 562): importing the sampling loop (as the training callback
does) does not pull in video decoding, face detection or the command line.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "sample_clip": "sampling",
    "denoise_latents": "sampling",
    "frame_similarity_prior": "sampling",
    "ContextOptions": "context",
    "context_windows": "context",
    "InputError": "checks",
    "Animation": "pipeline",
    "PipelineFormatError": "pipeline",
    "XDynaPipeline": "pipeline",
    "DrivingSignals": "driving",
    "PoseAlignment": "driving",
    "PoseEstimator": "driving",
    "prepare_driving": "driving",
    "prepare_reference": "driving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
