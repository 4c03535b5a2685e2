"""The X-Dyna network in pure torch + diffusers (no Lightning, Hydra or W&B here)."""

from .attention import ReferenceFeatures
from .config import FACE_VARIANTS, REFERENCE_VARIANTS, ModelConfig, PretrainedPaths
from .loading import (
    LoadReport,
    PretrainedNotFoundError,
    WeightsMismatchError,
    load_component_safetensors,
    read_state_dict,
    save_component_safetensors,
)
from .xdyna_model import COMPONENTS, FROZEN_PARTS, XDynaModel, build_model

__all__ = [
    "COMPONENTS",
    "FACE_VARIANTS",
    "FROZEN_PARTS",
    "LoadReport",
    "ModelConfig",
    "PretrainedNotFoundError",
    "PretrainedPaths",
    "REFERENCE_VARIANTS",
    "ReferenceFeatures",
    "WeightsMismatchError",
    "XDynaModel",
    "build_model",
    "load_component_safetensors",
    "read_state_dict",
    "save_component_safetensors",
]
