"""How the scontrol requeue call is read: an accepted requeue may kill scontrol itself (it runs
inside the job step the requeue cancels), a refused one exits 1 with SLURM's message."""

from __future__ import annotations

import os

import pytest

from xdyna.train.preemption import requeue_slurm_job


@pytest.mark.parametrize("body, requeued", [
    ("exit 0", True),
    # The step's SIGTERM reached scontrol before it exited: the requeue was accepted.
    ("kill -TERM $$", True),
    ('echo "Requested operation not supported on this job" >&2; exit 1', False),
])
def test_scontrol_outcome(tmp_path, monkeypatch, body, requeued):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\n{body}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert requeue_slurm_job("42") is requeued
