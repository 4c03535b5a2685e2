"""The X-Dyna network in pure torch + diffusers (no Lightning, Hydra or W&B here).

The names below are imported on first use (PEP 562): importing a light submodule such as
``xdyna.models.config`` runs this file first, and the config checks of ``xdyna-train`` and
``xdyna-launch`` must not pay for diffusers and torch (seconds) to answer a bad config.
``from xdyna.models import X`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ReferenceFeatures": "attention",
    "build_model": "build",
    "COMPONENTS": "config",
    "FACE_VARIANTS": "config",
    "ModelConfig": "config",
    "PretrainedPaths": "config",
    "LoadReport": "loading",
    "PretrainedNotFoundError": "loading",
    "WeightsMismatchError": "loading",
    "load_component_safetensors": "loading",
    "read_state_dict": "loading",
    "save_component_safetensors": "loading",
    "REFERENCE_VARIANTS": "reference_variants",
    "ReferenceVariant": "reference_variants",
    "reference_variant": "reference_variants",
    "FROZEN_PARTS": "xdyna_model",
    "XDynaModel": "xdyna_model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .attention import ReferenceFeatures
    from .build import build_model
    from .config import COMPONENTS, FACE_VARIANTS, ModelConfig, PretrainedPaths
    from .loading import (
        LoadReport,
        PretrainedNotFoundError,
        WeightsMismatchError,
        load_component_safetensors,
        read_state_dict,
        save_component_safetensors,
    )
    from .reference_variants import REFERENCE_VARIANTS, ReferenceVariant, reference_variant
    from .xdyna_model import FROZEN_PARTS, XDynaModel


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
