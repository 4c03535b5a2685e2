"""End to end on the real local SLURM cluster: a 2-node ZeRO-2 job submitted with xdyna-launch gets
SIGUSR1 mid-run, checkpoints, requeues itself (same job id), resumes from its newest complete
checkpoint, finishes, and ends with the same trainable weights as a run that was never stopped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from xdyna.train import checkpointing
from xdyna.checkpoint_io import read_checkpoint

from .slurm_jobs import (JOB_TIME_LIMIT_MIN, JOB_TIMEOUT_S, diagnose, restarts, wait_requeued_and_completed,
                         wait_while_running)
from .tiny_run import BIN, WEIGHT_ATOL, clean_env, max_weight_difference, tiny_overrides

MAX_STEPS = 6
# The job holds after its step-2 checkpoint until it is signalled (debug.hold_after_step, first
# attempt only): it is still training when the signal comes, however loaded the machine, and the
# preemption handler then saves step 3.
HOLD_AFTER_STEP = 2


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_requeues_job_which_resumes_to_uninterrupted_weights(slurm_cluster, shards, tmp_path):
    root = tmp_path / "runs"
    env = clean_env(slurm_cluster.env)
    launched = subprocess.run(
        [str(BIN / "xdyna-launch"), "slurm", "--launcher", "slurm_cpu", "launcher.nodes=2", f"launcher.time={JOB_TIME_LIMIT_MIN}",
         *tiny_overrides(shards, root, "preempted", MAX_STEPS), f"debug.hold_after_step={HOLD_AFTER_STEP}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    job_id = re.search(r"^job_id\s+(\d+)$", launched.stdout, re.M).group(1)
    run_dir = root / "preempted"
    job_log = run_dir / "slurm" / f"slurm-{job_id}.out"
    checkpoints = run_dir / "checkpoints"

    # The reference run trains meanwhile on this machine: same 2 ranks, same math, never stopped.
    reference = subprocess.Popen(
        [str(BIN / "xdyna-train"), *tiny_overrides(shards, root, "uninterrupted", MAX_STEPS), "trainer.devices=2"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_while_running(slurm_cluster, job_id, job_log, lambda: checkpointing.is_complete(
            checkpoints / checkpointing.checkpoint_name(2)), "step-2 checkpoint")
        # To the job steps' tasks, as SLURM's own --signal=SIGUSR1@<lead> does (not the batch shell).
        slurm_cluster.run(["scancel", "--signal=USR1", job_id])
        wait_requeued_and_completed(slurm_cluster, job_id, job_log)
        reference_out, _ = reference.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, reference_out[-3000:]

    log = job_log.read_text(errors="replace")
    if restarts(slurm_cluster, job_id) != 1:
        raise diagnose(slurm_cluster, job_id, job_log, "expected exactly one requeue")
    # Rank 0 reports the preemption; which rank's signal it names depends on which task SLURM
    # signalled first (its own: SIGUSR1; else "a peer's signal"), so either is right.
    preempted = re.search(r"(SIGUSR1|a peer's signal) -> checkpoint (\S+) at step (\d+); requeued SLURM job (\d+)", log)
    if not preempted or preempted.group(4) != job_id:
        raise diagnose(slurm_cluster, job_id, job_log, "no '<signal> -> checkpoint ... requeued' line from rank 0")
    preempted_step = int(preempted.group(3))
    if preempted_step != HOLD_AFTER_STEP + 1:
        raise diagnose(slurm_cluster, job_id, job_log, f"preempted at step {preempted_step}, not right after the hold")
    # The restarted attempt (same job id, restart 1) resumed from the checkpoint the signal wrote.
    assert f"xdyna: job {job_id} restart 1" in log
    resumed = re.search(r"resumed_from\s+(\S+)", log.split(f"xdyna: job {job_id} restart 1", 1)[1])
    if not resumed or Path(resumed.group(1)) != checkpoints / checkpointing.checkpoint_name(preempted_step):
        raise diagnose(slurm_cluster, job_id, job_log, f"restart did not resume from the step-{preempted_step} checkpoint")

    final = checkpointing.checkpoint_name(MAX_STEPS)
    got, meta = read_checkpoint(checkpoints / final)
    expected, _ = read_checkpoint(root / "uninterrupted" / "checkpoints" / final)
    assert meta["global_step"] == MAX_STEPS
    worst = max_weight_difference(expected, got)
    assert worst <= WEIGHT_ATOL, f"requeued job's weights differ from the uninterrupted run's by {worst}"
