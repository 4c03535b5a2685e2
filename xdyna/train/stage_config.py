"""The ``stage`` config group's schema (``conf/stage/*.yaml``): what trains, on which conditions,
with which optimizer and EMA. Plain dataclasses without Lightning or Hydra, so the config checks
(:mod:`xdyna.train.config_rules`) and the training module read the same defaults;
:mod:`xdyna.train.schema` registers them with Hydra."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from ..errors import ConfigError, is_integer, is_number
from .ema_config import EMAConfig

# A stage's conditions when its mapping names none (also hyperparameters of checkpoints from before the key).
DEFAULT_CONDITIONS = ("pose",)
# What an elastic resume (another world size, xdyna.train.elastic) does to the learning rate, whose
# configured value is taken as the one for the world size the run started on: keep it, or scale it
# with the global batch (linear scaling rule, or its square root as for Adam in some recipes).
ELASTIC_LR = ("keep", "linear", "sqrt")


@dataclass
class OptimConfig:
    """``stage.optim``: AdamW and a linear learning-rate warmup (the one place these defaults live)."""

    lr: float = 1.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1.0e-8
    warmup_steps: int = 500  # optimizer steps from lr/warmup_steps up to lr; 0 or 1: none
    elastic_lr: str = "keep"  # on a resume onto another world size: keep, linear or sqrt (ELASTIC_LR)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, key: str = "stage.optim") -> "OptimConfig":
        """``None`` or a partial mapping: the defaults fill the rest (a stage file names only what
        differs). Unknown keys and bad values are one ConfigError naming the key."""
        if isinstance(mapping, OptimConfig):
            return mapping
        mapping = dict(mapping or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; known: {', '.join(known)}")
        config = cls(**mapping)
        for name in ("lr", "weight_decay", "eps"):
            value = getattr(config, name)
            if not is_number(value) or value < 0 or (name != "weight_decay" and value == 0):
                raise ConfigError(f"{key}.{name}={value!r}: must be a number > 0" + (" (or 0)" if name == "weight_decay" else ""))
        betas = list(config.betas)
        if len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{key}.betas={config.betas!r}: must be two numbers in [0, 1)")
        config.betas = [float(b) for b in betas]
        if not is_integer(config.warmup_steps, 0):
            raise ConfigError(f"{key}.warmup_steps={config.warmup_steps!r}: must be an integer >= 0")
        if config.elastic_lr not in ELASTIC_LR:
            raise ConfigError(f"{key}.elastic_lr={config.elastic_lr!r}: choose one of {', '.join(ELASTIC_LR)}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageConfig:
    """One training stage. ``name`` and ``trainable`` have no default: every stage file says them."""

    name: str
    trainable: list[str]  # component names (xdyna.models.components.COMPONENTS)
    conditions: list[str] = field(default_factory=lambda: list(DEFAULT_CONDITIONS))  # pose, face (xdyna.train.module.CONDITIONS)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # EMA of the trainable weights (xdyna/train/ema.py); decay null = off.
    ema: EMAConfig = field(default_factory=EMAConfig)
