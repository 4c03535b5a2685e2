"""Files published through a temporary file (exports, pipelines, component files, animations)
get the mode the umask gives a plain ``open()``, not the temporary file's 0600: safetensors
itself writes through a ``NamedTempFile``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from xdyna.models import ModelConfig, build_model

COMPONENTS = ["dynamics_adapter", "motion_modules", "pose_controlnet"]


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig())


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_export_run_files_follow_the_umask(tmp_path, tiny_model, umask):
    from xdyna.train.export import export_run

    state = {f"model.{name}": param.detach().clone() for component in COMPONENTS
             for name, param in tiny_model.component_parameters()[component]}
    checkpoint = tmp_path / "step=000001.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"flavour": "tiny"}, "stage": {}}, "global_step": 1}, checkpoint)
    export = export_run(tmp_path / "run", checkpoint, model=tiny_model)
    found = modes(export)
    assert set(found) == {f"{c}.safetensors" for c in COMPONENTS} | {"export.json", "provenance.json"}
    assert set(found.values()) == {0o666 & ~umask}, found


def test_pipeline_component_and_animation_files_follow_the_umask(tmp_path, tiny_model, umask):
    from xdyna.models import save_component_safetensors
    from xdyna.pipelines import XDynaPipeline
    from xdyna.pipelines.preview import write_animation

    expected = 0o666 & ~umask
    XDynaPipeline(tiny_model).save_pretrained(tmp_path / "pipe")
    assert set(modes(tmp_path / "pipe").values()) == {expected}
    save_component_safetensors(tiny_model, "pose_controlnet", tmp_path / "pose_controlnet.safetensors")
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    write_animation(tmp_path / "anim" / "a.mp4", frames, 4.0, frames[0], frames)
    for path in (tmp_path / "pose_controlnet.safetensors", *sorted((tmp_path / "anim").iterdir())):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert not [p for p in tmp_path.rglob(".*partial*")]  # no temporary file left behind
