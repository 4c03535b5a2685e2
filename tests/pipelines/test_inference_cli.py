"""``xdyna-animate`` end to end on the tiny model: files, sizes, fps, previews, one-line errors,
and the real example of ../shared when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datapipes.video import probe
from xdyna.pipelines.cli import main

SHARED_EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "xdyna_examples"

TINY = ["--model", "tiny", "--steps", "1", "--device", "cpu", "--seed", "0"]


def video_info(path):
    return probe(path.read_bytes(), str(path))


def test_animate_writes_video_preview_and_contact_sheet(tmp_path, driving_files, capsys):
    out = tmp_path / "nested" / "dance.mp4"
    code = main([*TINY, "--reference", str(driving_files["reference"]), "--pose", str(driving_files["pose"]),
                 "--out", str(out), "--stride", "3", "--frames", "5", "--height", "64", "--width", "64"])
    assert code == 0, capsys.readouterr().err
    info = video_info(out)
    assert (info.num_frames, info.height, info.width) == (5, 64, 64)
    assert info.fps == pytest.approx(8.0 / 3, rel=0.01)  # driving fps / stride by default
    preview = video_info(out.with_suffix(".preview.mp4"))
    assert (preview.num_frames, preview.height, preview.width) == (5, 64, 3 * 64)
    sheet = np.asarray(Image.open(out.with_suffix(".contact.png")))
    assert sheet.shape[0] == 64 and sheet.shape[1] >= 5 * 3 * 64
    printed = capsys.readouterr().out
    assert "seconds_per_frame" in printed


def test_fps_option_sets_the_output_rate(tmp_path, driving_files):
    out = tmp_path / "fast.mp4"
    assert main([*TINY, "--reference", str(driving_files["wide_reference"]), "--pose", str(driving_files["pose"]),
                 "--out", str(out), "--frames", "3", "--fps", "15", "--no-preview", "--height", "64", "--width", "64"]) == 0
    info = video_info(out)
    assert info.num_frames == 3 and info.fps == pytest.approx(15, rel=0.01)
    assert not out.with_suffix(".preview.mp4").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("pose_folder", "is a folder"),
        ("pose_garbage", "not a readable video"),
        ("reference_missing", "does not exist"),
        ("pretrained_file", "is a file"),
        ("no_weights", "no weights"),
        ("out_folder", "is a folder"),
        ("black_pose", "no skeleton"),
        ("align_without_body", "--align needs"),
        ("dwpose_without_model", "needs --pose-model"),
        ("dwpose_missing_model", "DWPose model"),
    ],
)
def test_input_errors_are_one_line_and_exit_2(tmp_path, driving_files, capsys, case, expected):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 512)
    args = {"--reference": str(driving_files["reference"]), "--pose": str(driving_files["pose"]), "--out": str(tmp_path / "o.mp4")}
    weights = list(TINY)
    extra: list[str] = []
    if case == "pose_folder":
        args["--pose"] = str(tmp_path)
    elif case == "pose_garbage":
        args["--pose"] = str(garbage)
    elif case == "reference_missing":
        args["--reference"] = str(tmp_path / "nobody.png")
    elif case == "pretrained_file":
        weights = ["--pretrained", str(driving_files["reference"]), "--device", "cpu"]
    elif case == "no_weights":
        weights = ["--device", "cpu"]
    elif case == "out_folder":
        args["--out"] = str(tmp_path)
    elif case == "black_pose":
        args["--pose"] = str(driving_files["black_pose"])
    elif case == "align_without_body":
        extra = ["--align"]
    elif case == "dwpose_without_model":
        extra = ["--pose-estimator", "dwpose"]
    elif case == "dwpose_missing_model":
        extra = ["--pose-estimator", "dwpose", "--pose-model", str(tmp_path / "dw-ll_ucoco_384.onnx")]
    argv = [*weights, *extra, *(item for pair in args.items() for item in pair)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xdyna-animate: error:") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.shared
def test_shared_example_1_animates_with_the_tiny_model(tmp_path, capsys):
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip(f"shared example data not present at {SHARED_EXAMPLES}")
    out = tmp_path / "example_1.mp4"
    code = main([*TINY, "--reference", str(SHARED_EXAMPLES / "example_1_reference.png"),
                 "--pose", str(SHARED_EXAMPLES / "example_1_pose.mp4"), "--out", str(out), "--frames", "6", "--stride", "2"])
    assert code == 0, capsys.readouterr().err
    info = video_info(out)
    assert (info.num_frames, info.height, info.width) == (6, 128, 64)  # the tiny flavour's native size
    assert info.fps == pytest.approx(8.0 / 2, rel=0.01)  # the example runs at 8 fps
    preview = video_info(out.with_suffix(".preview.mp4"))
    assert preview.width == 3 * 64 and preview.num_frames == 6
    # The pose panel carries the example's skeleton (not a blank or failed decode).
    middle = np.asarray(Image.open(out.with_suffix(".contact.png")))[:, 64:128]
    assert middle.max() > 100
