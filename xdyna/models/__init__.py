"""The X-Dyna network in pure torch + diffusers (no Lightning, Hydra or W&B here)."""

from .attention import ReferenceFeatures
from .config import ModelConfig, PretrainedPaths
from .loading import PretrainedNotFoundError
from .xdyna_model import COMPONENTS, XDynaModel, build_model

__all__ = [
    "COMPONENTS",
    "ModelConfig",
    "PretrainedNotFoundError",
    "PretrainedPaths",
    "ReferenceFeatures",
    "XDynaModel",
    "build_model",
]
