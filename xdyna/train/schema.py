"""The config schema: the dataclasses that hold every default, registered in Hydra's ConfigStore.

Each config group's files under ``conf/`` start from their group's dataclass (first entry of
their defaults list, ``- /schema/<group>@_here_``) and hold only what differs from it, so a
default lives in one place, the dataclass, and ``xdyna-train --cfg job`` still shows every value.
The composed nodes are typed by the dataclasses: a key that is no field (a typo in a file or an
override) or a value of the wrong type is refused while Hydra composes, before anything runs.

The dataclasses stay plain (xdyna/models and datapipes import no Hydra): the registration is
here, imported by :mod:`xdyna.train.cli` and so by everything that composes ``conf/`` through
its ``CONF_DIR``. Adding a group's schema: one entry in :data:`SCHEMAS` and the defaults entry in
the group's files (docs/extending.md, "A new config key").
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from datapipes.loader import ClipLoaderConfig
from ..diffusion import ScheduleConfig
from ..models.config import ModelConfig
from .stage_config import StageConfig

# Where the schemas live in the ConfigStore: ``/schema/<group>``, a group of its own, so they are
# no selectable option of the groups they describe (``model=...`` lists only the files).
SCHEMA_GROUP = "schema"
# Config group -> the dataclass that is its schema and holds its defaults. The groups without one
# (trainer, logger, launcher, the top level) pass their keys to Lightning, W&B or SLURM as written.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": ClipLoaderConfig,
    "schedule": ScheduleConfig,
    "stage": StageConfig,
}


def schema_node(schema: type) -> DictConfig:
    """The dataclass as a Hydra node: its defaults, types and keys. Frozen dataclasses (the
    schedule, the EMA settings: immutable once built and checked) would give read-only nodes that
    refuse every file and override on top; the schema is the defaults, not the values, so the
    node is made writable, the dataclass stays frozen."""
    node = OmegaConf.structured(schema)

    def unlock(container: DictConfig) -> None:
        OmegaConf.set_readonly(container, False)
        for key in container:
            child = container._get_node(key)
            if isinstance(child, DictConfig):
                unlock(child)

    unlock(node)
    return node


def register() -> None:
    """Store every schema under ``/schema/<group>`` (idempotent: a second call overwrites)."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=SCHEMA_GROUP, name=group, node=schema_node(schema))


register()
