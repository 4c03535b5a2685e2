"""LightningDataModule over the WebDataset clip loader of ``datapipes``."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L

from datapipes.loader import build_clip_loader, config_from_dict, shard_sets

from ..errors import ConfigError
from .loader_state import RankGatheredLoader


class ClipDataModule(L.LightningDataModule):
    """Builds the rank's loader with rank/world passed explicitly (never read from the
    environment, see the WebDataset trap in the stack notes). Its position goes into checkpoints
    through Lightning's stateful-loader path, every rank's own (:class:`RankGatheredLoader`).

    The config and shard paths are checked on construction, before any model is built, so a
    wrong path fails in a second rather than after loading SD1.5.
    """

    def __init__(self, data: Mapping[str, Any]):
        super().__init__()
        try:
            self.config = config_from_dict(dict(data))
            self.config.validate()
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
        try:
            shard_sets(self.config)  # every source's shards; a missing one is named by its key
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
        self.loader = None

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.loader = build_clip_loader(self.config, rank=rank, world_size=world)
        # Lightning saves and restores a loader's state_dict itself (rank 0's checkpoint only,
        # hence the gathering wrapper); a second copy in the datamodule state would be stale.
        return RankGatheredLoader(self.loader)
