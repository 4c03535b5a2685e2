"""Everything ``xdyna-train`` adds to a Trainer for scale-out: strategy, cluster environment,
checkpoint/preemption callbacks and the checkpoint to resume from.

Kept apart from the CLI so tests and benchmarks build exactly the Trainer a job builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from xdyna.cpu_numerics import disable_onednn_for_cpu_bf16
from xdyna.train import checkpointing
from xdyna.train.checkpoint_callbacks import RandomStateCheckpoint, StepCheckpoints
from xdyna.train.preemption import PreemptionHandler
from xdyna.train.signals import PreemptionSignals
from xdyna.train.strategies import checkpoint_plugins, make_strategy

CHECKPOINT_SUBDIR = "checkpoints"


def is_env_rank_zero(environ=os.environ) -> bool:
    """Whether this process will be global rank 0, decided before any process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        if environ.get(key, "").isdigit():
            return int(environ[key]) == 0
    # Lightning's local launcher: children get LOCAL_RANK/NODE_RANK, the launching parent none.
    return environ.get("LOCAL_RANK", "0") == "0" and environ.get("NODE_RANK", "0") == "0"


def _as_count(value: Any) -> int | None:
    """An int-valued device/node setting as an int (``None`` for ``auto``, index lists ...)."""
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else None


def adopt_slurm_allocation(trainer_kwargs: dict[str, Any]) -> str | None:
    """Under ``srun``: train on the nodes and tasks per node this job attempt was given.

    ``trainer.num_nodes``/``trainer.devices`` are fixed at submission, but an elastic job
    (``--nodes=<min>-<max>``, docs/scale.md) may start, and be requeued, on any node count of its
    range. Lightning's ``SLURMEnvironment.validate_settings`` refuses a Trainer whose ``num_nodes``
    differs from the step's ``SLURM_NNODES`` or whose ``devices`` differs from
    ``SLURM_NTASKS_PER_NODE`` (and takes the world size from ``SLURM_NTASKS``), so both are set
    from those variables here, the same ones it checks. Returns the line to print when the config
    asked for another shape, else ``None``. Outside SLURM (or in an interactive allocation, which
    Lightning does not treat as SLURM) nothing changes.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    nodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    configured = {"trainer.num_nodes": trainer_kwargs.get("num_nodes", 1), "trainer.devices": trainer_kwargs.get("devices")}
    allocated = {}
    if nodes and nodes.isdigit():
        allocated["trainer.num_nodes"] = trainer_kwargs["num_nodes"] = int(nodes)
    if tasks_per_node and tasks_per_node.isdigit():
        allocated["trainer.devices"] = trainer_kwargs["devices"] = int(tasks_per_node)
    changed = [key for key, value in allocated.items()
               if _as_count(configured[key]) is not None and _as_count(configured[key]) != value]
    if not changed:
        return None
    return (f"xdyna-train: SLURM gave this job {allocated.get('trainer.num_nodes', '?')} node(s) x "
            f"{allocated.get('trainer.devices', '?')} task(s) per node; training on that instead of "
            + " ".join(f"{key}={configured[key]}" for key in changed))


@dataclass
class ScaleOut:
    trainer_kwargs: dict[str, Any]
    callbacks: list
    checkpoint_dir: Path
    resume_from: Path | None
    preemption: PreemptionHandler


def build_scaleout(
    trainer_cfg: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    every_n_steps: int,
    keep: int,
    resume: bool = True,
    preemption_signals: PreemptionSignals | None = None,
    requeue: bool = True,
) -> ScaleOut:
    """Turn ``cfg.trainer`` (with its ``strategy`` group) into Trainer kwargs + callbacks.

    ``preemption_signals``: an installed flag the caller owns (see :class:`PreemptionHandler`)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    trainer_kwargs = dict(trainer_cfg)
    reshaped = adopt_slurm_allocation(trainer_kwargs)
    if reshaped and is_env_rank_zero():
        print(reshaped, flush=True)
    strategy_cfg = trainer_kwargs.pop("strategy", "auto")
    if isinstance(strategy_cfg, Mapping):
        strategy_cfg = {k: v for k, v in strategy_cfg.items() if k != "_target_"}
        strategy = make_strategy(**strategy_cfg)
    else:
        strategy = make_strategy(kind=str(strategy_cfg))
    plugins = list(checkpoint_plugins(strategy))
    if SLURMEnvironment.detect():
        # Our PreemptionHandler owns requeue; Lightning's would save inside the signal handler.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_kwargs["strategy"] = strategy
    if str(trainer_kwargs.get("accelerator", "auto")) == "cpu":
        # Every process of the run calls this (DDP children and SLURM tasks build their own
        # Trainer): CPU bf16 is computed without oneDNN's broken AMX kernel, see xdyna.cpu_numerics.
        disable_onednn_for_cpu_bf16("cpu", str(trainer_kwargs.get("precision", "32-true")))
    if plugins:
        trainer_kwargs["plugins"] = plugins

    checkpoint_dir = Path(run_dir) / CHECKPOINT_SUBDIR
    if is_env_rank_zero():
        # Nothing writes checkpoints before training starts: leftovers of a killed write can go.
        checkpointing.remove_stale_partials(checkpoint_dir)
    resume_from = checkpointing.newest_complete_checkpoint(checkpoint_dir) if resume else None
    preemption = PreemptionHandler(checkpoint_dir, signals=preemption_signals, requeue=requeue)
    callbacks = [
        StepCheckpoints(checkpoint_dir, every_n_steps=every_n_steps, keep=keep),
        preemption,
        RandomStateCheckpoint(),
    ]
    return ScaleOut(trainer_kwargs, callbacks, checkpoint_dir, resume_from, preemption)
