"""``xdyna-data pack --parts 3 --slurm`` on the real local two-node cluster: one array task is
killed after its first shard, the resubmission redoes only that part, and the dataset equals a
single-process pack of the same manifest (same keys, same bytes per member)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapipes.parts import DEBUG_EXIT_ENV
from tests.data.pack_inputs import packed_samples, write_manifest
from tools.xdyna_data import main

from .slurm_jobs import tail

COMMON = ["--workers", "0", "--shard-size", "2", "--min-frames", "8"]


def _submit(cluster, args: list[str], env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "tools.xdyna_data", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted array job (\d+)", done.stdout).group(1)


def _wait_array(cluster, job: str, logs: Path, timeout_s: float = 300) -> None:
    """Until no task of the array is pending or running (a guard against a hang, not a speed test)."""
    deadline = time.monotonic() + timeout_s
    while cluster.run(["squeue", "-h", "-j", job, "-o", "%i"], check=False).stdout.strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"array job {job} still queued after {timeout_s} s\n"
                                 + "\n".join(tail(log) for log in sorted(logs.glob("pack-*.out"))))
        time.sleep(0.5)


@pytest.mark.slurm
def test_array_pack_killed_part_rerun_equals_single_pack(slurm_cluster, tmp_path):
    manifest = write_manifest(tmp_path / "in")
    assert main(["pack", manifest, "--out", str(tmp_path / "single"), *COMMON]) == 0
    out = tmp_path / "parts"
    args = ["pack", manifest, "--out", str(out), "--parts", "3", "--slurm", *COMMON]

    job = _submit(slurm_cluster, args, dict(slurm_cluster.env, **{DEBUG_EXIT_ENV: "1:1"}))
    _wait_array(slurm_cluster, job, out / "slurm")
    records = sorted(p.name for p in (out / "parts").glob("part-*.json"))
    assert records == ["part-00000.json", "part-00002.json"], tail(next((out / "slurm").glob(f"pack-{job}_1.out")))
    assert list((out / ".parts").iterdir()), "the killed part left its staging folder"
    assert not (out / "index.json").exists()

    script = (out / "slurm" / "pack.sbatch")
    rerun = _submit(slurm_cluster, args, slurm_cluster.env)
    assert "#SBATCH --array=1\n" in script.read_text()          # only the unfinished part
    _wait_array(slurm_cluster, rerun, out / "slurm")
    assert (out / "index.json").exists(), tail(next((out / "slurm").glob(f"pack-{rerun}_1.out")))

    assert packed_samples(str(out / "index.json")) == packed_samples(str(tmp_path / "single"))
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 7 and index["quarantined"] == 1 and index["parts"] == 3
    nodes = {json.loads((out / "parts" / f"part-{p:05d}.json").read_text())["node"] for p in range(3)}
    assert nodes <= {"n1", "n2"}, nodes
    assert os.listdir(out / ".parts") == []
