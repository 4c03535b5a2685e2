"""The local SLURM fixture is a real two-node cluster: srun places one task on each node."""

from __future__ import annotations

import pytest


@pytest.mark.slurm
def test_two_node_srun_runs_one_task_per_node(slurm_cluster):
    done = slurm_cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"])
    assert sorted(done.stdout.split()) == ["n1", "n2"]
