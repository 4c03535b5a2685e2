"""``xdyna-animate`` says where its weights came from when the export records it (xdyna.provenance)."""

from __future__ import annotations

import torch

from xdyna import provenance
from xdyna.pipelines.cli import main

STAGE1 = ["dynamics_adapter", "motion_modules", "pose_controlnet"]


def test_animate_prints_the_provenance_of_an_export(tmp_path, tiny_pipeline, driving_files, capsys):
    from xdyna.train.export import export_run

    weights = tmp_path / "mm_sd_v15.ckpt"
    weights.write_bytes(b"motion module weights")
    record = provenance.with_run_state(
        {"git": {"commit": "0123abcd" * 5, "dirty": False}, "pretrained": provenance.pretrained_sources({"motion_module": str(weights)})},
        step=7, world_size=1,
        resume_chain=[provenance.resume_entry("runs/r/checkpoints/step=000004.ckpt", 4, 1, 2, "4242")])
    model = tiny_pipeline.model
    state = {f"model.{name}": param.detach().clone() for component in STAGE1
             for name, param in model.component_parameters()[component]}
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "step=000007.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"flavour": "tiny"}, "stage": {}}, "global_step": 7,
                provenance.CHECKPOINT_KEY: record}, checkpoint)
    export_run(run_dir, checkpoint, model=model)

    code = main(["--pretrained", str(run_dir), "--steps", "1", "--device", "cpu", "--reference", str(driving_files["reference"]),
                 "--pose", str(driving_files["pose"]), "--out", str(tmp_path / "out.mp4"), "--frames", "2", "--height", "64",
                 "--width", "64", "--no-preview"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    block = printed[printed.index("weights from:"):].splitlines()[:4]
    assert block[0] == f"weights from: commit {'0123abcd' * 5}"
    assert block[1] == f"  step 7 on 1 rank(s), checkpoint {checkpoint.resolve()}"
    assert block[2] == "  resumed: step 4 (2->1 ranks, job 4242)"
    digest = provenance.file_sha256(weights)[:16]
    assert block[3] == f"  pretrained motion_module: {weights.resolve()} (sha256 {digest})"
