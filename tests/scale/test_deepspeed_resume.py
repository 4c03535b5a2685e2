"""Real 2-process DeepSpeed ZeRO-2 (CPU/gloo test path) through Lightning and xdyna-train:
sharded checkpoint, resume, same weights as a never-stopped run, the stage's export loads into
the model, and stage 2 starts from it by config (init.from_run)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from datapipes.video import probe

from xdyna.train import checkpointing
from xdyna.train.export import build_model_from_hparams, load_components, read_checkpoint
from xdyna.train.module import XDynaTrainingModule

from .tiny_run import BIN, WEIGHT_ATOL, clean_env, tiny_overrides


def train_zero2(root: Path, run_id: str, shards: Path, max_steps: int):
    done = subprocess.run([str(BIN / "xdyna-train"), *tiny_overrides(shards, root, run_id, max_steps), "trainer.devices=2"],
                          cwd=root, env=clean_env(), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    return root / run_id / "checkpoints"


@pytest.mark.slow
# Checkpoints hold trainable weights only by design; Lightning warns about the frozen rest.
@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict but not in the checkpoint")
def test_zero2_resume_matches_never_stopped_run_and_export_loads(tmp_path, shards):
    straight = train_zero2(tmp_path, "straight", shards, max_steps=4)
    step2, step4 = straight / checkpointing.checkpoint_name(2), straight / checkpointing.checkpoint_name(4)
    assert checkpointing.is_complete(step2) and checkpointing.is_complete(step4)
    shard_files = sorted(p.name for p in (step2 / "checkpoint").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shard_files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shard_files
    # Sample videos: each rank renders its share; rank 0 gathers them into one video (ranks stacked).
    samples = tmp_path / "straight" / "samples"
    per_rank = [probe((samples / f"step0000004_rank{r}.mp4").read_bytes()) for r in (0, 1)]
    gathered = probe((samples / "step0000004.mp4").read_bytes())
    assert gathered.height == 2 * per_rank[0].height and gathered.num_frames == per_rank[1].num_frames

    # A run "preempted" after step 2: only the step-2 checkpoint exists in its run directory.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(step2, resumed_dir / step2.name)
    resumed = train_zero2(tmp_path, "resumed", shards, max_steps=4)

    expected, meta = read_checkpoint(step4)
    got, resumed_meta = read_checkpoint(resumed / step4.name)
    assert resumed_meta["global_step"] == meta["global_step"] == 4
    assert expected.keys() == got.keys() and expected
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= WEIGHT_ATOL, f"resumed weights differ from the never-stopped run by {worst}"
    first_trained = read_checkpoint(step2)[0]
    assert any(not torch.equal(first_trained[k], expected[k]) for k in expected), "steps 3-4 changed nothing"

    # The finished stage exported itself (checkpoint.export_at_end): per-component safetensors that
    # a fresh model loads to exactly the trained weights.
    export_dir = tmp_path / "resumed" / "export"
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["components"] == ["dynamics_adapter", "motion_modules", "pose_controlnet"]
    assert manifest["step"] == 4 and manifest["source"] == str((resumed / step4.name).resolve())
    model = build_model_from_hparams(meta["hyper_parameters"])
    assert load_components(model, export_dir) == manifest["components"]
    own = model.state_dict()
    for name, value in got.items():
        assert torch.equal(own[name.removeprefix("model.")], value), name

    # Stage 2 starts from that export by config alone: init.from_run=<stage-1 run id>.
    stage2 = subprocess.run(
        [str(BIN / "xdyna-train"), *tiny_overrides(shards, tmp_path, "stage2", max_steps=1), "stage=stage2",
         "data.with_face=true", "trainer/strategy=auto", "init.from_run=resumed"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=420,
    )
    assert stage2.returncode == 0, stage2.stderr[-4000:]
    assert f"init_from     dynamics_adapter, motion_modules, pose_controlnet from {export_dir.resolve()}" in stage2.stdout
    stage2_checkpoint = checkpointing.newest_complete_checkpoint(tmp_path / "stage2" / "checkpoints")
    # The stage-2 module rebuilt from its checkpoint (hyperparameters name the export) carries
    # stage 1's weights in the components it keeps frozen, and its own trained S-Face ControlNet.
    stage2_module = XDynaTrainingModule.load_from_checkpoint(stage2_checkpoint, map_location="cpu")
    assert stage2_module.trainable_components == ["face_controlnet"]
    stage2_state = stage2_module.state_dict()
    for name, value in got.items():
        assert torch.equal(stage2_state[name], value), f"stage 2 did not start from stage 1's {name}"
