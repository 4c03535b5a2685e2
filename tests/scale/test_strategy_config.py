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


def test_cpu_deepspeed_puts_this_environments_ninja_first(tmp_path, monkeypatch):
    """The CPU comm op is JIT-built with whichever ninja PATH names; a ninja of another version
    takes the build for stale and recompiles it, so every process of an environment uses its own
    (xdyna.train.strategies.use_environment_ninja)."""
    import sys

    from xdyna.train.strategies import use_environment_ninja

    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    environ = {"PATH": f"/usr/bin:{bin_dir}:/bin"}
    use_environment_ninja(environ)
    assert environ["PATH"] == "/usr/bin:" + f"{bin_dir}:/bin"  # no ninja beside the interpreter: PATH untouched
    (bin_dir / "ninja").write_text("")
    use_environment_ninja(environ)
    assert environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    use_environment_ninja(environ)  # idempotent
    assert environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
