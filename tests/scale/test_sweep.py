"""A Hydra ``-m`` sweep through hydra-submitit-launcher on the real local SLURM cluster: both jobs
run, each in its own run directory (``<sweep run id>_<job num>``), none overwriting the other, and
a preempted sweep job requeues, resumes and finishes before the sweeping process returns."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from xdyna.train import checkpointing
from xdyna.train.cli import sweep_job_run_id
from xdyna.checkpoint_io import read_checkpoint

from .slurm_jobs import (ENDED_BADLY, JOB_TIME_LIMIT_MIN, JOB_TIMEOUT_S, diagnose, release_requeue_hold, restarts,
                         tail, wait_for)
from .tiny_run import BIN, clean_env, tiny_overrides

MAX_STEPS = 6
# Every job holds after its step-2 checkpoint until it is signalled (debug.hold_after_step, first
# attempt only): the test's signals find both jobs mid-run by construction, however loaded the machine.
HOLD_AFTER_STEP = 2


def test_sweep_job_run_id_is_stable_and_distinct():
    assert sweep_job_run_id("abc", 0) == sweep_job_run_id("abc", 0) == "abc_0"
    assert sweep_job_run_id("abc", 1) != sweep_job_run_id("abc", 0)


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_jobs_train_apart_and_a_preempted_one_resumes_before_the_sweep_returns(slurm_cluster, shards, tmp_path):
    """A 2-point sweep through hydra-submitit-launcher; each job gets SIGUSR2 mid-run (what
    submitit's ``--signal=USR2@<lead>`` sends), requeues itself and resumes. The sweeping process
    must not return before the restarted jobs have finished."""
    root = tmp_path / "runs"
    sweep_log = tmp_path / "sweep.log"
    sweep = subprocess.Popen(
        [str(BIN / "xdyna-train"), "-m", "hydra/launcher=submitit_slurm", f"hydra.launcher.timeout_min={JOB_TIME_LIMIT_MIN}",
         "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1",
         *tiny_overrides(shards, root, "sweep", MAX_STEPS, strategy="auto"),
         f"debug.hold_after_step={HOLD_AFTER_STEP}", "seed=0,1"],
        cwd=tmp_path, env=clean_env(slurm_cluster.env), stdout=sweep_log.open("w"), stderr=subprocess.STDOUT,
    )
    submitit_dir = root / "sweeps" / "sweep" / ".submitit"
    checkpoint_dirs = [root / sweep_job_run_id("sweep", job_num) / "checkpoints" for job_num in (0, 1)]
    first_checkpoints = checkpoint_dirs[0]

    def job_logs() -> str:
        return "\n".join(f"--- {p}\n{tail(p, 40)}" for p in sorted(submitit_dir.glob("*/*_log.*")))

    def sweep_ended_early() -> AssertionError:
        return AssertionError(f"sweep ended (rc {sweep.returncode}) before its jobs were signalled:\n"
                              f"{tail(sweep_log)}\n{job_logs()}")

    try:
        job_ids = []
        for job_num, checkpoints in enumerate(checkpoint_dirs):
            def step_written(checkpoints=checkpoints) -> bool:
                if sweep.poll() is not None:
                    raise sweep_ended_early()
                return checkpointing.is_complete(checkpoints / checkpointing.checkpoint_name(HOLD_AFTER_STEP))

            wait_for(step_written, JOB_TIMEOUT_S,
                     lambda: AssertionError(f"no step-{HOLD_AFTER_STEP} checkpoint of job {job_num}:\n{job_logs()}"))
            # submitit names array tasks' folders <array job id>_<task id>.
            job_ids.append(next(p.name for p in submitit_dir.iterdir() if p.name.endswith(f"_{job_num}")))
            slurm_cluster.run(["scancel", "--signal=USR2", job_ids[-1]])
        job_id = job_ids[0]

        def sweep_returned() -> bool:
            for job_num, signalled in enumerate(job_ids):
                if slurm_cluster.job_state(signalled) in ENDED_BADLY:
                    raise diagnose(slurm_cluster, signalled, submitit_dir / signalled / f"{signalled}_0_log.err",
                                   f"job {job_num} ended badly")
                release_requeue_hold(slurm_cluster, signalled)
            return sweep.poll() is not None

        wait_for(sweep_returned, JOB_TIMEOUT_S, lambda: AssertionError(f"sweep did not return in time:\n{job_logs()}"))
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, f"{tail(sweep_log)}\n{job_logs()}"
    # When the sweep returned, job 0 had been requeued once and its restart had finished the run,
    # resuming from the checkpoint the signal wrote (not from scratch).
    assert [restarts(slurm_cluster, signalled) for signalled in job_ids] == [1, 1], job_logs()
    assert checkpointing.newest_complete_checkpoint(first_checkpoints).name == checkpointing.checkpoint_name(MAX_STEPS), job_logs()
    resumed = re.findall(r"resumed_from\s+(\S+)", (submitit_dir / job_id / f"{job_id}_0_log.out").read_text())
    assert resumed and resumed[-1] != "None", job_logs()
    assert 2 <= read_checkpoint(Path(resumed[-1]))[1]["global_step"] < MAX_STEPS
    weights = []
    for job_num in (0, 1):
        newest = checkpointing.newest_complete_checkpoint(root / sweep_job_run_id("sweep", job_num) / "checkpoints")
        assert newest is not None and newest.name == checkpointing.checkpoint_name(MAX_STEPS), (job_num, job_logs())
        state, meta = read_checkpoint(newest)
        assert meta["global_step"] == MAX_STEPS
        weights.append(state)
    # Different seeds trained different weights: neither job wrote into the other's run.
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
