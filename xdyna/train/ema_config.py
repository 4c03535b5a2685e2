"""The ``stage.ema`` settings and the EMA's size, without Lightning: read by the config checks
that run before anything heavy is imported (:mod:`xdyna.train.config_rules`) and by
:mod:`xdyna.train.ema`, which keeps the EMA."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import ConfigError, is_integer, is_number

FP32_BYTES = 4
SAMPLE_WEIGHTS = ("ema", "raw")


@dataclass(frozen=True)
class EMAConfig:
    """``decay=None`` switches the EMA off (the default)."""

    decay: float | None = None
    start_step: int = 0
    every_n_steps: int = 1

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, key: str = "stage.ema") -> "EMAConfig":
        """``key``: where the mapping sits in the config, for the error messages."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - {"decay", "start_step", "every_n_steps"})
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; known: decay, start_step, every_n_steps")
        config = cls(**mapping)
        decay, start, every = config.decay, config.start_step, config.every_n_steps
        if decay is not None and (not is_number(decay) or not 0.0 <= decay < 1.0):
            raise ConfigError(f"{key}.decay={decay!r}: must be a number in [0, 1) (null switches the EMA off)")
        if not is_integer(start, 0):
            raise ConfigError(f"{key}.start_step={start!r}: must be an integer >= 0")
        if not is_integer(every, 1):
            raise ConfigError(f"{key}.every_n_steps={every!r}: must be an integer >= 1")
        return config

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def due(self, step: int) -> bool:
        """Whether the EMA is updated after optimizer step ``step`` (1-based)."""
        return step >= self.start_step and (step - self.start_step) % self.every_n_steps == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ema_bytes_per_rank(trainable_numel: int, world_size: int = 1, zero_stage: int | None = None) -> int:
    """Bytes of EMA state one rank holds: fp32 of every trainable element, or under ZeRO-3 of its
    share of them (DeepSpeed pads each parameter to a whole share per rank: at most one element
    per parameter more)."""
    if zero_stage == 3 and world_size > 1:
        return FP32_BYTES * math.ceil(trainable_numel / world_size)
    return FP32_BYTES * trainable_numel


def check_sample_weights(which: str) -> str:
    """``samples.weights``: which weights sample videos use."""
    if which not in SAMPLE_WEIGHTS:
        raise ConfigError(f"samples.weights={which!r}: expected one of {list(SAMPLE_WEIGHTS)}")
    return which
