"""Model configuration: what the `model` config group of Hydra maps onto."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import ConfigError

REFERENCE_VARIANTS = ("dynamics_adapter",)
FACE_VARIANTS = ("sface", "none")
ATTENTION_BACKENDS = ("sdpa", "xformers")


@dataclass
class PretrainedPaths:
    """Local folders/files of real weights. ``None`` means random init (tiny flavour, tests).

    Nothing is ever downloaded: every path is given by the user, and a missing one is an error.
    """

    sd15: str | None = None  # diffusers-format SD1.5 folder: unet/, vae/, text_encoder/, tokenizer/
    motion_adapter: str | None = None  # diffusers MotionAdapter folder
    pose_controlnet: str | None = None  # diffusers ControlNet folder (e.g. SD1.5 openpose)
    face_controlnet: str | None = None  # diffusers ControlNet folder (6-channel S-Face)


@dataclass
class ModelConfig:
    flavour: str = "tiny"
    pretrained: PretrainedPaths = field(default_factory=PretrainedPaths)
    reference: str = "dynamics_adapter"
    face: str = "sface"
    attention_backend: str = "sdpa"
    max_attention_batch: int = 65535
    gradient_checkpointing: bool = False
    pose_conditioning_scale: float = 1.0
    face_conditioning_scale: float = 1.0
    vae_chunk_size: int = 16  # frames per VAE encode/decode call, bounds activation memory
    init_seed: int = 0  # seeds random init of every module not loaded from a file

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        values = dict(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        pretrained = values.pop("pretrained", None) or {}
        pretrained_known = {f.name for f in fields(PretrainedPaths)}
        unknown = sorted(set(pretrained) - pretrained_known)
        if unknown:
            raise ConfigError(f"model.pretrained: unknown key(s) {unknown}; known: {sorted(pretrained_known)}")
        config = cls(pretrained=PretrainedPaths(**pretrained), **values)
        config.validate()
        return config

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, Mapping):
            self.pretrained = PretrainedPaths(**self.pretrained)

    def validate(self) -> None:
        if self.reference not in REFERENCE_VARIANTS:
            raise ConfigError(f"model.reference={self.reference!r}; choose one of {REFERENCE_VARIANTS}")
        if self.face not in FACE_VARIANTS:
            raise ConfigError(f"model.face={self.face!r}; choose one of {FACE_VARIANTS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
