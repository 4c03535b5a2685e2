"""``xdyna-data pack`` on bad and awkward input: a seeded corpus built here (truncated, corrupted,
sparse, zero-duration, FIFO, orphan companions, awkward names, malformed JSON, black poses) and
misbehaving workers (crash, hang, Ctrl-C, SIGTERM, MTCNN). Whatever the input, pack never
crashes, hangs or loses one: every input ends packed or quarantined with a reason, and the
counts add up."""
from __future__ import annotations

import inspect
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datapipes import shards
from datapipes.face import face_track_to_json
from datapipes.pack import PackItem, PackOptions, items_from_folder, pack
from datapipes.pose import keypoints_to_json
from datapipes.synthetic import human_clip
from datapipes.validate import Rejected, Rules, check_video
from datapipes.video import encode_mp4
from tools.xdyna_data import main

REPO = Path(__file__).resolve().parents[2]
MARKER_ENV = "XDYNA_TEST_PACK_MARKER"
GiB = 1 << 30


def _clip(seed: int, frames: int = 20, height: int = 64, width: int = 64) -> dict:
    clip = human_clip(seed=seed, frames=frames, height=height, width=width)
    return dict(clip, mp4=encode_mp4(clip["video"], 8), pose_mp4=encode_mp4(clip["pose"], 8))


def _write_clip(folder: Path, name: str, seed: int, **kwargs) -> dict:
    clip = _clip(seed, **kwargs)
    (folder / f"{name}.mp4").write_bytes(clip["mp4"])
    (folder / f"{name}.pose.mp4").write_bytes(clip["pose_mp4"])
    return clip


def zero_duration(mp4: bytes) -> bytes:
    """The same mp4 with every duration in its header zeroed (mvhd, tkhd, mdhd and the stts
    sample deltas): decoders then report fps NaN."""
    data = bytearray(mp4)
    for box in (b"mvhd", b"tkhd", b"mdhd"):
        at = data.find(box)
        version = data[at + 4]
        # after the box type: version/flags (4), creation + modification times, then timescale
        # (4) except in tkhd, where a track id and a reserved word (8) come before the duration
        offset = at + 8 + (16 if version == 1 else 8) + (8 if box == b"tkhd" else 4)
        width = 8 if version == 1 else 4
        data[offset:offset + width] = bytes(width)
    at = data.find(b"stts")
    for entry in range(struct.unpack(">I", data[at + 8:at + 12])[0]):
        delta = at + 12 + 8 * entry + 4
        data[delta:delta + 4] = bytes(4)
    return bytes(data)


def corrupt_middle(mp4: bytes, seed: int, fraction: float = 0.1) -> bytes:
    """``fraction`` of the file's middle overwritten with seeded random bytes."""
    rng = np.random.default_rng(seed)
    data = bytearray(mp4)
    length = max(1, int(len(data) * fraction))
    start = (len(data) - length) // 2 + int(rng.integers(-length // 2, length // 2 + 1))
    data[start:start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return bytes(data)


def sparse_file(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)


def strict_json(data: bytes | str):
    """JSON as the standard defines it: NaN / Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(data, parse_constant=refuse)


def write_corpus(folder: Path) -> dict[str, str]:
    """The seeded corpus; returns {file name: expected reason fragment} of the inputs that must be
    quarantined (the corrupted files may go either way and are not listed)."""
    folder.mkdir()
    for index in range(2):
        _write_clip(folder, f"good{index}", seed=index)
    _write_clip(folder, "warm.pose.up", seed=2)               # dots in the name: a clip of its own
    clip = _write_clip(folder, "zerodur", seed=3)
    (folder / "zerodur.mp4").write_bytes(zero_duration(clip["mp4"]))
    for index in range(6):                                       # 10 % of the middle overwritten
        _write_clip(folder, f"corrupt{index}", seed=10 + index)
        (folder / f"corrupt{index}.mp4").write_bytes(corrupt_middle(clip["mp4"], seed=index))
    sparse_file(folder / "sparse.mp4", GiB)                      # no container: rejected unread
    sparse_file(folder / "sparseftyp.mp4", GiB, b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2")
    (folder / "sparseftyp.pose.mp4").write_bytes(clip["pose_mp4"])
    os.mkfifo(folder / "fifo.mp4")                               # opening it would block for good
    (folder / "lonely.pose.mp4").write_bytes(clip["pose_mp4"])   # companions without their video
    (folder / "ghost.face.json").write_text("{}")
    (folder / "notes.txt").write_text("not a video\n")
    _write_clip(folder, "listjson", seed=4)
    (folder / "listjson.face.json").write_text("[]")
    _write_clip(folder, "nulljson", seed=5)
    (folder / "nulljson.pose.json").write_text("null")
    _write_clip(folder, "notjson", seed=6)
    (folder / "notjson.face.json").write_text("{oops")
    black = _write_clip(folder, "blackpose", seed=7)
    (folder / "blackpose.pose.mp4").write_bytes(encode_mp4(np.zeros_like(black["pose"]), 8))
    nobody = _clip(8)
    (folder / "nobody.mp4").write_bytes(nobody["mp4"])
    keypoints = np.array(nobody["keypoints"], dtype=np.float64)
    keypoints[..., 2] = 0.0
    (folder / "nobody.pose.json").write_text(json.dumps(keypoints_to_json(keypoints, 64, 64)))
    (folder / "noface.face.json").write_text(json.dumps(face_track_to_json([None] * 20, 64, 64, "test")))
    _write_clip(folder, "noface", seed=9)
    _write_clip(folder, "dup.a", seed=11)                        # both get the key dup_a
    _write_clip(folder, "dup_a", seed=12)
    return {"zerodur.mp4": "frame rate nan", "sparse.mp4": "not an mp4", "sparseftyp.mp4": "cannot decode",
            "fifo.mp4": "not a regular file", "lonely.pose.mp4": "no video lonely.mp4",
            "ghost.face.json": "no video ghost.mp4", "notes.txt": "not a video", "listjson.mp4": "face.json",
            "nulljson.mp4": "pose.json", "notjson.mp4": "not JSON", "dup_a.mp4": "duplicate key"}


def test_every_input_of_the_corpus_is_packed_or_quarantined(tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    expected = write_corpus(inputs)
    before = {name: (inputs / name).stat().st_mtime_ns for name in os.listdir(inputs)}
    assert main(["pack", str(inputs), "--out", str(out), "--workers", "2", "--verify", "full",
                 "--shard-size", "4", "--log-every", "0"]) == 0
    captured = capsys.readouterr()
    assert "nan" not in captured.out
    # stderr is no terminal here: plain progress lines, one per input with --log-every 0
    progress = [line for line in captured.err.splitlines() if line.startswith("pack: ")]
    files = sorted(os.listdir(inputs))
    companions = {name for name in files if name.endswith((".pose.mp4", ".pose.json", ".face.json"))
                  and name not in expected}
    inputs_count = len(files) - len(companions)
    assert len(progress) == inputs_count and progress[-1].startswith(f"pack: {inputs_count}/{inputs_count} ")

    summary = strict_json((out / "pack_summary.json").read_text())
    quarantine = [strict_json(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    urls = shards.expand_shard_urls(str(out))
    reader = shards.TarSampleReader(urls)
    samples = [sample for index in range(len(urls)) for sample in reader.iter_shard(index)]
    for sample in samples:  # every JSON member is strict JSON
        for member, data in sample.members.items():
            if member.endswith("json"):
                strict_json(data)
    assert summary["accepted"] == len(samples) and summary["rejected"] == len(quarantine)
    assert summary["accepted"] + summary["rejected"] == inputs_count
    assert np.isfinite(summary["seconds"]) and summary["seconds"] > 0

    reasons = {os.path.basename(entry["input"]["video"]): entry["reason"] for entry in quarantine}
    for name, fragment in expected.items():
        assert fragment in reasons.get(name, ""), (name, reasons.get(name))
    packed = {sample.key for sample in samples}
    assert {"good0", "good1", "warm_pose_up", "blackpose", "nobody", "noface", "dup_a"} <= packed
    for index in range(6):  # a corrupted file ends one way or the other, with a reason
        assert (f"corrupt{index}" in packed) != (f"corrupt{index}.mp4" in reasons)
    assert summary["warnings"]["no person"] == ["blackpose", "nobody"]
    assert summary["warnings"]["no face"] == ["noface"]
    assert "2 packed clip(s) with no person detected: blackpose, nobody" in captured.out
    assert {name: (inputs / name).stat().st_mtime_ns for name in os.listdir(inputs)} == before


def test_folder_listing_accounts_for_every_file(tmp_path):
    """Generated folders of awkward names: every file is an input (a video, or an item with a
    problem) or the companion of a listed video; none is dropped."""
    rng = np.random.default_rng(0)
    words = ["a", "pose", "face", "up", "x-1"]
    suffixes = [".mp4", ".MOV", ".pose.mp4", ".pose.json", ".face.json", ".pose.MP4", ".txt", ".json", ""]
    for trial in range(40):
        folder = tmp_path / f"f{trial}"
        (folder / "sub").mkdir(parents=True)
        names = set()
        for _ in range(int(rng.integers(1, 12))):
            stem = ".".join(rng.choice(words, size=int(rng.integers(1, 4))))
            names.add(("sub/" if rng.random() < 0.3 else "") + stem + str(rng.choice(suffixes)))
        names |= {"anchor.mp4", "anchor.MOV"}  # a folder without any video is refused as a whole
        for name in names:
            (folder / name).write_bytes(b"")
        items = items_from_folder(str(folder))
        listed = [path for item in items for path in (item.video, item.pose_video, item.keypoints, item.face) if path]
        assert {os.path.relpath(path, folder) for path in listed} == names
        assert len({item.video for item in items}) == len(items)  # no file is two inputs
        for item in items:
            assert item.problem or item.video.lower().endswith((".mp4", ".mov")), item
        assert not [item for item in items if item.problem and item.pose_video]


def test_unreadable_and_odd_sources_are_rejections(tmp_path, monkeypatch):
    clip = _clip(0)
    (tmp_path / "locked.mp4").write_bytes(clip["mp4"])
    (tmp_path / "locked.pose.mp4").write_bytes(clip["pose_mp4"])
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "ok.mp4").write_bytes(clip["mp4"])
    (tmp_path / "ok.pose.mp4").write_bytes(clip["pose_mp4"])
    locked = str(tmp_path / "locked.mp4")
    real_access = os.access
    # Tests run as root, which every permission lets through: deny this one file by hand.
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != locked and real_access(path, mode))
    items = [PackItem(video=locked, pose_video=str(tmp_path / "locked.pose.mp4"), key="locked"),
             PackItem(video=str(tmp_path / "adir.mp4"), key="adir"),
             PackItem(video=str(tmp_path / "missing.mp4"), key="missing"),
             PackItem(video=str(tmp_path / "ok.mp4"), pose_video=str(tmp_path / "ok.pose.mp4"), key="ok",
                      keypoints=str(tmp_path / "adir.mp4"))]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".shard-000000.tar.partial-1").write_bytes(b"left by a killed run")
    summary = pack(items, str(tmp_path / "out"), PackOptions(Rules(min_frames=8)), workers=0)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert summary.accepted == 0 and summary.rejected == 4
    assert sorted(os.listdir(tmp_path / "out")) == ["pack_summary.json", "quarantine.jsonl"]
    assert "permission denied" in reasons[0] and "is a directory" in reasons[1]
    assert "does not exist" in reasons[2] and "keypoints" in reasons[3] and "is a directory" in reasons[3]


class _FailingReader:
    """A decord reader whose decoder fails at ``where`` (as decord's threaded decoder does)."""

    def __init__(self, where: str):
        from decord._ffi.base import DECORDError

        self.where, self.error = where, DECORDError("[12:00:00] ffmpeg: Error sending packet")

    def _maybe(self, where):
        if where == self.where:
            raise self.error

    def __len__(self):
        return 20

    def __getitem__(self, index):
        self._maybe("first frame")
        return np.zeros((64, 64, 3), np.uint8)

    def seek(self, index):
        self._maybe("seek")

    def get_avg_fps(self):
        self._maybe("fps")
        return 8.0

    def get_batch(self, indices):
        self._maybe("batch")
        return type("Frames", (), {"asnumpy": lambda self: np.zeros((len(indices), 64, 64, 3), np.uint8)})()


@pytest.mark.parametrize("where", ["first frame", "seek", "fps", "batch"])
def test_a_decoder_error_at_any_point_is_a_rejection(monkeypatch, where):
    import datapipes.video

    monkeypatch.setattr(datapipes.video.decord, "VideoReader", lambda *args, **kwargs: _FailingReader(where))
    with pytest.raises(Rejected, match="Error sending packet"):
        check_video(b"\x00" * 64, "clip", "full")


def test_rejecting_huge_files_reads_none_of_them(tmp_path):
    """Two sparse 1 GiB files, one with an mp4 header: rejected with at most a few MiB of memory."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak RSS here")

    def peak_kib():
        return int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM")).split()[1])

    sparse_file(tmp_path / "zeros.mp4", GiB)
    sparse_file(tmp_path / "header.mp4", GiB, b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2")
    items = [PackItem(video=str(tmp_path / name), key=name[:-4], kind="scene") for name in ("zeros.mp4", "header.mp4")]
    start = peak_kib()
    summary = pack(items, str(tmp_path / "out"), workers=0)
    assert summary.rejected == 2
    assert peak_kib() - start < 256 * 1024
    # A size limit rejects from the file's metadata alone.
    limited = pack(items[1:], str(tmp_path / "out2"), PackOptions(max_video_bytes=GiB - 1), workers=0)
    assert limited.rejected == 1
    assert "more than the limit" in (tmp_path / "out2" / "quarantine.jsonl").read_text()


# ----------------------------------------------------------------------------- misbehaving workers


class MisbehavingFaces:
    """A face detector plugin for the tests: on 96 px wide frames it records its pid in the file
    named by $XDYNA_TEST_PACK_MARKER and blocks for good; on 48 px high frames its process dies
    (SIGKILL, as the OOM killer would); elsewhere it finds no face."""
    name = "misbehaving"

    def __call__(self, frames):
        if frames.shape[2] == 96:
            Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
            while True:
                time.sleep(3600)
        if frames.shape[1] == 48:
            os.kill(os.getpid(), signal.SIGKILL)
        return [None] * len(frames)


PLUGIN_MODULE = "xdyna_pack_test_faces"
PLUGIN = f"{PLUGIN_MODULE}:MisbehavingFaces"


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """:class:`MisbehavingFaces` as a module of its own on the path of this process, of the
    workers it spawns (they inherit ``sys.path``) and of commands it runs (``PYTHONPATH``); not
    imported as ``tests.data...``, a name some installed packages shadow."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    source = "import os, signal, time\nfrom pathlib import Path\n\nMARKER_ENV = %r\n\n\n%s" % (
        MARKER_ENV, inspect.getsource(MisbehavingFaces))
    (folder / f"{PLUGIN_MODULE}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return PLUGIN


@pytest.mark.slow
def test_a_crashing_or_hanging_worker_costs_one_input(tmp_path, monkeypatch, plugin):
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "marker"))
    folder = tmp_path / "in"
    folder.mkdir()
    _write_clip(folder, "a_hangs", seed=0, width=96)
    _write_clip(folder, "b_crashes", seed=1, height=48)
    _write_clip(folder, "c_fine", seed=2)
    options = PackOptions(Rules(min_frames=8, min_height=32), face_detector=plugin, item_timeout=2)
    summary = pack(items_from_folder(str(folder)), str(tmp_path / "out"), options, workers=2)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert summary.accepted == 1 and summary.warnings == {"no face": ["c_fine"]}
    assert "took longer than 2 s" in reasons[0] and "killed by SIGKILL" in reasons[1]
    assert not _alive(int((tmp_path / "marker").read_text()))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _wait_for(condition, what: str, limit: float = 300.0) -> None:
    """Poll ``condition``; the limit only guards against a hang (it fails the test)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _descendants(pid: int) -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process(pid).children(recursive=True)}


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_pack_leaves_no_worker_and_no_partial_shard(tmp_path, stop, plugin):
    folder, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "marker"
    folder.mkdir()
    clip = _write_clip(folder, "a_done", seed=0)   # has a face track: packed without the detector
    (folder / "a_done.face.json").write_text(json.dumps(face_track_to_json(clip["faces"], 64, 64, "test")))
    _write_clip(folder, "b_blocks", seed=1, width=96)
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.xdyna_data", "pack", str(folder), "--out", str(out), "--workers", "2",
         "--min-frames", "8", "--face-detector", plugin, "--log-every", "0"],
        cwd=REPO, env=dict(os.environ, **{MARKER_ENV: str(marker)}), stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        # a_done is written into the unfinished shard; b_blocks sits in the detector.
        for line in process.stderr:
            if line.startswith("pack: 1/2 "):
                break
        _wait_for(lambda: marker.exists() or process.poll() is not None, "the detector to block")
        assert process.poll() is None, process.stderr.read()
        assert [name for name in os.listdir(out) if ".partial" in name]
        workers = _descendants(process.pid)
        if stop == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:  # a terminal's Ctrl-C signals the whole foreground process group
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + (signal.SIGTERM if stop == "SIGTERM" else signal.SIGINT)
    assert "no partial shard published" in process.stderr.read()
    assert int(marker.read_text()) in workers
    _wait_for(lambda: not any(_alive(pid) for pid in workers), "the workers to end", limit=30)
    assert sorted(os.listdir(out)) == ["quarantine.jsonl"]


@pytest.mark.slow
def test_mtcnn_pack_with_two_workers_finishes(tmp_path):
    """The face detector (torch) in two worker processes: it once hung for good when the
    parent had built it before forking."""
    pytest.importorskip("facenet_pytorch")
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for index in range(2):
        _write_clip(folder, f"clip{index}", seed=index, frames=40)
    # The command's process runs MTCNN itself first: torch state in the parent, as at the hang.
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from datapipes.facetrack import load_face_model; import numpy as np; "
         "load_face_model('mtcnn')(np.zeros((2, 64, 64, 3), np.uint8)); from tools.xdyna_data import main; "
         "sys.exit(main(sys.argv[1:]))",
         "pack", str(folder), "--out", str(out), "--workers", "2", "--face-detector", "mtcnn"],
        cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)  # a hang fails here (it took ~10 s of CPU)
    finally:
        if process.poll() is None:  # the hung workers too, not only the command
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
    reader = shards.TarSampleReader(shards.expand_shard_urls(str(out)))
    samples = list(reader.iter_shard(0))
    assert [sample.key for sample in samples] == ["clip0", "clip1"]
    for sample in samples:
        track = strict_json(sample.members["face.json"])
        assert track["detector"] == "mtcnn" and len(track["frames"]) == 40
