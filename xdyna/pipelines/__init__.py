"""Inference: sampling loops and the X-Dyna pipeline."""

from .sampling import sample_clip

__all__ = ["sample_clip"]
