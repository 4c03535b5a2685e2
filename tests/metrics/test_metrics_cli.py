import json
import shutil

import numpy as np
import pytest
import torch

from datapipes.video import encode_mp4
from xdyna.metrics.cli import main
from xdyna.metrics.validation import validation_metrics

# disco_lpips is checked against torchmetrics in the fidelity tests, and FG/BG go through one
# region parameter for every backbone (exercised here with the cheap tiny I3D): leaving out
# disco_lpips and fg_/bg_fid only saves CPU time on this 2-core machine.
VIDEO_METRICS = "l1,psnr,ssim,lpips,disco_l1,disco_psnr,disco_ssim,fid,fvd,dtfvd,fg_dtfvd,bg_dtfvd,cd_fvd"


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished_run(eval_folders, tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["--pred", str(eval_folders["pred"]), "--gt", str(eval_folders["gt"]), "--masks", str(eval_folders["masks"]),
                 "--metrics", VIDEO_METRICS, "--weights", str(tiny_manifest), "--clip-frames", "4", "--bootstrap", "5",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_run_writes_json_markdown_and_plot(finished_run):
    report = json.loads((finished_run / "metrics.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"l1", "psnr", "ssim", "lpips", "disco_l1", "disco_psnr", "disco_ssim", "fid",
                            "fvd", "dtfvd", "fg_dtfvd", "bg_dtfvd", "cd_fvd"}
    assert metrics["psnr"]["frames"] == 24 and 15 < metrics["psnr"]["mean"] < 40
    assert metrics["fid"]["n_pred"] == 24 and metrics["dtfvd"]["n_pred"] == 6  # 3 videos x 2 clips of 4 frames
    for name in ("fid", "dtfvd", "fg_dtfvd", "bg_dtfvd", "fvd", "cd_fvd"):
        assert metrics[name]["value"] >= 0 and len(metrics[name]["ci"]) == 2
    # FG and BG see different pixels, so their distances differ from each other and from the full frame
    assert len({metrics["dtfvd"]["value"], metrics["fg_dtfvd"]["value"], metrics["bg_dtfvd"]["value"]}) == 3
    assert metrics["fg_dtfvd"]["region"] == "fg" and report["protocol"]["masks"] == "mask videos"
    assert set(report["weights"]) == {"inception_fid", "i3d_kinetics", "i3d_dtdb", "videomae_v2", "vgg16_imagenet"}
    assert set(report["per_video"]) == {"clip0", "clip1", "clip2"}
    table = (finished_run / "metrics.md").read_text()
    assert "| fg_dtfvd ↓ |" in table and "N pred 6" in table
    assert (finished_run / "metrics.png").stat().st_size > 1000


def test_compare_prints_both_runs_side_by_side(finished_run, tmp_path, capsys):
    report = json.loads((finished_run / "metrics.json").read_text())
    report["metrics"]["psnr"]["mean"] += 1.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    code, out, _ = _run(["--compare", str(finished_run / "metrics.json"), str(other)], capsys)
    assert code == 0
    psnr_row = next(line for line in out.splitlines() if line.startswith("| psnr |"))
    assert psnr_row.endswith("| 1 |") and "*" in psnr_row.split("|")[3]  # b is better and marked


def _error_of(argv, capsys):
    code, _, err = _run(argv + ["--quiet", "--metrics", "psnr"], capsys)
    assert code == 2
    return err


def test_mismatched_frame_counts_and_sizes_are_clear_errors(eval_folders, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(eval_folders["pred"], pred)
    short = np.zeros((5, 96, 64, 3), np.uint8)
    (pred / "clip1.mp4").write_bytes(encode_mp4(short, 8))
    err = _error_of(["--pred", str(pred), "--gt", str(eval_folders["gt"]), "--out", str(tmp_path / "o")], capsys)
    assert "'clip1': prediction has 5 frames, ground truth 8" in err
    (pred / "clip1.mp4").write_bytes(encode_mp4(np.zeros((8, 64, 64, 3), np.uint8), 8))
    err = _error_of(["--pred", str(pred), "--gt", str(eval_folders["gt"]), "--out", str(tmp_path / "o")], capsys)
    assert "'clip1': prediction is 64x64, ground truth 96x64" in err


def test_empty_folder_unreadable_video_and_unmatched_names(eval_folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "--pred folder" in _error_of(["--pred", str(empty), "--gt", str(eval_folders["gt"])], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "clip0.mp4").write_bytes(b"not an mp4 at all")
    err = _error_of(["--pred", str(broken), "--gt", str(eval_folders["gt"])], capsys)
    assert "cannot read video" in err and "clip0.mp4" in err
    (broken / "clip0.mp4").unlink()
    (broken / "stranger.mp4").write_bytes(encode_mp4(np.zeros((8, 96, 64, 3), np.uint8), 8))
    assert "no ground truth" in _error_of(["--pred", str(broken), "--gt", str(eval_folders["gt"])], capsys)


def test_missing_weights_is_a_clear_error(eval_folders, tmp_path, capsys):
    code, _, err = _run(["--pred", str(eval_folders["pred"]), "--gt", str(eval_folders["gt"]), "--metrics", "dtfvd",
                         "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 2 and "'i3d_dtdb'" in err and "I3D_16.pth.tar" in err


def test_frame_folders_work_like_videos(eval_folders, tmp_path, tiny_manifest, capsys):
    from PIL import Image

    from xdyna.metrics.sources import VideoSource

    frames_dir = tmp_path / "pred" / "clip0"
    frames_dir.mkdir(parents=True)
    video = VideoSource(eval_folders["pred"] / "clip0.mp4").read(0, 8)
    for index, frame in enumerate(video.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(frame).save(frames_dir / f"{index:04d}.png")
    code, out, _ = _run(["--pred", str(tmp_path / "pred"), "--gt", str(eval_folders["gt"]), "--metrics", "psnr,l1",
                         "--quiet", "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["metrics"]["psnr"]["frames"] == 8


def test_two_files_without_weights_compute_what_needs_none_and_name_the_rest(eval_folders, tmp_path, capsys):
    """The first thing a user tries: one prediction, one ground truth, no flags."""
    code, out, err = _run(["--pred", str(eval_folders["pred"] / "clip0.mp4"), "--gt", str(eval_folders["gt"] / "clip0.mp4"),
                           "--quiet", "--out", str(tmp_path / "eval")], capsys)
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 1 and "skipped lpips (needs weights manifest entry 'vgg16_imagenet')" in notes[0]
    assert "--weights" in notes[0]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"l1", "psnr", "ssim", "face_det"}
    assert report["skipped"] == {"lpips": ["weights manifest entry 'vgg16_imagenet'"]}
    assert report["metrics"]["psnr"]["frames"] == 8 and set(report["per_video"]) == {"clip0"}
    assert "Skipped: lpips" in out


def test_face_metrics_without_facenet_are_skipped_by_default_and_refused_by_name(eval_folders, tmp_path, capsys, monkeypatch):
    import xdyna.metrics.runner as runner

    monkeypatch.setattr(runner, "_package_available", lambda name: name != "facenet_pytorch")
    pair = ["--pred", str(eval_folders["pred"] / "clip0.mp4"), "--gt", str(eval_folders["gt"] / "clip0.mp4"), "--quiet"]
    code, _, err = _run([*pair, "--out", str(tmp_path / "eval")], capsys)
    assert code == 0 and "face_det (needs the facenet-pytorch package (pip install" in err
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]) == {"l1", "psnr", "ssim"}
    code, _, err = _run([*pair, "--metrics", "face_det", "--out", str(tmp_path / "eval2")], capsys)
    assert code == 2 and "--metrics face_det needs the facenet-pytorch package" in err


def test_default_metrics_with_a_manifest_include_lpips(eval_folders, tiny_manifest, tmp_path, capsys):
    code, _, err = _run(["--pred", str(eval_folders["pred"] / "clip1.mp4"), "--gt", str(eval_folders["gt"] / "clip1.mp4"),
                         "--weights", str(tiny_manifest), "--quiet", "--out", str(tmp_path / "eval")], capsys)
    assert code == 0 and "skipped" not in err
    assert "lpips" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"--clip-frames": "0"}, "--clip-frames"),
        ({"--max-frames": "0"}, "--max-frames"),
        ({"--bootstrap": "-1"}, "--bootstrap"),
        ({"--pred": "nowhere.mp4"}, "--pred"),
        ({"--gt": "FOLDER"}, "--gt must both be"),
        ({"--metrics": "psnr,bogus"}, "--metrics"),
        ({"--metrics": "lpips"}, "--metrics lpips needs weights manifest entry 'vgg16_imagenet'"),
        ({"--metrics": "fg_fid"}, "--metrics fg_fid needs"),
        ({"--weights": "missing.json"}, "--weights"),
        ({"--device": "tpu"}, "--device"),
        ({"--clip-frames": "many"}, "--clip-frames"),  # argparse's own error, also one line
    ],
)
def test_argument_errors_are_one_line_naming_the_flag(eval_folders, tmp_path, capsys, monkeypatch, change, flag):
    import xdyna.metrics.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("videos were read before the arguments were checked")

    monkeypatch.setattr(cli, "pair_videos", refuse)
    args = {"--pred": str(eval_folders["pred"] / "clip0.mp4"), "--gt": str(eval_folders["gt"] / "clip0.mp4"),
            "--out": str(tmp_path / "o")}
    args.update({k: str(eval_folders["gt"]) if v == "FOLDER" else str(tmp_path / v) if v.endswith((".mp4", ".json")) else v
                 for k, v in change.items()})
    try:
        code = main([*(item for pair in args.items() for item in pair), "--quiet"])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xdyna-eval: error:") and flag in err[0], err


def test_debug_shows_the_traceback(eval_folders):
    from xdyna.metrics.sources import EvalInputError

    with pytest.raises(EvalInputError, match="--clip-frames"):
        main(["--pred", str(eval_folders["pred"]), "--gt", str(eval_folders["gt"]), "--clip-frames", "0", "--debug"])


def test_a_driving_video_as_ground_truth_points_to_save_ground_truth(eval_folders, tmp_path, capsys):
    driving = tmp_path / "driving.mp4"
    driving.write_bytes(encode_mp4(np.zeros((12, 128, 96, 3), np.uint8), 8))
    code, _, err = _run(["--pred", str(eval_folders["pred"] / "clip0.mp4"), "--gt", str(driving), "--metrics", "psnr",
                         "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--save-ground-truth" in err


def test_validation_metrics_on_training_tensors():
    generator = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 3, 32, 32, generator=generator) * 2 - 1
    pred = (gt + 0.05 * torch.randn(gt.shape, generator=generator)).clamp(-1, 1)
    values = validation_metrics(pred, gt)
    assert set(values) == {"val/psnr", "val/ssim"}
    assert 25 < values["val/psnr"] < 40 and 0.5 < values["val/ssim"] < 1
    with pytest.raises(ValueError, match="one shape"):
        validation_metrics(pred, gt[:, :2])
