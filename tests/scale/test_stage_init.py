"""init.from_run / init.components_dir resolve to an export's component files, or fail in one line."""

from __future__ import annotations

import json

import pytest

from xdyna.train.export import EXPORT_MANIFEST, EXPORT_SUBDIR, ExportError, init_component_files


def fake_export(directory, components):
    directory.mkdir(parents=True)
    (directory / EXPORT_MANIFEST).write_text(json.dumps({"components": components}))
    return directory


def test_from_run_id_and_components_dir_name_the_same_files(tmp_path):
    export = fake_export(tmp_path / "s1" / EXPORT_SUBDIR, ["motion_modules", "pose_controlnet"])
    by_run = init_component_files({"from_run": "s1"}, tmp_path)
    assert by_run == {c: str(export / f"{c}.safetensors") for c in ("motion_modules", "pose_controlnet")}
    assert init_component_files({"components_dir": str(export)}, tmp_path / "elsewhere") == by_run
    assert init_component_files({"from_run": str(tmp_path / "s1"), "components": ["pose_controlnet"]}, "/nowhere") == {
        "pose_controlnet": str(export / "pose_controlnet.safetensors")}
    assert init_component_files({"from_run": None, "components_dir": None}, tmp_path) == {}


def test_unusable_init_settings_say_what_to_do(tmp_path):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"holds no export .* xdyna-export .*unfinished/checkpoints"):
        init_component_files({"from_run": "unfinished"}, tmp_path)
    with pytest.raises(ExportError, match="no run directory"):
        init_component_files({"from_run": "typo"}, tmp_path)
    with pytest.raises(ExportError, match="not both"):
        init_component_files({"from_run": "a", "components_dir": "b"}, tmp_path)
    fake_export(tmp_path / "e", ["pose_controlnet"])
    with pytest.raises(ExportError, match=r"has no \['face_controlnet'\]"):
        init_component_files({"components_dir": str(tmp_path / "e"), "components": ["face_controlnet"]}, tmp_path)
