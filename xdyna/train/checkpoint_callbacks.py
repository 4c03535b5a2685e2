"""Periodic and end-of-stage checkpoints, one per optimizer step count, committed atomically.

Replaces Lightning's ModelCheckpoint here because resume needs exactly "the newest complete
checkpoint" (see :mod:`xdyna.train.checkpointing`), not a "best"/"last" pair: names carry the
step (``step=000120.ckpt``), the ``latest`` pointer moves after each commit, and pruning never
deletes the newest one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from xdyna import provenance
from xdyna.train import checkpointing, elastic
from xdyna.train.rank_rng import rank_generator, reseed_global_generators

def save_step_checkpoint(trainer: L.Trainer, checkpoint_dir: str | os.PathLike) -> Path:
    """Collective: the checkpoint of the current optimizer step, unless one is already committed."""
    path = Path(checkpoint_dir) / checkpointing.checkpoint_name(trainer.global_step)
    # Every rank must take the same branch: rank 0 decides.
    exists = trainer.strategy.broadcast(checkpointing.is_complete(path))
    if not exists:
        trainer.save_checkpoint(path, weights_only=False)  # the full training state (Lightning logs a line when unset)
    return path


class StepCheckpoints(L.Callback):
    """Save every ``every_n_steps`` optimizer steps and when the stage ends; keep the newest ``keep``.

    ``keep <= 0`` keeps all. A stage stopped by preemption is not "ended": the preemption
    handler has already saved that step.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, every_n_steps: int, keep: int = 3):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.every_n_steps = int(every_n_steps)
        self.keep = int(keep)
        self.last_saved: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if not any(getattr(cb, "preempted", False) for cb in trainer.callbacks):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        self.last_saved = save_step_checkpoint(trainer, self.checkpoint_dir)
        if trainer.is_global_zero and self.keep > 0:
            self.prune()
        trainer.strategy.barrier()

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
        entries = checkpointing.list_complete_checkpoints(self.checkpoint_dir)
        doomed = [entry.path for entry in entries[: max(0, len(entries) - self.keep)]]
        for path in doomed:
            checkpointing.remove_checkpoint(path)
        return doomed


def collect_rng_states() -> dict:
    """This process's RNG states as tensors and plain Python values only, so checkpoints stay
    loadable with ``torch.load(weights_only=True)`` (numpy's own state holds an ndarray)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Carries every rank's RNG states (python, numpy, torch, CUDA, and the module's per-rank
    objective generator, :mod:`xdyna.train.rank_rng`) through checkpoints.

    Only rank 0's checkpoint dict reaches disk (DDP and DeepSpeed alike), so ``state_dict``
    gathers all ranks' states. They are applied at the first training batch after a resume, not
    at load time: between load and that batch Lightning builds the data iterator, which draws
    from the global RNG once, while the never-stopped run drew that number at its epoch start.

    A resume on another world size (N saved ranks, M now) maps no old stream onto a new rank:
    it starts the next *generation* of the elastic-resume rule in :mod:`xdyna.train.rank_rng`
    (every rank's objective stream from ``(seed, rank, generation)``, the global generators from
    ``(seed, generation)``), and the generation travels in later checkpoints. Every resume prints
    one line on rank 0: ``resumed from N ranks onto M at step S``.

    The world size the run started on travels too: an elastic resume sets the learning rate by
    ``stage.optim.elastic_lr`` against it (:func:`xdyna.train.elastic.elastic_lr_scale`) and says so
    in a second line.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None
        self._module = None
        # Elastic resumes this run has been through (see xdyna.train.rank_rng).
        self.generation = 0
        # The world size of the run's first attempt (None until setup or a loaded checkpoint says).
        self.start_world_size: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._module = pl_module
        self.start_world_size = trainer.world_size

    def _collect(self) -> dict:
        states = collect_rng_states()
        if self._module is not None and hasattr(self._module, "objective_rng_state"):
            states["objective"] = self._module.objective_rng_state()
        return states

    def state_dict(self) -> dict:
        states = self._collect()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered, "generation": self.generation, "start_world_size": self.start_world_size}
        return {"ranks": [states], "generation": self.generation, "start_world_size": self.start_world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict
        # (Checkpoints from before the key: the run started on the world size that saved them.)
        self.start_world_size = int(state_dict.get("start_world_size") or len(state_dict["ranks"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        ranks, saved_generation = self._pending["ranks"], int(self._pending.get("generation", 0))
        self._pending = None
        if trainer.is_global_zero:
            print(f"xdyna-train: resumed from {len(ranks)} ranks onto {trainer.world_size} at step {trainer.global_step}",
                  flush=True)
        if len(ranks) == trainer.world_size:
            self.generation = saved_generation
            mine = ranks[trainer.global_rank]
            set_rng_states(mine)
            if "objective" in mine and hasattr(pl_module, "load_objective_rng_state"):
                pl_module.load_objective_rng_state(mine["objective"])
            return
        self.generation = saved_generation + 1
        self._rescale_learning_rate(trainer, pl_module)
        reseed_global_generators(pl_module.seed, self.generation)
        if hasattr(pl_module, "load_objective_rng_state"):
            device = pl_module.objective_generator().device
            fresh = rank_generator(pl_module.seed, trainer.global_rank, device, generation=self.generation)
            pl_module.load_objective_rng_state(fresh.get_state())

    def _rescale_learning_rate(self, trainer, pl_module) -> None:
        optim = getattr(pl_module, "optim", None)
        if optim is None:  # a module without xdyna's optimizer config: nothing to rescale
            return
        scale = elastic.elastic_lr_scale(optim.elastic_lr, self.start_world_size, trainer.world_size)
        elastic.rescale_learning_rate([config.scheduler for config in trainer.lr_scheduler_configs], optim.lr, scale)
        if trainer.is_global_zero:
            what = (f"kept at stage.optim.lr (stage.optim.elastic_lr=keep; linear or sqrt would scale it with the global batch)"
                    if optim.elastic_lr == "keep" else f"x{scale:.6g} of stage.optim.lr (stage.optim.elastic_lr={optim.elastic_lr})")
            print(f"xdyna-train: the global batch is now {trainer.world_size} ranks' (the run started on {self.start_world_size});"
                  f" learning rate {what}", flush=True)


class ProvenanceCheckpoint(L.Callback):
    """Puts the run's provenance (:mod:`xdyna.provenance`) into every checkpoint (the dict's
    ``provenance`` entry; a DeepSpeed directory also gets it as ``provenance.json`` beside the
    shards) and into the W&B run's config and summary, and carries the resume chain.

    The run-constant part (git, config, shard hashes, versions, pretrained file hashes) is collected
    once, on global rank 0 only (hashing GBs of pretrained weights on every rank would only repeat
    the same work). Each resume appends one link to the chain read from the checkpoint it resumes:
    the checkpoint, its step, the world size it was written on (the saved record's, else the
    ``COMPLETE`` marker's that :mod:`xdyna.train.elastic` reads) and the one it resumes on.
    """

    def __init__(self, config: dict, data: dict | None, pretrained: dict | None) -> None:
        self._inputs = (config, data, pretrained)
        self._base: dict | None = None
        self.resume_chain: list[dict] = []

    def record(self, trainer) -> dict:
        if self._base is None:
            config, data, pretrained = self._inputs
            self._base = provenance.collect(config, data=data, pretrained=pretrained)
        return provenance.with_run_state(self._base, trainer.global_step, trainer.world_size, self.resume_chain)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from xdyna.train.elastic import saved_world_size
        from xdyna.train.slurm import slurm_job_id

        saved = checkpoint.get(provenance.CHECKPOINT_KEY) or {}
        path = trainer.ckpt_path
        from_world_size = saved.get("world_size")
        if from_world_size is None and path is not None and Path(path).is_dir():
            from_world_size = saved_world_size(path)
        self.resume_chain = [*saved.get("resume_chain", []),
                             provenance.resume_entry(path, checkpoint.get("global_step", 0), trainer.world_size,
                                                     from_world_size, slurm_job_id())]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Only global rank 0's dict reaches disk (DDP and DeepSpeed's client state alike).
        if trainer.is_global_zero:
            checkpoint[provenance.CHECKPOINT_KEY] = self.record(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not trainer.is_global_zero:
            return
        # Collected here, not at the first save: a save is collective, and the other ranks would
        # wait at its barrier while rank 0 hashes the pretrained weights.
        record = self.record(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({provenance.CHECKPOINT_KEY: provenance.compact(record)},
                                                allow_val_change=True)
                logger.experiment.summary.update({
                    "provenance/git_commit": record["git"]["commit"],
                    "provenance/git_dirty": record["git"]["dirty"],
                    "provenance/shards_sha256": (record["data"] or {}).get("shards_sha256"),
                    "provenance/world_size": record["world_size"],
                    "provenance/resumes": len(record["resume_chain"]),
                })
