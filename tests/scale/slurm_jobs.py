"""Watching jobs on the local test cluster: waiting, releasing requeue holds, explaining failures."""

from __future__ import annotations

import time
from pathlib import Path

ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# Guards against a hung job, not expectations of speed: on a loaded 2-core machine one attempt of
# the tiny 6-step job can take many minutes. The jobs' own SLURM time limit (JOB_TIME_LIMIT_MIN)
# lies beyond them, so SLURM's end-of-time signal (--signal=SIGUSR1@90) never preempts a test job
# a second time.
JOB_TIMEOUT_S = 1800
JOB_TIME_LIMIT_MIN = 60


def tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class JobFailure(AssertionError):
    pass


def diagnose(cluster, job_id: str, job_log: Path, message: str) -> JobFailure:
    """An assertion error carrying everything needed to see why the job went wrong."""
    scontrol = cluster.run(["scontrol", "show", "job", job_id], check=False).stdout
    return JobFailure(
        f"{message}\n--- scontrol show job {job_id}\n{scontrol}\n--- job log {job_log}\n{tail(job_log)}"
        f"\n--- slurmctld.log\n{tail(cluster.work / 'log' / 'slurmctld.log', 30)}"
    )


def wait_for(predicate, timeout_s: float, on_timeout) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise on_timeout()


def restarts(cluster, job_id: str) -> int:
    return int(cluster.job_field(job_id, "Restarts") or 0)


def release_requeue_hold(cluster, job_id: str) -> None:
    """slurmctld holds every requeued batch job for a fixed 120 s (``Reason=BeginTime``) before it
    may start again; that wait is the scheduler's, not ours to test: release the job now."""
    if (restarts(cluster, job_id) and cluster.job_state(job_id) == "PENDING"
            and cluster.job_field(job_id, "Reason") == "BeginTime"):
        cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def wait_while_running(cluster, job_id: str, job_log: Path, ready, what: str) -> None:
    """Wait for ``ready()`` while the job's first attempt runs (it must not end before: the
    caller is about to signal it)."""
    def check() -> bool:
        state = cluster.job_state(job_id)
        if state in (*ENDED_BADLY, "COMPLETED"):
            raise diagnose(cluster, job_id, job_log, f"job ended ({state}) before it was signalled")
        return ready()

    wait_for(check, JOB_TIMEOUT_S, lambda: diagnose(cluster, job_id, job_log, f"no {what} in time"))


def wait_requeued_and_completed(cluster, job_id: str, job_log: Path) -> None:
    """Wait until the signalled job has been requeued (released from slurmctld's hold) and its
    restarted attempt completed."""
    def check() -> bool:
        state = cluster.job_state(job_id)
        if state in ENDED_BADLY:
            raise diagnose(cluster, job_id, job_log, f"job ended {state}")
        release_requeue_hold(cluster, job_id)
        return state == "COMPLETED" and restarts(cluster, job_id) >= 1

    wait_for(check, JOB_TIMEOUT_S, lambda: diagnose(cluster, job_id, job_log, "job did not requeue and complete in time"))
