"""Per-rank random streams for the training objective.

``L.seed_everything(seed)`` gives every rank the same global generator (Lightning adds no rank
offset), which is what model initialisation needs: identical weights everywhere. Draws made during
training from that generator would be identical too: with one clip per GPU, a 64-GPU step would
train on a single timestep and a single noise pattern. So every random draw of the objective (VAE
posterior sample, noise, timesteps, image-prompt dropout) comes from a generator of its own, seeded
from (seed, global rank), the way open_clip seeds ``seed + rank`` once the model is built.

The derivation is numpy's ``SeedSequence(seed, spawn_key=(stream, rank))``: streams of different
ranks, of different purposes and of different run seeds are independent (``seed + rank`` would make
rank 1 of seed 0 replay rank 0 of seed 1).

A run resumed on the same world size restores every rank's generator state from the checkpoint.
On another world size (an *elastic* resume) the old ranks' positions have no meaning for the new
ranks, and restarting each new rank's stream from ``(seed, rank)`` would replay the draws old rank
``rank`` made from step 0 on. So every elastic resume starts a new *generation* ``g`` (1 for the
first, counted across resumes in the checkpoint): rank ``r`` draws from
``SeedSequence(seed, spawn_key=(stream, r, g))``, a stream no rank of an earlier generation had.
Generation 0 keeps the two-entry key, so runs that never changed world size draw as before. The
global generators (python, numpy, torch), identical on every rank since ``seed_everything``, are
re-seeded alike from ``(seed, "global", g)``, identical on every rank again.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch

OBJECTIVE_STREAM = "objective"
GLOBAL_STREAM = "global"


def _derived_seed(seed: int, spawn_key: tuple[int, ...]) -> int:
    sequence = np.random.SeedSequence(entropy=int(seed) & (2**64 - 1), spawn_key=spawn_key)
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _generation_key(generation: int) -> tuple[int, ...]:
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    return (int(generation),) if generation else ()


def rank_seed(seed: int, rank: int, stream: str = OBJECTIVE_STREAM, generation: int = 0) -> int:
    """A 63-bit seed for ``stream`` on global ``rank`` of a run seeded ``seed``, in elastic-resume
    ``generation`` (0: the run's world size never changed)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return _derived_seed(seed, (zlib.crc32(stream.encode()), int(rank), *_generation_key(generation)))


def rank_generator(seed: int, rank: int, device: torch.device | str = "cpu", stream: str = OBJECTIVE_STREAM,
                   generation: int = 0) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`rank_seed`."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank, stream, generation))


def reseed_global_generators(seed: int, generation: int) -> int:
    """Seed python's, numpy's and torch's global generators for elastic-resume ``generation`` >= 1,
    the same on every rank; returns the seed."""
    if generation < 1:
        raise ValueError(f"generation 0 is seed_everything's own seeding; got {generation}")
    derived = _derived_seed(seed, (zlib.crc32(GLOBAL_STREAM.encode()), *_generation_key(generation)))
    random.seed(derived)
    np.random.seed(derived % 2**32)  # numpy's legacy seed takes 32 bits
    torch.manual_seed(derived)  # CUDA's generators too
    return derived
