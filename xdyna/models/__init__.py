"""The X-Dyna network in pure torch + diffusers (no Lightning, Hydra or W&B here)."""

from .attention import ReferenceFeatures
from .build import build_model
from .config import FACE_VARIANTS, ModelConfig, PretrainedPaths
from .loading import (
    LoadReport,
    PretrainedNotFoundError,
    WeightsMismatchError,
    load_component_safetensors,
    read_state_dict,
    save_component_safetensors,
)
from .reference_variants import REFERENCE_VARIANTS, ReferenceVariant, reference_variant
from .xdyna_model import COMPONENTS, FROZEN_PARTS, XDynaModel

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
    "ReferenceVariant",
    "WeightsMismatchError",
    "XDynaModel",
    "build_model",
    "load_component_safetensors",
    "read_state_dict",
    "reference_variant",
    "save_component_safetensors",
]
