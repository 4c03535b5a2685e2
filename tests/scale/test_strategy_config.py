"""Strategy configs reach DeepSpeed's config: the stage3_* settings Lightning does not expose."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from tests.test_config import compose_train


def zero_config(strategy: str) -> dict:
    return instantiate(compose_train(["model=tiny", f"trainer/strategy={strategy}"]).trainer.strategy).config["zero_optimization"]


def test_cpu_zero3_config_sets_the_reuse_distance_that_keeps_steps_linear():
    zero = zero_config("deepspeed_cpu_zero3")
    assert zero["stage"] == 3 and zero["stage3_max_reuse_distance"] == 0


def test_stage3_settings_are_dropped_below_stage_3_and_foreign_keys_refused():
    from xdyna.train.strategies import make_strategy

    assert "stage3_max_reuse_distance" not in zero_config("deepspeed_cpu_zero2")
    with pytest.raises(ValueError, match="stage3_\\* keys, got 'max_reuse_distance'"):
        make_strategy("deepspeed_cpu", zero_stage=3, zero3={"max_reuse_distance": 0})
