"""`xdyna-train` end to end in subprocesses: real shards, real checkpoints, real W&B (offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


# A guard against a hung run only: on a loaded 2-core machine a tiny run can take minutes.
def run(args: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
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
def test_train_writes_loadable_checkpoint_sample_and_wandb_then_resumes(tmp_path, shards, tiny_sd15_folder):
    from tests.test_provenance import check_run_provenance
    from xdyna.train.module import XDynaTrainingModule

    # Tiny saved SD1.5 weights: the provenance check below finds their file hashes.
    sd15 = f"model.pretrained.sd15={tiny_sd15_folder}"
    first = train(tmp_path, shards, "trainer.max_steps=3", sd15)
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

    second = train(tmp_path, shards, "trainer.max_steps=5", sd15)
    assert second.returncode == 0, second.stderr[-3000:]
    assert outputs(second.stdout)["resumed_from"] == str(checkpoint)
    # Commit, config, shard hash, versions, world size, resume chain and pretrained hashes, read
    # back from an xdyna-export of the resumed run and from its W&B run.
    check_run_provenance(tmp_path, shards, checkpoint, Path(outputs(second.stdout)["checkpoint"]), tiny_sd15_folder,
                         Path(outputs(second.stdout)["wandb_dir"]), max_steps=5)
    # Checkpoints are step-named and committed atomically (xdyna.train.checkpointing): the resumed
    # run's newest one is a new file, the step-3 one it resumed from is left as it was.
    resumed_checkpoint = Path(outputs(second.stdout)["checkpoint"])
    state = torch.load(resumed_checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5

    # A resume reads its checkpoint weights-only too: one holding an object that would run code is
    # refused in one line naming it and the file, and the code never runs.
    from tests.test_checkpoint_weights_only import RunsCode

    marker = tmp_path / "ran"
    state["callbacks"]["planted"] = RunsCode(marker)
    torch.save(state, resumed_checkpoint)
    third = train(tmp_path, shards, "trainer.max_steps=6", sd15)
    assert third.returncode == 2, third.stderr[-3000:]
    assert_one_line_error(third, "step=000005.ckpt' is refused: it holds")
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["data.shards=/nonexistent/shards"], "data.shards: shard '/nonexistent/shards' does not exist"),
        (["model=no_such_model"], "model=no_such_model: no such option; choose one of sd15, tiny"),
        (["stage=stag1"], "stage=stag1: no such option (did you mean stage1?); choose one of stage1, stage2"),
        (["model.flavor=tiny"], "model.flavor=tiny: model has no key 'flavor' (did you mean flavour?)"),
        (["data.shards=/d/train-{000000..000009}.tar"], "cannot parse override 'data.shards=/d/train-{000000..000009}.tar'"),
        (["model=sd15"], "required config value(s) not set: model.pretrained.sd15"),
        (["model=sd15", "model.pretrained.sd15=/no/sd15"], "model.pretrained.sd15: '/no/sd15' does not exist"),
        (["model.face=eyes"], "model.face='eyes'"),
        (["preset=sd15", "model.pretrained.sd15=/no/sd15", "trainer=cpu", "data.shards=null"], "data.shards is not set"),
    ],
    ids=["missing-data", "unknown-group-value", "misspelt-group-value", "unknown-key", "unquoted-braces",
         "unset-pretrained", "missing-pretrained", "bad-value", "preset-without-shards"],
)
def test_bad_input_exits_with_one_clear_line(tmp_path, shards, overrides, culprit):
    result = train(tmp_path, shards, "logger=none", "trainer.max_steps=1", *overrides)
    assert_one_line_error(result, culprit)


def assert_one_line_error(result: subprocess.CompletedProcess, culprit: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert culprit in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("xdyna-train: error:")]
    assert len(errors) == 1 and culprit in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_debug_flag_keeps_the_traceback(tmp_path, shards):
    result = train(tmp_path, shards, "logger=none", "stage=stag1", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "MissingConfigException" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_refused_before_anything_is_built(tmp_path, shards):
    result = train(tmp_path, shards, "logger=none", "trainer=gpu")
    assert_one_line_error(result, "trainer.accelerator=gpu but this machine has no usable CUDA GPU")
    assert not (tmp_path / "runs" / "e2e" / "checkpoints").exists()


def test_fusion_on_human_only_shards_is_refused_at_start(tmp_path):
    human_only = tmp_path / "human_only"
    made = run([str(BIN / "xdyna-data"), "synth", "--out", str(human_only), "--human", "2", "--scene", "0",
                "--frames", "8", "--height", "64", "--width", "32"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    result = train(tmp_path, human_only, "logger=none")
    assert_one_line_error(result, "data.scene_probability=0.25 asks for scene clips but the samples peeked in "
                                  "data.shards are all human: set data.scene_probability=0")


def test_gpu_launcher_is_refused_around_the_tiny_cpu_default_unless_a_smoke_test(tmp_path, capsys, monkeypatch):
    from launch.cli import main as launch_main

    monkeypatch.delenv("XDYNA_RUN_ID", raising=False)
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "experiment=baseline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "requests GPUs but the job has trainer.accelerator=cpu and model.flavour=tiny" in err
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "preset=sd15"]) == 2
    assert "not set: model.pretrained.sd15" in capsys.readouterr().err
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "stage=stag1"]) == 2
    assert "stage=stag1: no such option" in capsys.readouterr().err
    assert launch_main(["slurm", "--dry-run", f"run.root={tmp_path}", "launcher.smoke_test=true"]) == 0
    assert "#SBATCH --gpus-per-node=8" in capsys.readouterr().out
    # CPU nodes around the tiny model (the scale tests' jobs) stay allowed.
    assert launch_main(["slurm", "--dry-run", "--launcher", "slurm_cpu", f"run.root={tmp_path}"]) == 0
    assert "--gpus-per-node" not in capsys.readouterr().out


def test_preset_sd15_selects_the_real_size_gpu_run():
    from hydra import compose, initialize_config_dir

    from xdyna.train.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["preset=sd15", "experiment=wo_fusion"])
    assert cfg.model.flavour == "sd15" and cfg.trainer.accelerator == "gpu" and cfg.data.shards is None
    assert (cfg.data.height, cfg.data.width, cfg.data.num_frames) == (896, 512, 16)
    assert cfg.data.scene_probability == 0.0  # the ablation still applies on top of the preset
