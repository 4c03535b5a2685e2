"""End to end on the real local SLURM cluster: an elastic job (``launcher.nodes_min=1
launcher.nodes=2``) submitted with xdyna-launch starts on both nodes, one node is drained while it
runs, SIGUSR1 makes it checkpoint and requeue itself (same job id), and the restarted attempt comes
back on the one node left: it trains on 1 node instead of the configured 2 (one line), resumes the
2-rank ZeRO-2 checkpoint the signal wrote through the universal conversion (``resumed from 2 ranks
onto 1``) and finishes with the same trainable weights as a local run that made the same change at
the same step without SLURM: 2 ranks up to the preempted step, then the same run directory resumed
on 1 rank (within tiny_run.WEIGHT_ATOL; the step after the resume moves them far more). So one job
covers the preemption/requeue path and the node count SLURM gives back: what SLURM adds (the
signal's checkpoint, the requeue, 2 nodes of 1 task each, the allocation the restart adopts) must
change no weight. That the elastic resume itself carries the optimizer state exactly (the local
chain goes through the same conversion) is tests/scale/test_elastic_resume.py's check against
AdamW's recurrence; that a same-size resume ends like a never-stopped run is test_resume.py's.

The pieces without a cluster (seconds): the node-range script and the allocation a task adopts,
checked against Lightning's own SLURM validation."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from launch.cli import main as launch_main
from xdyna.checkpoint_io import read_checkpoint
from xdyna.train import checkpointing, elastic, slurm
from xdyna.train.scaleout import adopt_slurm_allocation

from .slurm_jobs import (JOB_TIME_LIMIT_MIN, JOB_TIMEOUT_S, diagnose, restarts, wait_requeued_and_completed,
                         wait_while_running)
from .tiny_run import BIN, WEIGHT_ATOL, clean_env, max_weight_difference, tiny_overrides

# The fewest steps that exercise it: step 1 is checkpointed and held (debug.hold_after_step, first
# attempt only) until the signal, which checkpoints step 2 on 2 ranks; the restart trains step 3 on
# 1 rank from the converted optimizer state, the step the weights are compared after.
HOLD_AFTER_STEP = 1
PREEMPTED_STEP = HOLD_AFTER_STEP + 1
MAX_STEPS = PREEMPTED_STEP + 1
DRAINED = "n2"  # the batch script runs on the first node of the allocation, n1


def test_node_range_renders_elastic_header_and_allocation_sized_step(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("XDYNA_RUN_ID", raising=False)
    assert launch_main(["slurm", "--dry-run", "--launcher", "slurm_cpu", f"run.root={tmp_path}",
                        "launcher.nodes=4", "launcher.nodes_min=2", "launcher.cpus_per_task=3"]) == 0
    script = capsys.readouterr().out
    # No --ntasks-per-node in the header: with it slurm fixes the task count at min x tasks and
    # allocates the minimum even when more nodes are idle.
    assert "#SBATCH --nodes=2-4\n#SBATCH --mincpus=3\n" in script and "#SBATCH --ntasks-per-node" not in script
    assert ("srun --kill-on-bad-exit=1 --nodes=$SLURM_JOB_NUM_NODES --ntasks-per-node=1 "
            "--ntasks=$((SLURM_JOB_NUM_NODES * 1)) --cpus-per-task=3 ") in script
    assert "trainer.num_nodes=4 trainer.devices=1" in script
    # Without a range: exactly `nodes`, as before.
    assert launch_main(["slurm", "--dry-run", "--launcher", "slurm_cpu", f"run.root={tmp_path}", "launcher.nodes=2",
                        "launcher.nodes_min=2"]) == 0
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in capsys.readouterr().out
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "launcher.nodes=2", "launcher.nodes_min=3"]) == 2
    assert "launcher.nodes_min=3 must lie in 1..launcher.nodes=2" in capsys.readouterr().err
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "launcher.nodes_min=two"]) == 2
    assert "launcher.nodes_min=two: Value 'two' of type 'str' could not be converted to Integer" in capsys.readouterr().err
    with pytest.raises(slurm.LaunchError, match="nodes_min=0"):
        slurm.SlurmJobSpec(job_name="x", nodes=2, nodes_min=0).validate()


def _srun_task(monkeypatch, nodes: int, tasks_per_node: int) -> None:
    """The variables srun gives a task of a step of ``nodes`` x ``tasks_per_node``."""
    for key, value in {"SLURM_NTASKS": nodes * tasks_per_node, "SLURM_NNODES": nodes, "SLURM_JOB_NUM_NODES": nodes,
                       "SLURM_NTASKS_PER_NODE": tasks_per_node, "SLURM_PROCID": 0, "SLURM_LOCALID": 0,
                       "SLURM_NODEID": 0, "SLURM_JOB_NAME": "xdyna-run"}.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_task_trains_on_the_nodes_its_attempt_got(monkeypatch):
    _srun_task(monkeypatch, nodes=1, tasks_per_node=2)
    kwargs = {"num_nodes": 2, "devices": 2, "accelerator": "cpu"}
    # What Lightning does with the submitted shape: refuses it.
    with pytest.raises(ValueError, match="num_nodes=2"):
        SLURMEnvironment(auto_requeue=False).validate_settings(num_devices=2, num_nodes=2)
    line = adopt_slurm_allocation(kwargs)
    assert line == ("xdyna-train: SLURM gave this job 1 node(s) x 2 task(s) per node; "
                    "training on that instead of trainer.num_nodes=2")
    assert kwargs == {"num_nodes": 1, "devices": 2, "accelerator": "cpu"}
    SLURMEnvironment(auto_requeue=False).validate_settings(num_devices=kwargs["devices"], num_nodes=kwargs["num_nodes"])
    # The shape asked for: nothing to say; "auto" devices take the tasks per node silently.
    _srun_task(monkeypatch, nodes=2, tasks_per_node=4)
    kwargs = {"num_nodes": 2, "devices": "auto"}
    assert adopt_slurm_allocation(kwargs) is None and kwargs == {"num_nodes": 2, "devices": 4}
    # An interactive allocation is no SLURM job to Lightning, nor here.
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    kwargs = {"num_nodes": 3, "devices": 1}
    assert adopt_slurm_allocation(kwargs) is None and kwargs == {"num_nodes": 3, "devices": 1}


def _reference_chain(shards: Path, root: Path, cwd: Path) -> subprocess.Popen:
    """The job's change made locally (no SLURM, no signal, no hold): 2 ranks train up to the step the
    job is preempted at and end there, then the same run directory resumes on 1 rank (elastically,
    from that step's checkpoint) to the end. One process group, so a failed test can end it whole."""
    def train(devices: int, max_steps: int) -> str:
        return shlex.join([str(BIN / "xdyna-train"), *tiny_overrides(shards, root, "reference", max_steps, every_n_steps=1),
                           "checkpoint.export_at_end=false", f"trainer.devices={devices}"])

    return subprocess.Popen(["bash", "-c", f"{train(2, PREEMPTED_STEP)} && {train(1, MAX_STEPS)}"], cwd=cwd, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_job_requeued_onto_fewer_nodes_resumes_elastically_to_local_weights(slurm_cluster, shards, tmp_path):
    root = tmp_path / "runs"
    # The reference trains meanwhile on this machine, as the job's two attempts do. Started first:
    # its two start-ups in a row are the longer path (under load by ~40 s, what xdyna-launch takes).
    reference = _reference_chain(shards, root, tmp_path)
    job_id = None
    try:
        launched = subprocess.run(
            [str(BIN / "xdyna-launch"), "slurm", "--launcher", "slurm_cpu", "launcher.nodes=2", "launcher.nodes_min=1",
             f"launcher.time={JOB_TIME_LIMIT_MIN}", *tiny_overrides(shards, root, "elastic", MAX_STEPS, every_n_steps=1),
             "checkpoint.export_at_end=false", f"debug.hold_after_step={HOLD_AFTER_STEP}"],
            cwd=tmp_path, env=clean_env(slurm_cluster.env), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        job_id = re.search(r"^job_id\s+(\d+)$", launched.stdout, re.M).group(1)
        run_dir = root / "elastic"
        job_log = run_dir / "slurm" / f"slurm-{job_id}.out"
        checkpoints = run_dir / "checkpoints"
        assert "#SBATCH --nodes=1-2" in (run_dir / "slurm" / "job.sbatch").read_text()
        wait_while_running(slurm_cluster, job_id, job_log, lambda: checkpointing.is_complete(
            checkpoints / checkpointing.checkpoint_name(HOLD_AFTER_STEP)), f"step-{HOLD_AFTER_STEP} checkpoint")
        # With both nodes idle SLURM gives a node range its maximum.
        if slurm_cluster.job_field(job_id, "NodeList") != "n[1-2]":
            raise diagnose(slurm_cluster, job_id, job_log, "the first attempt did not get both nodes")
        # A node lost while the job runs: it keeps running there (DRAINING), and the requeued job
        # can only start on the other one.
        slurm_cluster.run(["scontrol", "update", f"NodeName={DRAINED}", "State=DRAIN", "Reason=xdyna-elastic-test"])
        # To the job steps' tasks, as SLURM's own --signal=SIGUSR1@<lead> does (not the batch shell).
        slurm_cluster.run(["scancel", "--signal=USR1", job_id])
        wait_requeued_and_completed(slurm_cluster, job_id, job_log)
        reference_out, _ = reference.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()
        # The cluster is shared by the session's other SLURM tests: leave no job and no drained node.
        if job_id is not None:
            slurm_cluster.run(["scancel", job_id], check=False)
        slurm_cluster.run(["scontrol", "update", f"NodeName={DRAINED}", "State=RESUME"], check=False)
    assert reference.returncode == 0, reference_out[-3000:]

    log = job_log.read_text(errors="replace")
    if restarts(slurm_cluster, job_id) != 1 or f"xdyna: job {job_id} restart 1 on n1\n" not in log:
        raise diagnose(slurm_cluster, job_id, job_log, "expected exactly one requeue, back on n1 alone")
    first, restart = log.split(f"xdyna: job {job_id} restart 1", 1)
    preempted_checkpoint = checkpoints / checkpointing.checkpoint_name(PREEMPTED_STEP)
    # Rank 0 reports the preemption; which rank's signal it names depends on which task SLURM
    # signalled first (its own: SIGUSR1; else "a peer's signal"), so either is right.
    preempted = re.search(r"(SIGUSR1|a peer's signal) -> checkpoint (\S+) at step (\d+); requeued SLURM job (\d+)", first)
    if not preempted or (Path(preempted.group(2)), int(preempted.group(3)), preempted.group(4)) != (
            preempted_checkpoint, PREEMPTED_STEP, job_id):
        raise diagnose(slurm_cluster, job_id, job_log, f"no step-{PREEMPTED_STEP} '<signal> -> checkpoint ... requeued' "
                                                       "line from rank 0")
    # The configured 2 nodes are what the first attempt got: no line there, one on the restart.
    shape = "xdyna-train: SLURM gave this job 1 node(s) x 1 task(s) per node; training on that instead of trainer.num_nodes=2"
    assert "SLURM gave this job" not in first and restart.count(shape) == 1, restart[-3000:]
    resumed = re.search(r"resumed_from\s+(\S+)", restart)
    assert resumed and Path(resumed.group(1)) == preempted_checkpoint, restart[-3000:]
    assert f"xdyna-train: resumed from 2 ranks onto 1 at step {PREEMPTED_STEP}" in restart, restart[-3000:]
    # Through DeepSpeed's universal checkpoint, and the 1-rank attempt wrote the final step.
    assert checkpointing.is_complete(elastic.universal_path(preempted_checkpoint))
    final = checkpointing.checkpoint_name(MAX_STEPS)
    assert checkpointing.read_metadata(checkpoints / final)["world_size"] == 1
    got, meta = read_checkpoint(checkpoints / final)
    assert meta["global_step"] == MAX_STEPS

    # The reference made the same change at the same step: same weights, step by step.
    reference_checkpoints = root / "reference" / "checkpoints"
    assert f"xdyna-train: resumed from 2 ranks onto 1 at step {PREEMPTED_STEP}" in reference_out, reference_out[-3000:]
    assert checkpointing.read_metadata(reference_checkpoints / final)["world_size"] == 1
    at_preemption = read_checkpoint(reference_checkpoints / checkpointing.checkpoint_name(PREEMPTED_STEP))[0]
    worst = max_weight_difference(at_preemption, read_checkpoint(preempted_checkpoint)[0])
    assert worst <= WEIGHT_ATOL, f"the signal's step-{PREEMPTED_STEP} checkpoint differs from the local run's by {worst}"
    expected = read_checkpoint(reference_checkpoints / final)[0]
    worst = max_weight_difference(expected, got)
    assert worst <= WEIGHT_ATOL, f"the requeued job's final weights differ from the local elastic chain's by {worst}"
    # The step after the elastic resume moved weights far beyond that tolerance, so a step on
    # another batch, noise draw, learning rate or optimizer state could not pass.
    moved = max_weight_difference(at_preemption, expected)
    assert moved > 100 * WEIGHT_ATOL, f"the step after the resume moved weights by {moved} only"
