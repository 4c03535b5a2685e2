"""XDynaPipeline: save/load of every component, training checkpoints, refused inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xdyna.models import ModelConfig, build_model
from xdyna.pipelines import InputError, PipelineFormatError, XDynaPipeline
from xdyna.pipelines.pipeline import PIPELINE_FILE, WEIGHTS_FILE

SIZE = (64, 64)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.rand(3, *SIZE, generator=g) * 2 - 1, torch.rand(3, 3, *SIZE, generator=g)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("pipe") / "xdyna-tiny"
    tiny_pipeline.save_pretrained(folder)
    return folder


def test_save_and_load_give_the_same_video(saved, tiny_pipeline, inputs):
    assert {p.name for p in saved.iterdir()} >= {"unet", "vae", "pose_controlnet", "face_controlnet", "scheduler", PIPELINE_FILE}
    loaded = XDynaPipeline.from_pretrained(saved)
    for name, module in tiny_pipeline.components().items():
        theirs = loaded.components()[name].state_dict()
        assert all(torch.equal(tensor, theirs[key]) for key, tensor in module.state_dict().items()), name
    reference, pose = inputs
    a = tiny_pipeline(reference, pose, num_inference_steps=1, seed=3)
    b = loaded(reference, pose, num_inference_steps=1, seed=3)
    np.testing.assert_array_equal(a.frames, b.frames)


def test_pretrained_must_be_a_complete_pipeline_folder(saved, tmp_path):
    with pytest.raises(PipelineFormatError, match="is a file"):
        XDynaPipeline.from_pretrained(saved / PIPELINE_FILE)
    with pytest.raises(PipelineFormatError, match="does not exist"):
        XDynaPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(PipelineFormatError, match=f"lacks {PIPELINE_FILE}"):
        XDynaPipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / PIPELINE_FILE).write_text((saved / PIPELINE_FILE).read_text())
    with pytest.raises(PipelineFormatError, match=f"lacks unet/{WEIGHTS_FILE}"):
        XDynaPipeline.from_pretrained(broken)
    # A component from another architecture is refused, not partly loaded.
    manifest = json.loads((saved / PIPELINE_FILE).read_text())
    manifest["model_config"]["face"] = "none"
    (broken / PIPELINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PipelineFormatError, match="components"):
        XDynaPipeline.from_pretrained(broken)


def fake_training_checkpoint(path, model, components):
    """What xdyna-train writes: the trainable weights under ``model.`` and the model config in
    Lightning's hyper-parameters (an AttributeDict)."""
    from lightning.fabric.utilities.data import AttributeDict

    state = {f"model.{name}": param.detach().clone() for component in components
             for name, param in model.component_parameters()[component]}
    torch.save({"state_dict": state, "hyper_parameters": AttributeDict(model={"flavour": "tiny"}, stage={}),
                "xdyna": {"trainable_components": list(components)}}, path)


def test_training_checkpoints_load_in_order(tmp_path, tiny_pipeline):
    stage1, stage2 = tmp_path / "stage1.ckpt", tmp_path / "stage2.ckpt"
    fake_training_checkpoint(stage1, tiny_pipeline.model, ["dynamics_adapter", "motion_modules", "pose_controlnet"])
    fake_training_checkpoint(stage2, tiny_pipeline.model, ["face_controlnet"])
    loaded = XDynaPipeline.from_checkpoints([stage1, stage2])
    fresh = build_model(ModelConfig())
    ours, theirs, untouched = tiny_pipeline.model.state_dict(), loaded.model.state_dict(), fresh.state_dict()
    trained = [n for ps in tiny_pipeline.model.component_parameters().values() for n, _ in ps]
    assert all(torch.equal(ours[n], theirs[n]) for n in trained)
    assert any(not torch.equal(untouched[n], theirs[n]) for n in trained)  # the checkpoints did change the weights


def test_bad_checkpoints_are_refused(tmp_path, tiny_pipeline):
    with pytest.raises(InputError, match="is a folder"):
        XDynaPipeline.from_checkpoints([tmp_path])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineFormatError, match="not a readable torch checkpoint"):
        XDynaPipeline.from_checkpoints([garbage])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.unet.nonexistent.weight": torch.zeros(2)}, "hyper_parameters": {"model": {"flavour": "tiny"}}}, foreign)
    with pytest.raises(PipelineFormatError, match="unknown weight"):
        XDynaPipeline.from_checkpoints([foreign])
    no_config = tmp_path / "no_config.ckpt"
    torch.save({"state_dict": {}}, no_config)
    with pytest.raises(PipelineFormatError, match="no model config"):
        XDynaPipeline.from_checkpoints([no_config])


def test_inputs_are_checked(tiny_pipeline, inputs):
    reference, pose = inputs
    with pytest.raises(InputError, match="multiple of 64"):
        tiny_pipeline(reference[:, :48], pose[..., :48, :], num_inference_steps=1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        tiny_pipeline(reference, pose * 2 - 1, num_inference_steps=1)
    with pytest.raises(InputError, match="face maps"):
        tiny_pipeline(reference, pose, torch.zeros(2, 6, *SIZE), num_inference_steps=1)
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        XDynaPipeline.from_config({"flavour": "tiny"}, dtype="fp16")
