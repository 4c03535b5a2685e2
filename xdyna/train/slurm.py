"""SLURM job rendering and submission for ``xdyna-launch slurm`` (launch/ is a thin CLI over this).

One sbatch script per run: ``--nodes`` = ``trainer.num_nodes``, ``--ntasks-per-node`` =
``trainer.devices`` (Lightning's rule: one task per device, started by ``srun``), the warning
signal ``--signal=SIGUSR1@<lead>`` that :class:`xdyna.train.preemption.PreemptionHandler` turns
into checkpoint + ``scontrol requeue``, and ``--requeue``. The run id is fixed at submission and
exported as ``XDYNA_RUN_ID``; a requeued job keeps its environment, so it lands in the same run
directory and W&B run and resumes there.

Elastic jobs (``launcher.nodes_min``): ``--nodes=<min>-<max>``, and SLURM starts each attempt on
as many nodes of that range as it can give at once, so a requeued job may come back on fewer or
more nodes than it left. The header then carries no ``--ntasks-per-node``: with it, sbatch fixes
the job's task count at ``min x tasks`` and the scheduler allocates the minimum node count even
when more nodes are idle (seen on slurm 22.05); the per-node CPUs are asked for with ``--mincpus``
instead. Every script's ``srun`` sizes its step from the allocation it got
(``$SLURM_JOB_NUM_NODES`` nodes x the tasks per node), never from the task count sbatch exported
at submission, and the training reads its node count from the step
(:func:`xdyna.train.scaleout.adopt_slurm_allocation`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The SLURM job this process runs in, ``None`` outside SLURM: ``<array job>_<task>`` for array
    jobs (submitit sweeps), else the plain job id. A requeued job keeps it, so the run id
    (``xdyna.train.cli.default_run_id``) and the requeue target both come from here."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID") or None


class LaunchError(ValueError):
    """A launch request that cannot become a valid job; the message says which setting."""


@dataclass
class LauncherConfig:
    """The ``launcher`` config group (``conf/launcher/``, added by ``xdyna-launch``): the job's
    shape, and the schema of those files (:mod:`xdyna.train.schema`), which hold only what differs.
    ``trainer.num_nodes`` and ``trainer.devices`` are set from ``nodes`` / ``devices_per_node``
    (Lightning under SLURM: one task per device, started by srun)."""

    nodes: int = 1
    nodes_min: int | None = None      # elastic: --nodes=<nodes_min>-<nodes>; a requeue may come back on fewer nodes
    devices_per_node: int = 8         # = tasks per node = GPUs per node
    request_gpus: bool = True         # ask SLURM for devices_per_node GPUs (--gpus-per-node); false on CPU nodes
    smoke_test: bool = False          # true: allow the tiny model or a CPU trainer on GPU nodes (refused otherwise)
    cpus_per_task: int | None = 8
    mem: str | None = None            # per node, e.g. 480G; null = partition default
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_lead_s: int = 90           # SIGUSR1 this long before the time limit -> checkpoint + requeue
    requeue: bool = True
    extra_directives: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--constraint=a100"]
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. ["module load cuda/12.4"]

    def job_spec(self, job_name: str) -> "SlurmJobSpec":
        return SlurmJobSpec(
            job_name=job_name, nodes=self.nodes, nodes_min=self.nodes_min, tasks_per_node=self.devices_per_node,
            gpus_per_node=self.devices_per_node if self.request_gpus else 0, cpus_per_task=self.cpus_per_task,
            mem=self.mem, time=str(self.time), partition=self.partition, account=self.account, qos=self.qos,
            signal_lead_s=self.signal_lead_s, requeue=self.requeue, extra_directives=tuple(self.extra_directives),
            setup=tuple(self.setup))


@dataclass(frozen=True)
class SlurmJobSpec:
    """What the sbatch header says. ``tasks_per_node`` is the number of devices per node."""

    job_name: str
    nodes: int = 1
    nodes_min: int | None = None    # elastic: any node count in [nodes_min, nodes]; None = exactly `nodes`
    tasks_per_node: int = 1
    gpus_per_node: int = 0          # GPUs to request (GRES); 0 on CPU-only partitions
    cpus_per_task: int | None = None
    mem: str | None = None          # e.g. "64G" per node
    time: str = LauncherConfig.time
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_lead_s: int = LauncherConfig.signal_lead_s  # SIGUSR1 this many seconds before the time limit
    requeue: bool = LauncherConfig.requeue
    extra_directives: tuple[str, ...] = ()   # further "#SBATCH" options, e.g. "--constraint=a100"
    setup: tuple[str, ...] = ()              # shell lines before srun (module load, venv activate)

    @property
    def elastic(self) -> bool:
        return self.nodes_min is not None and self.nodes_min < self.nodes

    def validate(self) -> None:
        if self.nodes < 1:
            raise LaunchError(f"launcher.nodes must be >= 1, got {self.nodes}")
        if self.nodes_min is not None and not 1 <= self.nodes_min <= self.nodes:
            raise LaunchError(f"launcher.nodes_min={self.nodes_min} must lie in 1..launcher.nodes={self.nodes} "
                              "(null: always exactly launcher.nodes)")
        if self.tasks_per_node < 1:
            raise LaunchError(f"tasks per node (trainer.devices) must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.gpus_per_node != self.tasks_per_node:
            raise LaunchError(
                f"launcher.gpus_per_node={self.gpus_per_node} but trainer.devices={self.tasks_per_node}: "
                "Lightning under SLURM needs one task per GPU"
            )
        if not _TIME.match(self.time):
            raise LaunchError(f"launcher.time {self.time!r} is not a SLURM time ([D-]HH[:MM[:SS]])")
        if self.signal_lead_s < 10:
            raise LaunchError(f"launcher.signal_lead_s={self.signal_lead_s}: too little time to checkpoint")


def stable_run_id(name: str, overrides: Sequence[str]) -> str:
    """``<name>-<hash of the overrides>``: the same launch command gives the same run (and resumes it).

    Never a timestamp: the id must be reproducible from the command so that a resubmission, by
    hand or by SLURM's requeue, continues the run in place.
    """
    relevant = sorted(o for o in overrides if not o.lstrip("+").startswith(("run.id=", "launcher")))
    digest = hashlib.sha1("\n".join(relevant).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
    return f"{stem[:50]}-{digest}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise LaunchError(
            f"run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' (it names a directory and a W&B run)"
        )
    return run_id


def render_sbatch(spec: SlurmJobSpec, train_command: Sequence[str], run_dir: Path, run_id: str) -> str:
    """The batch script text. ``train_command`` runs once per task under ``srun``."""
    spec.validate()
    log_dir = run_dir / "slurm"
    directives = [f"--job-name={spec.job_name}"]
    if spec.elastic:
        # No --ntasks-per-node here (see the module docstring): every task's CPUs per node instead.
        directives += [f"--nodes={spec.nodes_min}-{spec.nodes}",
                       f"--mincpus={spec.tasks_per_node * (spec.cpus_per_task or 1)}"]
    else:
        directives += [f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    directives += [
        f"--time={spec.time}",
        f"--signal=SIGUSR1@{spec.signal_lead_s}",
        # Requeued jobs append to the same log instead of overwriting the first attempt's.
        "--open-mode=append",
        f"--output={log_dir}/slurm-%j.out",
    ]
    if spec.requeue:
        directives.append("--requeue")
    if spec.gpus_per_node:
        directives.append(f"--gpus-per-node={spec.gpus_per_node}")
    for option, value in (("cpus-per-task", spec.cpus_per_task), ("mem", spec.mem), ("partition", spec.partition),
                          ("account", spec.account), ("qos", spec.qos)):
        if value not in (None, ""):
            directives.append(f"--{option}={value}")
    directives.extend(spec.extra_directives)
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += [
        "# Rendered by xdyna-launch. A requeued job reruns this script with the same environment:",
        "# same XDYNA_RUN_ID -> same run directory and W&B run -> resume from the newest complete checkpoint.",
        "set -euo pipefail",
        f"export XDYNA_RUN_ID={shlex.quote(run_id)}",
        'echo "xdyna: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        *spec.setup,
        # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others hanging.
        # The step's shape comes from this attempt's allocation: the task count sbatch exported at
        # submission is stale once a requeued job comes back on another node count.
        f"srun --kill-on-bad-exit=1 --nodes=$SLURM_JOB_NUM_NODES --ntasks-per-node={spec.tasks_per_node} "
        f"--ntasks=$((SLURM_JOB_NUM_NODES * {spec.tasks_per_node})) "
        # srun does not inherit sbatch's --cpus-per-task (srun(1), slurm 22.05): ask again.
        + (f"--cpus-per-task={spec.cpus_per_task} " if spec.cpus_per_task else "")
        + " ".join(shlex.quote(part) for part in train_command),
    ]
    return "\n".join(lines) + "\n"


def write_sbatch(script: str, run_dir: Path) -> Path:
    path = run_dir / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    return path


def submit(script_path: Path, sbatch: str = "sbatch", env: dict | None = None) -> str:
    """``sbatch --parsable``; returns the job id."""
    try:
        done = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, env=env)
    except FileNotFoundError as err:
        raise LaunchError(f"{sbatch!r} not found: run xdyna-launch on a SLURM login node") from err
    if done.returncode != 0:
        raise LaunchError(f"sbatch rejected {script_path}: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed no job id: {done.stdout.strip()!r}")
    return job_id


def train_command(overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """The per-task command: this interpreter running the Hydra entry point with the overrides."""
    return [python, "-m", "xdyna.train.cli", *overrides]


@dataclass
class LaunchPlan:
    run_id: str
    run_dir: Path
    spec: SlurmJobSpec
    overrides: list[str] = field(default_factory=list)

    def script(self, python: str = sys.executable) -> str:
        return render_sbatch(self.spec, train_command(self.overrides, python), self.run_dir, self.run_id)
