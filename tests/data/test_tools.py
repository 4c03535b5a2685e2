"""The xdyna-data command: synth, pack (with quarantine), inspect, and the load round trip."""
import json
import os

import numpy as np

from datapipes import shards
from datapipes.loader import build_clip_loader
from datapipes.synthetic import human_clip
from datapipes.video import encode_mp4
from tests.data.conftest import loader_config
from tools.xdyna_data import main


def test_synth_writes_mixed_shards_deterministically(tmp_path, capsys):
    args = ["--human", "3", "--scene", "2", "--frames", "6", "--height", "64", "--width", "32", "--shard-size", "2"]
    assert main(["synth", "--out", str(tmp_path / "a"), *args]) == 0
    assert "3 human + 2 scene" in capsys.readouterr().out
    assert main(["synth", "--out", str(tmp_path / "b"), *args]) == 0
    first, second = (sorted(os.listdir(tmp_path / d)) for d in "ab")
    assert first == second == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    reader = shards.TarSampleReader(shards.expand_shard_urls(str(tmp_path / "a")))
    samples = [s for i in range(3) for s in reader.iter_shard(i)]
    kinds = {s.key: s.meta()["kind"] for s in samples}
    assert sorted(kinds.values()) == ["human"] * 3 + ["scene"] * 2
    for sample in samples:
        expected = {"mp4", "json"} | ({"pose.mp4", "pose.json", "face.json"} if kinds[sample.key] == "human" else set())
        assert set(sample.members) == expected
    # refuses to mix into an existing shard set
    assert main(["synth", "--out", str(tmp_path / "a"), *args]) == 2
    assert "already holds" in capsys.readouterr().err


def test_synthetic_person_moves_and_its_skeleton_matches():
    clip = human_clip(seed=3, frames=8, height=128, width=64)
    assert clip["video"].shape == (8, 128, 64, 3) and clip["pose"].shape == (8, 128, 64, 3)
    wrists = clip["keypoints"][:, [4, 7], :2]
    assert np.ptp(wrists, axis=0).max() > 3                  # limbs move over time
    for t in (0, 7):
        x, y = clip["keypoints"][t, 10, :2].round().astype(int)   # right ankle
        assert clip["pose"][t, y, x].max() > 0                     # skeleton drawn there
    assert clip["pose"][:, : int(clip["keypoints"][:, 1, 1].min()) - 3].max() == 0   # head-less


def _write_inputs(folder):
    """Good clips plus every kind of bad input; returns the bad ones with expected reasons."""
    folder.mkdir()
    for index in range(3):
        clip = human_clip(seed=index, frames=20, height=64, width=64)
        encoded = encode_mp4(clip["video"], 8)
        (folder / f"good{index}.mp4").write_bytes(encoded)
        (folder / f"good{index}.pose.mp4").write_bytes(encode_mp4(clip["pose"], 8))
    clip = human_clip(seed=9, frames=20, height=64, width=64)
    pose = encode_mp4(clip["pose"], 8)
    video = encode_mp4(clip["video"], 8)
    (folder / "truncated.mp4").write_bytes(video[: len(video) // 2])
    (folder / "truncated.pose.mp4").write_bytes(pose)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "zero.pose.mp4").write_bytes(pose)
    (folder / "text.mp4").write_bytes(b"this is not a video\n" * 50)
    (folder / "text.pose.mp4").write_bytes(pose)
    (folder / "mismatch.mp4").write_bytes(video)
    (folder / "mismatch.pose.mp4").write_bytes(encode_mp4(clip["pose"][:12], 8))
    short = human_clip(seed=10, frames=6, height=64, width=64)
    (folder / "short.mp4").write_bytes(encode_mp4(short["video"], 8))
    (folder / "short.pose.mp4").write_bytes(encode_mp4(short["pose"], 8))
    (folder / "nopose.mp4").write_bytes(video)
    return {"truncated": "cannot decode", "zero": "zero bytes", "text": "cannot decode",
            "mismatch": "frame-count mismatch", "short": "too short", "nopose": "no pose"}


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_pack_inspect_load_round_trip_with_quarantine(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    expected_rejects = _write_inputs(inputs)
    before = _snapshot(inputs)
    out = tmp_path / "packed"
    assert main(["pack", str(inputs), "--out", str(out), "--workers", "2", "--shard-size", "2",
                 "--min-frames", "16", "--license", "CC0-1.0"]) == 0
    printed = capsys.readouterr().out
    assert "packed 3 clip(s)" in printed and "rejected 6" in printed
    assert _snapshot(inputs) == before                      # sources never touched
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    reasons = {os.path.basename(entry["input"]["video"])[:-4]: entry["reason"] for entry in quarantine}
    assert reasons.keys() == expected_rejects.keys()
    for key, fragment in expected_rejects.items():
        assert fragment in reasons[key], (key, reasons[key])

    assert main(["inspect", str(out), "--json", "--verify", "full", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 3 and report["kinds"] == {"human": 3} and report["failures"] == []
    assert report["resolutions"] == {"64x64": 3} and report["frames"] == 60

    cfg = loader_config(str(out), resample=False, height=64, width=64, batch_size=1, num_frames=8, frame_stride=2)
    keys = sorted(k for batch in build_clip_loader(cfg, 0, 1) for k in batch["__key__"])
    assert keys == ["good0", "good1", "good2"]


def test_inspect_reports_a_corrupt_sample(tmp_path, capsys, portrait_shards):
    broken = tmp_path / "broken"
    broken.mkdir()
    sample = shards.TarSampleReader([shards.expand_shard_urls(portrait_shards)[0]]).read(0, 0)[0]
    members = dict(sample.members, mp4=sample.members["mp4"][:300])
    with shards.ShardSink(str(broken), "b") as sink:
        sink.write({"__key__": sample.key, **members})
    assert main(["inspect", str(broken), "--workers", "1"]) == 1
    assert f"{sample.key}" in capsys.readouterr().out


def test_pack_from_manifest_names_bad_lines(tmp_path, capsys):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"video": "a.mp4"}\n{"vid": "b.mp4"}\n')
    assert main(["pack", str(manifest), "--out", str(tmp_path / "o")]) == 2
    assert "list.jsonl:2" in capsys.readouterr().err


def test_pack_names_a_bad_face_detector_in_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"")
    for detector, fragment in (("retina", "unknown face detector 'retina'"),
                               ("datapipes.nothing:here", "cannot import 'datapipes.nothing'")):
        assert main(["pack", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--face-detector", detector]) == 2
        error = capsys.readouterr().err
        assert fragment in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


class _Killed(BaseException):
    """What the debug exit hook raises here instead of ``os._exit`` (which would end pytest)."""


def test_pack_parts_resume_after_a_kill_equals_a_single_pack(tmp_path, capsys, monkeypatch):
    import datapipes.parts as parts
    from tests.data.pack_inputs import packed_samples, write_manifest

    manifest = write_manifest(tmp_path / "in")
    common = ["--workers", "0", "--shard-size", "2", "--min-frames", "8"]
    assert main(["pack", manifest, "--out", str(tmp_path / "single"), *common]) == 0
    single = packed_samples(str(tmp_path / "single"))
    assert len(single) == 7
    out = tmp_path / "parts"
    args = ["pack", manifest, "--out", str(out), "--parts", "3", *common]

    def killed(code):
        raise _Killed(code)

    # part 1 dies right after its first shard, leaving that shard and its staging folder behind
    monkeypatch.setenv(parts.DEBUG_EXIT_ENV, "1:1")
    monkeypatch.setattr(parts.os, "_exit", killed)
    try:
        main([*args, "--part", "1"])
        raise AssertionError("part 1 was not killed")
    except _Killed:
        pass
    monkeypatch.delenv(parts.DEBUG_EXIT_ENV)
    assert os.listdir(out / ".parts") and not (out / "parts" / "part-00001.json").exists()
    # a kill between moving the shards and writing the record: a stray final-name shard of part 1
    (out / "shard-00001-000009.tar").write_bytes(b"stale")
    assert main([*args, "--part", "0"]) == 0
    assert "1 of 3 part(s) finished" in capsys.readouterr().out and not (out / "index.json").exists()
    assert main(["index", str(out)]) == 2 and "2 of 3 part(s) not finished: 1, 2" in capsys.readouterr().err
    # the array job of what is left: the user's command per task, without the job's own options
    assert main([*args, "--slurm", "--dry-run", "--slurm-gpus", "1", "--slurm-setup", "module load x"]) == 0
    script = (out / "slurm" / "pack.sbatch").read_text()
    assert "#SBATCH --array=1-2\n" in script and "#SBATCH --gpus-per-task=1\n" in script and "module load x\n" in script
    assert script.splitlines()[-1].endswith(" ".join(args[1:]) + ' --part "$SLURM_ARRAY_TASK_ID"')
    assert main(args) == 0          # every part: 0 skipped, 1 redone from scratch, 2 packed
    printed = capsys.readouterr().out
    assert "part 0/3: already finished, skipped" in printed and "index" in printed
    assert not (out / "shard-00001-000009.tar").exists() and os.listdir(out / ".parts") == []
    index = json.loads((out / "index.json").read_text())
    assert packed_samples(str(out / "index.json")) == single == packed_samples(str(out))
    cfg = loader_config(str(out / "index.json"), resample=False, height=64, width=64, batch_size=1, num_frames=8)
    assert sorted(k for batch in build_clip_loader(cfg, 0, 1) for k in batch["__key__"]) == sorted(single)
    assert index["samples"] == 7 and index["kinds"] == {"human": 5, "scene": 2}
    assert index["sources"] == {"dance": 5, "nature": 2} and index["resolutions"] == {"64x64": 7}
    assert [os.path.basename(q["input"]["video"]) for q in index["quarantine"]] == ["broken.mp4"]
    assert index["frames"] == 7 * 16 and sorted(c["key"] for c in index["clips"]) == sorted(single)
    record = json.loads((out / "parts" / "part-00001.json").read_text())
    assert "shard-00001-000009.tar" in record["removed_leftovers"] and record["timings"]["total_s"] >= 0

    # a rerun touches nothing; another part count is refused, naming what differs
    before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")}
    assert main(args) == 0 and printed.count("skipped") < capsys.readouterr().out.count("skipped") == 3
    assert {name: (out / name).stat().st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")} == before
    assert main(["pack", manifest, "--out", str(out), "--parts", "2", *common]) == 2
    assert "differs in: parts" in capsys.readouterr().err


def test_pack_device_cuda_without_a_gpu_is_one_clear_error(tmp_path, capsys):
    import pytest
    import torch

    onnxruntime = pytest.importorskip("onnxruntime")
    if torch.cuda.is_available() or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU build is present: --device cuda is valid here")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"")
    for extra, fragment in ((["--face-detector", "mtcnn"], "torch sees no CUDA device"),
                            (["--pose-estimator", "dwpose", "--pose-model", "x.onnx"], "needs onnxruntime-gpu")):
        assert main(["pack", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--device", "cuda", *extra]) == 2
        error = capsys.readouterr().err
        assert fragment in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
