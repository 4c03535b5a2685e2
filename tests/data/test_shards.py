"""Position-addressed tar reading (datapipes.shards.TarSampleReader) over stdlib tarfile."""
import random
import shlex
import tarfile

import pytest

from datapipes import shards


@pytest.fixture(scope="module")
def long_name_shard(tmp_path_factory) -> str:
    """Keys longer than ustar's 100-byte name field: ShardWriter writes pax headers for them."""
    out = tmp_path_factory.mktemp("long")
    with shards.ShardSink(str(out), "long") as sink:
        for index in range(4):
            sink.write({"__key__": f"{'d' * 120}/clip{index}", "mp4": bytes([index]) * (700 + index),
                        "json": b'{"index": %d}' % index})
    return sink.urls[0]


def _sequential(url: str) -> list[shards.RawSample]:
    reader = shards.TarSampleReader([url])
    try:
        return list(reader.iter_shard(0))
    finally:
        reader.close()


def test_offsets_are_member_header_offsets_and_address_samples_in_any_order(long_name_shard):
    samples = _sequential(long_name_shard)
    assert [s.key.rsplit("/", 1)[1] for s in samples] == ["clip0", "clip1", "clip2", "clip3"]
    assert samples[2].members == {"mp4": bytes([2]) * 702, "json": b'{"index": 2}'}
    with tarfile.open(long_name_shard) as archive:
        header_offsets = {m.offset for m in archive.getmembers()}
    assert {s.offset for s in samples} <= header_offsets and samples[0].offset == 0
    next_offsets = [s.offset for s in samples[1:]] + [None]
    order = list(range(len(samples))) * 2
    random.Random(0).shuffle(order)  # backwards and repeated reads: remote streams must reopen
    for url in (long_name_shard, f"pipe:cat {shlex.quote(long_name_shard)}"):
        reader = shards.TarSampleReader([url], max_open=1)
        for index in order:
            sample, next_offset = reader.read(0, samples[index].offset)
            assert (sample.key, sample.members, next_offset) == (
                samples[index].key, samples[index].members, next_offsets[index]), url
        reader.close()


def test_remote_stream_reads_what_the_local_file_holds(portrait_shards):
    url = shards.expand_shard_urls(portrait_shards)[0]
    local, remote = _sequential(url), _sequential(f"pipe:cat {shlex.quote(url)}")
    assert [(s.key, s.offset, s.members) for s in remote] == [(s.key, s.offset, s.members) for s in local]


def test_corrupt_tar_header_is_an_error_naming_shard_and_byte(tmp_path, long_name_shard):
    samples = _sequential(long_name_shard)
    data = bytearray(open(long_name_shard, "rb").read())
    data[samples[1].offset + 130] ^= 0x7F  # inside the size field: checksum no longer matches
    broken = tmp_path / "broken.tar"
    broken.write_bytes(bytes(data))
    reader = shards.TarSampleReader([str(broken)])
    with pytest.raises(shards.TarFormatError, match=rf"broken\.tar.*byte {samples[1].offset}"):
        list(reader.iter_shard(0))
    with pytest.raises(shards.TarFormatError, match=r"broken\.tar.*no readable tar header"):
        reader.read(0, samples[1].offset)


def test_truncated_member_is_an_error_naming_the_member(tmp_path, long_name_shard):
    with tarfile.open(long_name_shard) as archive:
        video = next(m for m in archive.getmembers() if m.name.endswith("clip2.mp4"))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(long_name_shard, "rb").read()[:video.offset_data + 100])
    reader = shards.TarSampleReader([str(truncated)])
    with pytest.raises(shards.TarFormatError, match=r"truncated\.tar.*clip2\.mp4"):
        list(reader.iter_shard(0))


def test_an_archive_without_members_has_no_samples(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert _sequential(str(empty)) == []


# ----------------------------------------------------------------------------- inspect


def _inspect_corpus(directory):
    """One good human and scene clip, and one sample for each reason the loader skips one;
    returns {key: reason fragment} of the bad ones."""
    import json

    from datapipes.synthetic import synthetic_sample

    human = dict(synthetic_sample("human", 0, 1, 6, 32, 32))
    meta = json.loads(human["json"])
    pose = json.loads(human["pose.json"])
    scene = dict(synthetic_sample("scene", 0, 1, 6, 32, 32))
    samples = [human, scene,
               dict(human, __key__="kind5", json=json.dumps(dict(meta, kind=5)).encode()),
               dict(synthetic_sample("human", 1, 1, 3, 32, 32), __key__="short"),
               {**{k: v for k, v in human.items() if k != "pose.mp4"}, "__key__": "pose-no-size",
                "pose.json": json.dumps({k: v for k, v in pose.items() if k != "height"}).encode()},
               {**{k: v for k, v in human.items() if not k.startswith("pose.")}, "__key__": "no-pose"},
               dict(human, __key__="face-list", **{"face.json": b"[]"}),
               dict(human, __key__="bad-meta", json=b"[1, 2]"),
               dict(scene, __key__="lying-meta", json=json.dumps(dict(meta, kind="scene", num_frames=7)).encode()),
               dict(human, __key__="broken-video", mp4=human["mp4"][:200])]
    with shards.ShardSink(str(directory), "mixed", max_count=4) as sink:
        for sample in samples:
            sink.write(sample)
    return {"kind5": "kind5.json: kind: must be a string, got int 5", "short": "too short: 3 frames < clip span 4",
            "pose-no-size": "pose-no-size.pose.json: height: missing",
            "no-pose": "human clip has no pose.mp4 or pose.json member",
            "face-list": "face-list.face.json: face track must be a JSON object",
            "bad-meta": "bad-meta.json: metadata must be a JSON object",
            "lying-meta": "metadata says 7 frames, the video has 6", "broken-video": "cannot decode"}


def test_inspect_fails_with_one_line_per_sample_the_loader_skips(tmp_path, capsys):
    import json

    from datapipes.loader import build_clip_loader
    from tests.data.conftest import loader_config
    from tools.xdyna_data import main

    expected = _inspect_corpus(tmp_path / "mixed")
    assert main(["inspect", str(tmp_path / "mixed"), "--workers", "1", "--num-frames", "4"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: {len(expected)} problem(s); the loader would skip {len(expected)} of {len(expected) + 2} sample(s):" in out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    for key, fragment in expected.items():
        (line,) = [line for line in lines if line.startswith(f"  {key} (")]
        assert fragment in line, line
    # The loader (same clip length, face maps on) skips exactly these.
    cfg = loader_config(str(tmp_path / "mixed"), resample=False, with_face=True, num_frames=4, frame_stride=1,
                        height=32, width=32, max_bad_fraction=1.0, bad_fraction_min_samples=1)
    loader = build_clip_loader(cfg, 0, 1)
    keys = [key for batch in loader for key in batch["__key__"]]
    assert sorted(keys) == ["human-000000", "scene-000000"]
    assert {key for key, _ in loader.recent_bad} == set(expected)
    # With a clip of 2 frames the short clip is fine for both.
    assert main(["inspect", str(tmp_path / "mixed"), "--workers", "1", "--num-frames", "2", "--json"]) == 1
    failed = {key for _, key, _ in json.loads(capsys.readouterr().out)["failures"]}
    assert failed == set(expected) - {"short"}


def test_inspect_of_a_shard_set_without_samples_fails(tmp_path, capsys):
    from tools.xdyna_data import main

    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "empty" / "a-000000.tar", "w"):
        pass
    assert main(["inspect", str(tmp_path / "empty"), "--workers", "1"]) == 1
    assert "the shard set holds no samples" in capsys.readouterr().out


def test_inspect_reports_face_and_person_coverage_per_clip_and_flags_low_ones(tmp_path, capsys):
    import json

    import numpy as np

    from datapipes.synthetic import synthetic_sample
    from datapipes.video import encode_mp4
    from tools.xdyna_data import main

    human = dict(synthetic_sample("human", 0, 1, 6, 32, 32))
    face = json.loads(human["face.json"])
    face["frames"] = [None, None, None, None] + face["frames"][4:]          # a face in 2 of 6 frames
    pose = json.loads(human["pose.json"])
    for t in (0, 1, 2):
        pose["keypoints"][t] = [[x, y, 0.0] for x, y, _ in pose["keypoints"][t]]  # nobody in 3 of 6
    sparse = {**{k: v for k, v in human.items() if k != "pose.mp4"}, "__key__": "sparse",
              "face.json": json.dumps(face).encode(), "pose.json": json.dumps(pose).encode()}
    black = {**{k: v for k, v in human.items() if k != "pose.json"}, "__key__": "black-pose",
             "pose.mp4": encode_mp4(np.zeros((6, 32, 32, 3), np.uint8), 8)}
    with shards.ShardSink(str(tmp_path / "s"), "c") as sink:
        for sample in (human, sparse, black):
            sink.write(sample)
    assert main(["inspect", str(tmp_path / "s"), "--workers", "1", "--num-frames", "2", "--verify", "full",
                 "--json"]) == 0                                             # low coverage warns, never fails
    report = json.loads(capsys.readouterr().out)
    coverage = {clip["key"]: (clip["frames"], clip["face"], clip["person"], clip["pose_from"]) for clip in report["coverage"]}
    assert coverage == {"human-000000": (6, 6, 6, "pose.mp4"), "sparse": (6, 2, 3, "pose.json"),
                        "black-pose": (6, 6, 0, "pose.mp4")}
    assert sorted(report["low_coverage"]) == ["black-pose", "sparse"]
    assert main(["inspect", str(tmp_path / "s"), "--workers", "1", "--num-frames", "2", "--verify", "full",
                 "--min-coverage", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 1 human clip(s) with face or person coverage below 30%:" in out
    assert "  black-pose: face 6/6 (100%), person 0/6 (0%) (from pose.mp4)" in out
    # Below --verify full a pose video's coverage is unknown, pose.json's is always known.
    assert main(["inspect", str(tmp_path / "s"), "--workers", "1", "--num-frames", "2", "--clips"]) == 0
    out = capsys.readouterr().out
    assert "  black-pose: face 6/6 (100%), person - (from pose.mp4)" in out
    assert "  sparse: face 2/6 (33%), person 3/6 (50%) (from pose.json)" in out


def test_inspect_reports_an_unreadable_shard_instead_of_crashing(tmp_path, capsys, monkeypatch, portrait_shards):
    from tools.xdyna_data import main

    def denied(self, url, offset):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(shards._ShardCursor, "__init__", denied)
    assert main(["inspect", portrait_shards, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "cannot read the shard (Permission denied)" in out and "the shard set holds no samples" in out
