"""Per-rank data-loader positions in checkpoints.

Lightning saves a stateful loader's ``state_dict()`` from the checkpoint of global rank 0 only
and hands that one state to every rank on resume, so rank 1 would restart from rank 0's
position (the ClipLoader refuses it). :class:`RankGatheredLoader` gathers every rank's state
into ``{"ranks": {rank: state}}``, which ``ClipLoader.load_state_dict`` picks its own entry from.
Saved with another world size or worker count, the loader resumes from all the entries
(``ClipLoader.load_elastic``, docs/data.md "Resuming"); ``resumed_from`` (passed through, as
every other attribute) then says from what: ``{"ranks": N, "workers": W}``, else ``None``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch.distributed as dist


class RankGatheredLoader:
    """Wraps a loader with ``state_dict``/``load_state_dict``; everything else passes through.

    ``state_dict`` is collective (Lightning calls it on every rank while dumping a checkpoint).
    """

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def state_dict(self) -> dict:
        state = self.loader.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, state)
            return {"ranks": dict(enumerate(gathered))}
        return {"ranks": {0: state}}

    def load_state_dict(self, state: dict) -> None:
        """Every rank gets every rank's entry: its own one on the same world size and worker
        count, all of them to resume elastically on another."""
        self.loader.load_state_dict(state)
