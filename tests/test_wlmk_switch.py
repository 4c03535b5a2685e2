"""The w/lmk ablation is one switch: the model and data halves are checked together before a run
starts, and at inference a w/lmk model gets the driving face's landmarks drawn into its pose."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from datapipes.face import FaceFrame
from datapipes.video import encode_mp4
from xdyna.errors import ConfigError
from xdyna.pipelines.driving import prepare_driving
from xdyna.train import config_rules
from xdyna.train.cli import CONF_DIR, run_training

SIZE = (64, 64)
# Five landmarks (eyes, nose, mouth corners) of the face the stand-in detector finds, in pixels
# of the 64x64 driving video (= output pixels: no resize), away from the skeleton's limb.
LANDMARKS = np.array([[20.0, 12.0], [30.0, 12.0], [25.0, 16.0], [21.0, 20.0], [29.0, 20.0]])


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("overrides, broken", [
    ([], False),
    (["experiment=w_lmk"], False),
    (["model/face=landmarks_in_pose"], True),  # trained wo/face under the w/lmk name before
    (["data.face_landmarks_in_pose=true"], True),
    (["model/face=none", "data.face_landmarks_in_pose=true"], True),
])
def test_wlmk_halves_are_checked_together(overrides, broken, monkeypatch):
    monkeypatch.setenv("XDYNA_RUN_ID", "wlmk-test")
    found = config_rules.violations(compose_train(overrides), config_rules.CONFIG_RULES)
    ours = [line for line in found if "face_landmarks_in_pose" in line]
    assert len(ours) == int(broken)
    if broken:
        assert "model.face" in ours[0] and "data.face_landmarks_in_pose" in ours[0] and "experiment=w_lmk" in ours[0]
        assert "\n" not in ours[0]


def test_training_refuses_half_a_wlmk_switch_before_building_anything(monkeypatch, tmp_path):
    monkeypatch.setenv("XDYNA_RUN_ID", "wlmk-test")
    cfg = compose_train(["model/face=landmarks_in_pose", "logger=none", f"run.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.face=landmarks_in_pose .*needs data\.face_landmarks_in_pose=true"):
        run_training(cfg)
    assert not (tmp_path / "wlmk-test").exists()  # stopped before the run directory was made


class FixedFace:
    """A landmark model (``--face-detector tests.test_wlmk_switch:FixedFace``) finding one face in every frame."""

    def __call__(self, frames: np.ndarray):
        return [FaceFrame((16.0, 8.0, 34.0, 24.0), LANDMARKS.copy()) for _ in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wlmk")
    pose = np.zeros((6, *SIZE, 3), dtype=np.uint8)
    pose[:, 30:60, 40:44] = (255, 85, 0)  # a limb, so the pose is not blank
    driving = np.full((6, *SIZE, 3), 90, dtype=np.uint8)
    (folder / "pose.mp4").write_bytes(encode_mp4(pose, 8.0, crf=0))
    (folder / "driving.mp4").write_bytes(encode_mp4(driving, 8.0, crf=0))
    Image.fromarray(driving[0]).save(folder / "reference.png")
    return folder


def landmark_brightness(pose: torch.Tensor) -> torch.Tensor:
    """Per frame: the darkest landmark pixel of ``pose (F, 3, H, W)`` (all white where drawn)."""
    columns, rows = LANDMARKS[:, 0].astype(int), LANDMARKS[:, 1].astype(int)
    return pose[:, :, rows, columns].amin(dim=(1, 2))


def test_wlmk_pose_images_carry_the_landmarks(videos):
    common = dict(pose_video=videos / "pose.mp4", face_video=videos / "driving.mp4", face_model=FixedFace())
    wlmk = prepare_driving(SIZE, face_landmarks_in_pose=True, **common)
    sface = prepare_driving(SIZE, **common)
    assert wlmk.face is None and sface.face is not None
    assert bool((landmark_brightness(wlmk.pose) > 0.9).all())
    assert bool((landmark_brightness(sface.pose) < 0.1).all())
    limb = (slice(None), slice(None), slice(30, 60), slice(40, 44))
    assert torch.allclose(wlmk.pose[limb], sface.pose[limb])  # the skeleton itself is untouched


class Prepared(Exception):
    """Stops xdyna-animate once its driving signals are prepared (sampling is tested elsewhere)."""


def test_animate_draws_the_landmarks_for_a_wlmk_model(videos, tmp_path, monkeypatch):
    """xdyna-animate with a w/lmk model config prepares pose images with the landmarks."""
    from xdyna.pipelines import cli, driving

    (tmp_path / "wlmk.yaml").write_text("flavour: tiny\nface: landmarks_in_pose\n")
    original = driving.prepare_driving

    def prepare_and_stop(*args, **kwargs):
        raise Prepared(original(*args, **kwargs))

    monkeypatch.setattr(driving, "prepare_driving", prepare_and_stop)
    with pytest.raises(Prepared) as stopped:
        cli.main(["--model", str(tmp_path / "wlmk.yaml"), "--reference", str(videos / "reference.png"),
                  "--pose", str(videos / "pose.mp4"), "--face", str(videos / "driving.mp4"),
                  "--face-detector", "tests.test_wlmk_switch:FixedFace", "--steps", "1", "--frames", "2", "--stride", "1",
                  "--height", "64", "--width", "64", "--device", "cpu", "--no-preview", "--out", str(tmp_path / "out.mp4")])
    signals = stopped.value.args[0]
    assert signals.face is None and len(signals) == 2
    assert bool((landmark_brightness(signals.pose) > 0.9).all())
