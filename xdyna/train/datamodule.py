"""LightningDataModule over the WebDataset clip loader of ``datapipes``."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L

from datapipes.loader import build_clip_loader, config_from_dict
from datapipes.shards import expand_shard_urls

from ..errors import ConfigError


class ClipDataModule(L.LightningDataModule):
    """Builds the rank's loader with rank/world passed explicitly (never read from the
    environment, see the WebDataset trap in the stack notes) and carries its position in
    checkpoints through ``state_dict``/``load_state_dict``.

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
        for key in ("shards", "scene_shards"):
            spec = getattr(self.config, key)
            if spec is not None or key == "shards":
                try:
                    expand_shard_urls(spec)
                except FileNotFoundError as error:
                    raise FileNotFoundError(f"data.{key}: {error}") from None
        self.loader = None
        self._pending_state: dict[str, Any] | None = None

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.loader = build_clip_loader(self.config, rank=rank, world_size=world)
        if self._pending_state is not None:
            self.loader.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.loader

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()} if self.loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loader" in state:
            # Lightning restores the datamodule before it asks for the loader: apply on creation.
            self._pending_state = state["loader"]
            if self.loader is not None:
                self.loader.load_state_dict(self._pending_state)
                self._pending_state = None
