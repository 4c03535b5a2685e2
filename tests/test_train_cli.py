"""`xdyna-train` end to end in subprocesses: real shards, real checkpoints, real W&B (offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("XDYNA_RUN_ID", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "shards"
    result = run([str(BIN / "xdyna-data"), "synth", "--out", str(out), "--human", "3", "--scene", "1",
                  "--frames", "12", "--height", "128", "--width", "64"], cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


def train(tmp_path: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    # Run from an unrelated directory: the entry point must not depend on the working directory.
    return run([str(BIN / "xdyna-train"), "model=tiny", "data=synthetic", "stage=stage1",
                f"data.shards={shards}", f"run.root={tmp_path / 'runs'}", "run.id=e2e",
                "data.num_frames=4", "samples.num_inference_steps=2", "samples.max_samples=1",
                "checkpoint.every_n_steps=2", *overrides], cwd=tmp_path)


def outputs(stdout: str) -> dict[str, str]:
    lines = stdout.split("xdyna-train finished", 1)[1].strip().splitlines()
    return dict(line.strip().split(None, 1) for line in lines if len(line.split(None, 1)) == 2)


@pytest.mark.slow
def test_train_writes_loadable_checkpoint_sample_and_wandb_then_resumes(tmp_path, shards):
    from xdyna.train.module import XDynaTrainingModule

    first = train(tmp_path, shards, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    out = outputs(first.stdout)
    checkpoint = Path(out["checkpoint"])
    assert checkpoint.is_file() and Path(out["sample_video"]).stat().st_size > 0
    assert Path(out["wandb_dir"]).is_dir() and out["resumed_from"] == "None"

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    # Only the stage's trainable weights are stored (no frozen SD weights).
    stored = set(state["state_dict"])
    assert stored and all(
        k.startswith("model.pose_controlnet.") or ".attn1.processor." in k or ".motion_modules." in k for k in stored
    )
    module = XDynaTrainingModule.load_from_checkpoint(checkpoint, map_location="cpu")
    for name, value in state["state_dict"].items():
        assert torch.equal(module.state_dict()[name], value), name
    fresh = XDynaTrainingModule(**state["hyper_parameters"])
    changed = [k for k, v in state["state_dict"].items() if not torch.equal(fresh.state_dict()[k], v)]
    assert changed, "training did not change any trainable weight"

    second = train(tmp_path, shards, "trainer.max_steps=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert outputs(second.stdout)["resumed_from"] == str(checkpoint)
    # Checkpoints are step-named and committed atomically (xdyna.train.checkpointing): the resumed
    # run's newest one is a new file, the step-3 one it resumed from is left as it was.
    resumed_checkpoint = Path(outputs(second.stdout)["checkpoint"])
    assert torch.load(resumed_checkpoint, map_location="cpu", weights_only=False)["global_step"] == 5


@pytest.mark.parametrize(
    "overrides, exit_code, culprit",
    [
        (["data.shards=/nonexistent/shards"], 2, "data.shards: shard '/nonexistent/shards' does not exist"),
        (["model=no_such_model"], 1, "Could not find 'model/no_such_model'"),
        (["model=sd15"], 2, "required config value(s) not set: model.pretrained.sd15"),
        (["model=sd15", "model.pretrained.sd15=/no/sd15"], 2, "model.pretrained.sd15: '/no/sd15' does not exist"),
        (["model.face=eyes"], 2, "model.face='eyes'"),
    ],
    ids=["missing-data", "unknown-group-value", "unset-pretrained", "missing-pretrained", "bad-value"],
)
def test_bad_input_exits_with_one_clear_message(tmp_path, shards, overrides, exit_code, culprit):
    result = train(tmp_path, shards, "logger=none", "trainer.max_steps=1", *overrides)
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert culprit in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
