"""Real 2-process runs through Lightning and xdyna-train, one per strategy (DeepSpeed ZeRO-2 and
ZeRO-3 on the CPU/gloo path, DDP over gloo): a run stopped after its first checkpoint and resumed
ends with the same weights and the same data position as a never-stopped run; a finished stage's
export (from ZeRO-2 and from ZeRO-3 shards) loads into a fresh model as exactly the trained
weights; stage 2 starts from it by config (init.from_run).

The runs are shared by the tests of this module (:class:`Runs`), so each is trained once."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from datapipes.video import probe
from tools.xdyna_export import main as xdyna_export

from xdyna.train import checkpointing
from xdyna.checkpoint_io import load_components, read_checkpoint
from xdyna.train.export import build_model_from_hparams
from xdyna.train.module import XDynaTrainingModule

from .resume_runs import CASES, CROSS_STRATEGY_ATOL, MAX_STEPS, RESUME_STEP, RUN_TIMEOUT_S, reads_runs
from .tiny_run import BIN, WEIGHT_ATOL, clean_env, max_weight_difference, tiny_overrides

def loader_positions(meta: dict) -> dict:
    """Every rank's data-loader state in a checkpoint (Lightning stores rank 0's dict, into
    which RankGatheredLoader gathered all ranks')."""
    (state,) = meta["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state["ranks"]


@pytest.mark.slow
# Checkpoints hold trainable weights only by design; Lightning warns about the frozen rest.
@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict but not in the checkpoint")
@pytest.mark.parametrize("case", [pytest.param(case, marks=reads_runs(case)) for case in CASES])
def test_resumed_run_ends_like_never_stopped_run(runs, case):
    final = checkpointing.checkpoint_name(MAX_STEPS)
    expected, meta = read_checkpoint(runs.straight(case) / final)
    got, resumed_meta = read_checkpoint(runs.resumed(case) / final)
    assert resumed_meta["global_step"] == meta["global_step"] == MAX_STEPS
    worst = max_weight_difference(expected, got)
    assert worst <= WEIGHT_ATOL, f"{case}: resumed weights differ from the never-stopped run by {worst}"
    # The step after the resume point moved weights far beyond that tolerance, so a step taken
    # on another batch, noise draw or learning rate could not pass.
    first_trained = read_checkpoint(runs.straight(case) / checkpointing.checkpoint_name(RESUME_STEP))[0]
    moved = max_weight_difference(first_trained, expected)
    assert moved > 100 * WEIGHT_ATOL, f"{case}: the step after the resume point moved weights by {moved} only"

    # The data position: every rank's loader (and each of its workers) stands exactly where the
    # never-stopped run's does, one batch per optimizer step consumed, none skipped or repeated.
    positions, resumed_positions = loader_positions(meta), loader_positions(resumed_meta)
    assert sorted(positions) == [0, 1]
    assert resumed_positions == positions
    workers = 2 if "data.num_workers=2" in CASES[case][1] else 1
    for rank, position in positions.items():
        assert position["rank"] == rank and position["batches_done"] == MAX_STEPS
        assert position["num_workers"] == workers and sorted(position["workers"]) == list(range(workers))


@pytest.mark.slow
@reads_runs("zero2-2workers")
def test_zero2_ema_is_the_recurrence_resumes_exactly_and_is_exported(runs):
    """The zero2 case keeps an EMA (stage.ema.decay in resume_runs.CASES): rank 0 saves it whole,
    it follows the recurrence of the consolidated weights, survives the resume, and the resumed
    run's export holds it beside the raw weights."""
    from safetensors.torch import load_file

    case = "zero2-2workers"
    first = read_checkpoint(runs.straight(case) / checkpointing.checkpoint_name(RESUME_STEP))
    final = checkpointing.checkpoint_name(MAX_STEPS)
    weights, meta = read_checkpoint(runs.straight(case) / final)
    ema, resumed_ema = meta["ema"], read_checkpoint(runs.resumed(case) / final)[1]["ema"]
    decay = ema["config"]["decay"]
    assert ema["updates"] == MAX_STEPS and ema["config"]["start_step"] == 0
    # The first update copied step 1's weights, the second is one step of the recurrence.
    # (DeepSpeed's consolidation also returns buffers; the EMA holds the trainable weights only.)
    expected = {name: decay * first[0][name] + (1 - decay) * weights[name] for name in ema["weights"]}
    assert max_weight_difference(expected, ema["weights"]) <= WEIGHT_ATOL
    raw = {name: weights[name] for name in ema["weights"]}
    assert max_weight_difference(raw, ema["weights"]) > 100 * WEIGHT_ATOL  # not the raw weights
    assert max_weight_difference(ema["weights"], resumed_ema["weights"]) <= WEIGHT_ATOL
    export_dir = runs.resumed(case).parent / "export"
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["default_weights"] == "ema" and sorted(manifest["weights"]["ema"]) == manifest["components"]
    exported = {}
    for file in manifest["weights"]["ema"].values():
        exported |= {f"model.{name}": tensor for name, tensor in load_file(export_dir / file).items()}
    assert max_weight_difference(resumed_ema["weights"], exported) == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict but not in the checkpoint")
@reads_runs("zero2-2workers")
def test_zero2_shards_samples_export_and_stage2_start_from_it(runs, shards):
    case = "zero2-2workers"
    straight, resumed = runs.straight(case), runs.resumed(case)
    shard_files = sorted(p.name for p in (straight / checkpointing.checkpoint_name(RESUME_STEP) / "checkpoint").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shard_files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shard_files
    # Sample videos: each rank renders its share; rank 0 gathers them into one video (ranks stacked).
    samples = straight.parent / "samples"
    per_rank = [probe((samples / f"step{MAX_STEPS:07d}_rank{r}.mp4").read_bytes()) for r in (0, 1)]
    gathered = probe((samples / f"step{MAX_STEPS:07d}.mp4").read_bytes())
    assert gathered.height == 2 * per_rank[0].height and gathered.num_frames == per_rank[1].num_frames

    # The finished (resumed) stage exported itself (checkpoint.export_at_end): per-component
    # safetensors that a fresh model loads to exactly the trained weights.
    final = resumed / checkpointing.checkpoint_name(MAX_STEPS)
    got, meta = read_checkpoint(final)
    export_dir = resumed.parent / "export"
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["components"] == ["dynamics_adapter", "motion_modules", "pose_controlnet"]
    assert manifest["step"] == MAX_STEPS and manifest["source"] == str(final.resolve())
    model = build_model_from_hparams(meta["hyper_parameters"])
    assert load_components(model, export_dir) == manifest["components"]
    own = model.state_dict()
    for name, value in got.items():
        assert torch.equal(own[name.removeprefix("model.")], value), name

    # Stage 2 starts from that export by config alone: init.from_run=<stage-1 run id>.
    root = resumed.parent.parent
    stage2 = subprocess.run(
        [str(BIN / "xdyna-train"), *tiny_overrides(shards, root, "stage2", max_steps=1, strategy="auto"), "stage=stage2",
         "data.with_face=true", f"init.from_run={resumed.parent.name}"],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert stage2.returncode == 0, stage2.stderr[-4000:]
    assert f"init_from     dynamics_adapter, motion_modules, pose_controlnet from {export_dir.resolve()}" in stage2.stdout
    stage2_checkpoint = checkpointing.newest_complete_checkpoint(root / "stage2" / "checkpoints")
    # The stage-2 module rebuilt from its checkpoint (hyperparameters name the export) carries
    # stage 1's weights in the components it keeps frozen, and its own trained S-Face ControlNet.
    stage2_module = XDynaTrainingModule.load_from_checkpoint(stage2_checkpoint, map_location="cpu")
    assert stage2_module.trainable_components == ["face_controlnet"]
    stage2_state = stage2_module.state_dict()
    for name, value in got.items():
        assert torch.equal(stage2_state[name], value), f"stage 2 did not start from stage 1's {name}"


@pytest.mark.slow
@reads_runs("zero3", "ddp")
def test_zero3_export_holds_the_trained_weights(runs, tmp_path, capsys):
    """ZeRO-3 shards every trainable parameter across the ranks; an export gathers them. It must
    hold exactly what DeepSpeed's own reader gathers from the shards, and those must be the
    weights the DDP run of the same math trained (a plain file of whole tensors, no DeepSpeed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = checkpointing.checkpoint_name(MAX_STEPS)
    zero3 = runs.straight("zero3")
    ddp, ddp_meta = read_checkpoint(runs.straight("ddp") / final)
    # Really sharded: each rank's fp32 partition holds half of every trainable tensor (ZeRO-3 pads
    # a tensor of odd size by one element), so no single file holds the weights.
    numel = sum(v.numel() for v in ddp.values())
    for rank in (0, 1):
        shard = torch.load(zero3 / final / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           map_location="cpu", weights_only=False)
        held = sum(t.numel() for t in shard["optimizer_state_dict"]["fp32_flat_groups"])
        assert numel <= 2 * held <= numel + len(ddp), (rank, held, numel)

    # xdyna-export on the run's `latest` pointer, and the export the resumed run wrote itself at
    # the end of its stage (checkpoint.export_at_end).
    assert xdyna_export([str(zero3 / checkpointing.LATEST_POINTER), str(tmp_path / "export")]) == 0
    assert f"exported step {MAX_STEPS} of {zero3 / final}" in capsys.readouterr().out
    resumed = runs.resumed("zero3")
    for export_dir, source in ((tmp_path / "export", zero3 / final), (resumed.parent / "export", resumed / final)):
        manifest = json.loads((export_dir / "export.json").read_text())
        assert manifest["step"] == MAX_STEPS and manifest["source"] == str(source.resolve())
        model = build_model_from_hparams(ddp_meta["hyper_parameters"])
        assert load_components(model, export_dir) == manifest["components"]
        own = model.state_dict()
        gathered = get_fp32_state_dict_from_zero_checkpoint(str(source), tag="checkpoint")
        trained = {name.removeprefix("_forward_module."): value for name, value in gathered.items()}
        assert set(ddp) <= set(trained)
        for name in ddp:
            assert torch.equal(own[name.removeprefix("model.")], trained[name]), f"{export_dir}: {name}"
        worst = max_weight_difference(ddp, {name: trained[name] for name in ddp})
        assert worst <= CROSS_STRATEGY_ATOL, f"ZeRO-3's weights differ from the DDP run's by {worst}"
