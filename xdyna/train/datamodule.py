"""LightningDataModule over the WebDataset clip loader of ``datapipes``."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L

from datapipes.loader import ClipLoaderConfig, build_clip_loader


class ClipDataModule(L.LightningDataModule):
    """Builds the rank's loader with rank/world passed explicitly (never read from the
    environment, see the WebDataset trap in the stack notes) and carries its position in
    checkpoints through ``state_dict``/``load_state_dict``."""

    def __init__(self, data: Mapping[str, Any]):
        super().__init__()
        self.config = ClipLoaderConfig(**dict(data))
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
