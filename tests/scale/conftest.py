"""Fixtures for tests/scale: a real local SLURM cluster (see slurm_cluster.py) and synthetic shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .slurm_cluster import LocalSlurmCluster, SlurmUnavailable, ensure_slurm_installed


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    cluster = LocalSlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.work, ignore_errors=True)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Tiny synthetic clip shards (3 human, 1 scene clip) shared by every scale test."""
    out = tmp_path_factory.mktemp("synthetic") / "shards"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "xdyna-data"), "synth", "--out", str(out), "--human", "3", "--scene", "1",
         "--frames", "12", "--height", "128", "--width", "64"],
        # A guard against a hang only, generous for a loaded machine.
        cwd=out.parent, capture_output=True, text=True, timeout=1800, env=dict(os.environ, WANDB_MODE="disabled"),
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, shards):
    """The shared tiny 2-rank runs (tests/scale/resume_runs.py), trained on first use."""
    from .resume_runs import Runs

    return Runs(tmp_path_factory.mktemp("resume"), shards)
