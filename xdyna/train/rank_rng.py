"""Per-rank random streams for the training objective.

``L.seed_everything(seed)`` gives every rank the same global generator (Lightning adds no rank
offset), which is what model initialisation needs: identical weights everywhere. Draws made during
training from that generator would be identical too: with one clip per GPU, a 64-GPU step would
train on a single timestep and a single noise pattern. So every random draw of the objective (VAE
posterior sample, noise, timesteps, image-prompt dropout) comes from a generator of its own, seeded
from (seed, global rank), the way open_clip seeds ``seed + rank`` once the model is built.

The derivation is numpy's ``SeedSequence(seed, spawn_key=(stream, rank))``: streams of different
ranks, of different purposes and of different run seeds are independent (``seed + rank`` would make
rank 1 of seed 0 replay rank 0 of seed 1). A run resumed on the same world size restores every
rank's generator state from the checkpoint; on another world size each rank starts its stream
afresh from this derivation (its position in the old run's stream has no meaning there).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

OBJECTIVE_STREAM = "objective"


def rank_seed(seed: int, rank: int, stream: str = OBJECTIVE_STREAM) -> int:
    """A 63-bit seed for ``stream`` on global ``rank`` of a run seeded ``seed``."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    sequence = np.random.SeedSequence(entropy=int(seed) & (2**64 - 1), spawn_key=(zlib.crc32(stream.encode()), int(rank)))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def rank_generator(seed: int, rank: int, device: torch.device | str = "cpu", stream: str = OBJECTIVE_STREAM) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`rank_seed`."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank, stream))
