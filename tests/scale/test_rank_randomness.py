"""Every rank draws its own noise, timesteps and VAE posterior samples (xdyna.train.rank_rng),
while model initialisation stays identical on all ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xdyna.train.rank_rng import rank_seed

SCRIPT = Path(__file__).with_name("rank_draws.py")


def test_rank_seeds_are_distinct_per_rank_stream_and_seed():
    seeds = {rank_seed(seed, rank, stream) for seed in range(4) for rank in range(64) for stream in ("objective", "other")}
    assert len(seeds) == 4 * 64 * 2  # seed + rank would collide (seed 0 rank 1 == seed 1 rank 0)
    assert rank_seed(7, 3) == rank_seed(7, 3) and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError):
        rank_seed(0, -1)


@pytest.mark.slow
def test_two_ranks_draw_different_noise_and_timesteps_from_identical_weights(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Same seed_everything on both ranks: identical initial weights, trainable and frozen alike.
    for key, value in ranks[0]["initial"].items():
        assert torch.equal(value, ranks[1]["initial"][key]), key
    steps = [list(zip(ranks[0]["draws"], ranks[1]["draws"]))]
    assert len(steps[0]) == 3
    for step, (a, b) in enumerate(steps[0]):
        assert not torch.allclose(a["noise"], b["noise"]), f"step {step}: both ranks drew the same noise"
        assert not torch.allclose(a["posterior"], b["posterior"], atol=1e-6), f"step {step}: same VAE posterior draw"
    timesteps = [torch.cat([d["timesteps"] for d in rank["draws"]]) for rank in ranks]
    assert not torch.equal(*timesteps), timesteps
    # Within a rank the stream moves on: no step repeats the previous step's noise.
    assert not torch.allclose(ranks[0]["draws"][0]["noise"], ranks[0]["draws"][1]["noise"])
