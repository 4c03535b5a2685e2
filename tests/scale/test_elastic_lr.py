"""The learning rate on an elastic resume (stage.optim.elastic_lr): the configured LR is the one for
the world size the run started on; an elastic resume keeps it or scales it with the global batch,
always against that start (xdyna.train.elastic.elastic_lr_scale), and the very next optimizer step
uses it. Real AdamW and LambdaLR as XDynaTrainingModule.configure_optimizers builds them, driven
through RandomStateCheckpoint as Lightning drives it (fast: no processes; the end-to-end ZeRO-2
chain in test_elastic_resume.py checks the step DeepSpeed takes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from xdyna.errors import ConfigError
from xdyna.train.checkpoint_callbacks import RandomStateCheckpoint, collect_rng_states
from xdyna.train.elastic import elastic_lr_scale
from xdyna.train.rank_rng import rank_generator
from xdyna.train.stage_config import OptimConfig

LR, WARMUP = 1e-3, 4


class _Module:
    """The parts of XDynaTrainingModule the callback reads: seed, optim, the objective stream."""

    def __init__(self, elastic_lr: str, rank: int = 0):
        self.seed, self.optim = 7, OptimConfig.from_mapping({"lr": LR, "warmup_steps": WARMUP, "elastic_lr": elastic_lr})
        self.generator = rank_generator(self.seed, rank)
        weight = torch.nn.Parameter(torch.ones(3))
        self.optimizer = torch.optim.AdamW([weight], lr=LR)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / WARMUP))

    def objective_generator(self):
        return self.generator

    def objective_rng_state(self):
        return self.generator.get_state()

    def load_objective_rng_state(self, state):
        self.generator.set_state(state)


def _trainer(module: _Module, world_size: int, rank: int = 0):
    return SimpleNamespace(world_size=world_size, global_rank=rank, is_global_zero=rank == 0, global_step=2,
                           lr_scheduler_configs=[SimpleNamespace(scheduler=module.scheduler)])


def _resume(saved: dict, elastic_lr: str, world_size: int, steps_done: int = 2) -> tuple[RandomStateCheckpoint, _Module]:
    """A fresh process on ``world_size`` ranks: setup, the checkpoint's callback state and the
    scheduler state it restored (``steps_done`` steps at the saved base LR), the first batch."""
    module, callback = _Module(elastic_lr), RandomStateCheckpoint()
    trainer = _trainer(module, world_size)
    callback.setup(trainer, module, "fit")
    callback.load_state_dict(saved)
    module.scheduler.base_lrs = list(saved["base_lrs"])
    for _ in range(steps_done):
        module.optimizer.step()
        module.scheduler.step()
    callback.on_train_batch_start(trainer, module, None, 0)
    return callback, module


def _saved(world_size: int, start_world_size: int | None, base_lr: float = LR) -> dict:
    torch.manual_seed(7)
    state = {"ranks": [dict(collect_rng_states(), objective=rank_generator(7, r).get_state()) for r in range(world_size)],
             "generation": 0, "base_lrs": [base_lr]}
    if start_world_size is not None:
        state["start_world_size"] = start_world_size
    return state


def test_scale_is_against_the_start():
    assert elastic_lr_scale("keep", 64, 48) == 1.0
    assert elastic_lr_scale("linear", 64, 48) == 0.75
    assert elastic_lr_scale("sqrt", 64, 16) == 0.5
    assert elastic_lr_scale("linear", 64, 64) == 1.0


@pytest.mark.parametrize("policy, scale", [("linear", 0.5), ("sqrt", math.sqrt(0.5)), ("keep", 1.0)])
def test_elastic_resume_sets_the_learning_rate_of_the_next_step(policy, scale, capsys):
    callback, module = _resume(_saved(2, 2), policy, world_size=1)
    expected_lr = LR * scale * min(1.0, 3 / WARMUP)  # the schedule's value after 2 steps, at the new base
    assert module.scheduler.base_lrs == [LR * scale]
    assert module.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert module.scheduler.get_last_lr() == [module.optimizer.param_groups[0]["lr"]]
    out = capsys.readouterr().out
    assert "resumed from 2 ranks onto 1 at step 2" in out
    assert "the global batch is now 1 ranks' (the run started on 2); learning rate" in out
    assert (f"x{scale:.6g} of stage.optim.lr (stage.optim.elastic_lr={policy})" in out) if policy != "keep" else \
        "kept at stage.optim.lr (stage.optim.elastic_lr=keep" in out
    # The schedule goes on from there: the next step's LR is the new base times the warmup factor.
    module.optimizer.step()
    module.scheduler.step()
    assert module.optimizer.param_groups[0]["lr"] == pytest.approx(LR * scale * min(1.0, 4 / WARMUP), rel=1e-12)
    assert callback.state_dict()["start_world_size"] == 2


def test_back_onto_the_start_world_size_restores_the_configured_rate_exactly():
    # 4 ranks -> 3 (x0.75) -> 4: the second resume reads the start (4) from the checkpoint the
    # 3-rank run wrote, so the rate is the configured one again, not 0.75 * 4/3 with its rounding.
    first, _ = _resume(_saved(4, 4), "linear", world_size=3)
    saved = _saved(3, first.state_dict()["start_world_size"], base_lr=LR * 0.75)
    _, module = _resume(saved, "linear", world_size=4)
    assert module.scheduler.base_lrs == [LR]


def test_same_world_size_keeps_the_restored_rate():
    # A requeue onto as many ranks leaves the restored schedule alone (even one scaled earlier).
    _, module = _resume(_saved(2, 4, base_lr=LR / 2), "linear", world_size=2)
    assert module.scheduler.base_lrs == [LR / 2]


def test_checkpoints_from_before_the_key_started_on_their_own_world_size():
    callback, module = _resume(_saved(2, None), "linear", world_size=1)
    assert callback.start_world_size == 2 and module.scheduler.base_lrs == [LR / 2]


def test_an_unknown_policy_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"stage.optim.elastic_lr='cubic': choose one of keep, linear, sqrt"):
        OptimConfig.from_mapping({"elastic_lr": "cubic"})
