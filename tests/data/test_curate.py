"""Raw footage -> clips (datapipes.curate): shots split at a hard cut, margins at cuts, a static
and a moving video told apart, the one-person filter, and every decision with its score in the index."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from datapipes.curate import CurateConfig, _reader, clip_spans, count_people, curate_video, detect_shots, motion_score  # noqa: E402
from datapipes.pack import PackItem  # noqa: E402
from datapipes.synthetic import scene_clip  # noqa: E402
from datapipes.video import encode_mp4  # noqa: E402
from tools.xdyna_data import main  # noqa: E402


def _cut_video(path) -> str:
    """30 frames of one moving scene, then a hard cut to 30 frames of another (colours inverted)."""
    first = scene_clip(seed=1, frames=30, height=96, width=128)["video"]
    second = 255 - scene_clip(seed=2, frames=30, height=96, width=128)["video"]
    path.write_bytes(encode_mp4(np.concatenate([first, second]), 8))
    return str(path)


def _static_video(path, frames: int = 30) -> str:
    """One frame of a moving scene held still, with a little sensor-like noise (a real static shot)."""
    still = scene_clip(seed=1, frames=1, height=96, width=128)["video"]
    noise = np.random.default_rng(0).normal(0, 3, (frames,) + still.shape[1:])
    path.write_bytes(encode_mp4(np.clip(still.astype(np.int16) + noise, 0, 255).astype(np.uint8), 8))
    return str(path)


def test_a_hard_cut_splits_the_video_and_no_clip_starts_at_it(tmp_path):
    reader = _reader(_cut_video(tmp_path / "cut.mp4"), 128)
    shots = detect_shots(reader)
    assert shots == [(0, 30), (30, 60)]
    spans = clip_spans(shots, 60, CurateConfig(min_clip_frames=8, max_clip_frames=16, cut_margin=2))
    kept = [(s["start"], s["end"]) for s in spans if s["keep"]]
    assert kept == [(0, 16), (16, 28), (32, 48), (48, 60)]   # frames 28..31 lie at the cut
    # a shot too short after its margins is a recorded decision, not silently lost
    spans = clip_spans([(0, 10), (10, 60)], 60, CurateConfig(min_clip_frames=12, max_clip_frames=64))
    assert [(s["keep"], s["reason"] is not None) for s in spans] == [(False, True), (True, False)]


def test_static_and_moving_videos_are_told_apart(tmp_path):
    moving = _reader(_cut_video(tmp_path / "moving.mp4"), 128)
    still = _reader(_static_video(tmp_path / "still.mp4"), 128)
    threshold = CurateConfig().min_motion
    assert motion_score(still, 0, 30) < threshold < motion_score(moving, 0, 30)
    assert motion_score(still, 0, 30, "diff") < motion_score(moving, 0, 30, "diff")


def test_pack_with_shots_drops_static_scene_clips_and_records_every_decision(tmp_path, capsys):
    folder = tmp_path / "raw"
    folder.mkdir()
    _cut_video(folder / "walk.mp4")
    _static_video(folder / "lake.mp4")
    os.mkfifo(folder / "pipe.mp4")   # a decoder would block on it forever: pack's source checks come first
    out = tmp_path / "out"
    # --workers 1: the cutting runs in pack's worker pool (spawned processes), as in production
    assert main(["pack", str(folder), "--out", str(out), "--kind", "scene", "--parts", "1", "--shots",
                 "--workers", "1", "--min-frames", "8", "--min-clip-frames", "8", "--max-clip-frames", "32"]) == 0
    index = json.loads((out / "index.json").read_text())
    decisions = {d["key"]: d for d in index["curation"]}
    assert sorted(decisions) == ["lake/shot0000-000", "walk/shot0000-000", "walk/shot0001-001"]
    lake = decisions["lake/shot0000-000"]
    assert lake["decision"] == "drop" and "motion" in lake["reason"] and lake["motion"] < 0.1
    assert all(decisions[k]["decision"] == "keep" and decisions[k]["motion"] > 0.1 for k in decisions if "walk" in k)
    assert (decisions["walk/shot0000-000"]["start"], decisions["walk/shot0001-001"]["start"]) == (0, 32)
    assert [(q["input"]["key"], "not a regular file" in q["reason"]) for q in index["quarantine"]] == [("pipe", True)]
    clips = {clip["key"]: clip for clip in index["clips"]}
    assert sorted(clips) == ["walk/shot0000-000", "walk/shot0001-001"]
    assert {clip["frames"] for clip in clips.values()} == {28} and index["curation_decisions"] == {"drop": 1, "keep": 2}
    assert main(["inspect", str(out / "index.json"), "--num-frames", "8", "--verify", "full", "--workers", "1"]) == 0

    # retuning from the recorded scores: a stricter threshold between the two kept clips' motion
    # keeps the faster one, copied byte for byte; the still lake would pass a looser one but was never packed
    from tests.data.pack_inputs import packed_samples

    slow, fast = sorted(("walk/shot0000-000", "walk/shot0001-001"), key=lambda key: decisions[key]["motion"])
    middle = (decisions[slow]["motion"] + decisions[fast]["motion"]) / 2
    assert main(["retune", str(out / "index.json"), "--out", str(tmp_path / "strict"), "--min-motion", str(middle)]) == 0
    strict = json.loads((tmp_path / "strict" / "index.json").read_text())
    assert [clip["key"] for clip in strict["clips"]] == [fast] and strict["samples"] == 1
    assert {d["key"]: d["decision"] for d in strict["curation"]}[slow] == "drop"
    assert packed_samples(str(tmp_path / "strict" / "index.json")) == {fast: packed_samples(str(out / "index.json"))[fast]}
    assert main(["retune", str(out / "index.json"), "--out", str(tmp_path / "loose"), "--min-motion", "0"]) == 0
    assert json.loads((tmp_path / "loose" / "index.json").read_text())["not_packed"] == ["lake/shot0000-000"]


def test_clips_with_more_than_one_person_are_left_out(tmp_path):
    from tests.data.test_pose_estimator import _blue_finder_yolox

    config = CurateConfig(min_clip_frames=8, person_detector_model=_blue_finder_yolox(tmp_path / "y.onnx"),
                          people_min_score=200)
    videos = {}
    for people in (1, 2):
        frames = np.zeros((16, 96, 128, 3), np.uint8)
        # "people": blue squares (what the tiny detector finds), each inside one of its cells (16 px
        # of this frame), so each is one box; real detectors give one box per person likewise.
        frames[:, 4:10, 4:10] = (0, 0, 255)
        if people == 2:
            frames[:, 52:58, 100:106] = (0, 0, 255)
        videos[people] = tmp_path / f"p{people}.mp4"
        videos[people].write_bytes(encode_mp4(frames, 8))
        assert count_people(_reader(str(videos[people]), 128), 0, 16, config) == people
    kept, decisions = curate_video(PackItem(video=str(videos[2]), key="two"), str(tmp_path / "clips"), config)
    assert kept == [] and decisions[0]["people"] == 2 and "max-people" in decisions[0]["reason"]
    kept, decisions = curate_video(PackItem(video=str(videos[1]), key="one"), str(tmp_path / "clips"), config)
    assert [item.key for item in kept] == ["one/shot0000-000"] and decisions[0]["decision"] == "keep"
