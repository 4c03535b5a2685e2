"""A Hydra ``-m`` sweep through hydra-submitit-launcher on the real local SLURM cluster: both jobs
run, each in its own run directory (``<sweep run id>_<job num>``), none overwriting the other."""

from __future__ import annotations

import subprocess

import pytest
import torch

from xdyna.train import checkpointing
from xdyna.train.cli import sweep_job_run_id
from xdyna.train.export import read_checkpoint

from .tiny_run import BIN, clean_env, tiny_overrides

MAX_STEPS = 2


def test_sweep_job_run_id_is_stable_and_distinct():
    assert sweep_job_run_id("abc", 0) == sweep_job_run_id("abc", 0) == "abc_0"
    assert sweep_job_run_id("abc", 1) != sweep_job_run_id("abc", 0)


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_sweep_gives_every_job_its_own_run(slurm_cluster, shards, tmp_path):
    root = tmp_path / "runs"
    done = subprocess.run(
        [str(BIN / "xdyna-train"), "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=15",
         "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1",
         *tiny_overrides(shards, root, "sweep", MAX_STEPS), "trainer/strategy=auto", "seed=0,1"],
        cwd=tmp_path, env=clean_env(slurm_cluster.env), capture_output=True, text=True, timeout=420,
    )
    job_logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((root / "sweeps" / "sweep").glob(".submitit/*/*.err")))
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{job_logs}"
    weights = []
    for job_num in (0, 1):
        run_dir = root / sweep_job_run_id("sweep", job_num)
        newest = checkpointing.newest_complete_checkpoint(run_dir / "checkpoints")
        assert newest is not None and newest.name == checkpointing.checkpoint_name(MAX_STEPS), (run_dir, job_logs)
        state, meta = read_checkpoint(newest)
        assert meta["global_step"] == MAX_STEPS
        weights.append(state)
    # Different seeds trained different weights: neither job wrote into the other's run.
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
