import copy
import pickle
from collections import Counter

import pytest
import torch

from datapipes import shards
from datapipes.clips import to_batch_contract
from datapipes.loader import BadSampleCeilingError, build_clip_loader
from datapipes.synthetic import write_synthetic_shards
from tests.data.conftest import loader_config


def _all_keys(spec):
    reader = shards.TarSampleReader(shards.expand_shard_urls(spec))
    keys = [s.key for i in range(len(reader.urls)) for s in reader.iter_shard(i)]
    reader.close()
    return keys


def _fingerprint(batch):
    return (tuple(batch["__key__"]), round(float(batch["video"].sum()), 3),
            round(float(batch["reference"].sum()), 3), tuple(batch["video"].shape))


def test_batches_follow_the_batch_contract(portrait_shards):
    loader = build_clip_loader(loader_config(portrait_shards, with_face=True, scene_probability=0.5,
                                             batches_per_epoch=8), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    seen_scene = seen_human = False
    for batch in batches:
        assert set(batch) == {"video", "reference", "pose", "face", "frame_index", "reference_index", "is_scene", "source", "__key__"}
        assert batch["frame_index"].shape == (2, 4) and batch["reference_index"].shape == (2,)
        assert torch.all(batch["frame_index"].diff(dim=1) == 2)   # frame_stride
        # reference "outside" (the default): never within the clip's span
        outside = (batch["reference_index"] < batch["frame_index"][:, 0]) | (batch["reference_index"] > batch["frame_index"][:, -1])
        assert outside.all()
        assert batch["video"].shape == (2, 4, 3, 64, 32) and batch["video"].dtype == torch.float32
        assert batch["reference"].shape == (2, 3, 64, 32)
        assert batch["pose"].shape == (2, 4, 3, 64, 32) and batch["face"].shape == (2, 4, 6, 64, 32)
        assert batch["is_scene"].dtype == torch.bool and len(batch["__key__"]) == 2
        assert -1 <= batch["video"].min() and batch["video"].max() <= 1
        assert 0 <= batch["pose"].min() and batch["pose"].max() <= 1 and batch["face"].max() <= 1
        for i, key in enumerate(batch["__key__"]):
            assert bool(batch["is_scene"][i]) == key.startswith("scene")
            if batch["is_scene"][i]:   # harmonic data fusion: blank conditions are exactly zero
                seen_scene = True
                assert batch["pose"][i].abs().sum() == 0 and batch["face"][i].abs().sum() == 0
            else:
                seen_human = True
                assert batch["pose"][i].amax(dim=(1, 2, 3)).min() > 0.5   # a skeleton in every frame
                assert batch["face"][i].amax(dim=(1, 2, 3)).min() > 0     # a face in every frame
    assert seen_scene and seen_human


def test_uint8_batches_scale_to_the_float32_batches_of_the_same_seed(portrait_shards):
    settings = dict(with_face=True, scene_probability=0.5, batches_per_epoch=3)
    floats = list(build_clip_loader(loader_config(portrait_shards, **settings), 0, 1))
    raw = list(build_clip_loader(loader_config(portrait_shards, output_dtype="uint8", **settings), 0, 1))
    for float_batch, uint8_batch in zip(floats, raw, strict=True):
        assert uint8_batch["__key__"] == float_batch["__key__"]
        assert all(uint8_batch[name].dtype == torch.uint8 for name in ("video", "reference", "pose", "face"))
        assert uint8_batch["video"].max() > 1  # really 0..255, not a cast of [-1, 1]
        scaled = to_batch_contract(dict(uint8_batch))
        for name in ("video", "reference", "pose", "face"):
            assert torch.equal(scaled[name], float_batch[name]), name
    with pytest.raises(ValueError, match="output_dtype must be one of"):
        build_clip_loader(loader_config(portrait_shards, output_dtype="float16"), 0, 1)


def test_missing_shards_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_clip_loader(loader_config(str(missing)), 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_clip_loader(loader_config(str(tmp_path / "empty")), 0, 1)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_finite_pass_sees_every_sample_once_across_two_ranks_and_two_workers(portrait_shards, start_method):
    keys = []
    for rank in range(2):
        cfg = loader_config(portrait_shards, resample=False, num_workers=2, start_method=start_method,
                            batch_size=3, num_frames=1)
        keys += [key for batch in build_clip_loader(cfg, rank, 2) for key in batch["__key__"]]
    expected = _all_keys(portrait_shards)
    assert len(expected) == 16
    assert Counter(keys) == Counter(expected)


def test_finite_pass_with_fewer_shards_than_workers_splits_samples(landscape_shards):
    keys = []
    for rank in range(2):
        cfg = loader_config(landscape_shards, resample=False, num_workers=2, height=32, width=64, num_frames=1)
        keys += [key for batch in build_clip_loader(cfg, rank, 2) for key in batch["__key__"]]
    assert len(shards.expand_shard_urls(landscape_shards)) == 2
    assert Counter(keys) == Counter(_all_keys(landscape_shards))


def test_same_seed_same_batches_and_ranks_differ(portrait_shards):
    cfg = loader_config(portrait_shards, num_workers=2)
    first = [_fingerprint(b) for b in build_clip_loader(cfg, 0, 2)]
    again = [_fingerprint(b) for b in build_clip_loader(copy.deepcopy(cfg), 0, 2)]
    other_rank = [_fingerprint(b) for b in build_clip_loader(cfg, 1, 2)]
    other_seed = [_fingerprint(b) for b in build_clip_loader(loader_config(portrait_shards, num_workers=2, seed=5), 0, 2)]
    assert first == again
    assert first != other_rank and first != other_seed
    assert len(first) == len(other_rank) == 6


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resumed_loader_yields_the_batches_of_an_uninterrupted_one(portrait_shards, landscape_shards, stop_after):
    # Two buckets, mixing from one stream and 2 workers: the state must carry pending bucket
    # entries, held-back clips of the other kind and the round-robin turn.
    cfg = loader_config([portrait_shards, landscape_shards], num_workers=2, batches_per_epoch=5,
                        buckets=[[64, 32], [32, 64]], scene_probability=0.4, num_frames=2)
    reference_run = build_clip_loader(cfg, 1, 2)
    expected = [_fingerprint(b) for epoch in range(2) for b in reference_run]

    interrupted = build_clip_loader(cfg, 1, 2)
    got = []
    while len(got) < stop_after:
        for batch in interrupted:
            got.append(_fingerprint(batch))
            if len(got) == stop_after:
                break
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    assert len(pickle.dumps(state)) < 20_000
    resumed = build_clip_loader(cfg, 1, 2)
    resumed.load_state_dict({"ranks": {0: {}, 1: state}})   # the gathered form works too
    while len(got) < len(expected):
        got += [_fingerprint(b) for b in resumed]
    assert got == expected
    shapes = {fp[3][2:] for fp in expected}
    assert shapes == {(3, 64, 32), (3, 32, 64)}   # both buckets, each batch of one shape


def test_resume_refuses_a_different_config(portrait_shards):
    loader = build_clip_loader(loader_config(portrait_shards), 0, 1)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size|fingerprint"):
        build_clip_loader(loader_config(portrait_shards, batch_size=3), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        build_clip_loader(loader_config(portrait_shards), 1, 2).load_state_dict(state)


@pytest.mark.parametrize("separate_scene_source", [False, True])
def test_scene_mix_ratio_is_within_tolerance(portrait_shards, tmp_path, separate_scene_source):
    probability = 0.3
    if separate_scene_source:
        scenes = tmp_path / "scenes"
        write_synthetic_shards(str(scenes), human=0, scene=3, frames=4, height=64, width=32, seed=3, shard_size=1)
        cfg = loader_config(portrait_shards, scene_shards=str(scenes), scene_probability=probability)
    else:
        cfg = loader_config(portrait_shards, scene_probability=probability)
    cfg.num_frames, cfg.frame_stride, cfg.batch_size, cfg.batches_per_epoch = 1, 1, 10, 40
    flags = torch.cat([batch["is_scene"] for batch in build_clip_loader(cfg, 0, 1)])
    # 400 draws: standard error 0.023, tolerance ~4 of them
    assert abs(flags.float().mean().item() - probability) < 0.09


def _bad_sample_shards(directory, height=64, width=32):
    from datapipes.synthetic import synthetic_sample

    good = [synthetic_sample("human", i, 7, 12, height, width) for i in range(4)]
    bad = []
    truncated = dict(synthetic_sample("human", 10, 7, 12, height, width), __key__="truncated")
    truncated["mp4"] = truncated["mp4"][: len(truncated["mp4"]) // 2]
    zero = dict(synthetic_sample("scene", 11, 7, 12, height, width), __key__="zero-bytes", mp4=b"")
    text = dict(synthetic_sample("scene", 12, 7, 12, height, width), __key__="not-a-video", mp4=b"hello" * 100)
    mismatch = dict(synthetic_sample("human", 13, 7, 12, height, width), __key__="pose-mismatch")
    mismatch["pose.mp4"] = synthetic_sample("human", 14, 7, 9, height, width)["pose.mp4"]
    short = dict(synthetic_sample("human", 15, 7, 3, height, width), __key__="too-short")
    meta_list = dict(synthetic_sample("human", 16, 7, 12, height, width), __key__="meta-list", json=b"[1, 2]")
    meta_text = dict(synthetic_sample("scene", 17, 7, 12, height, width), __key__="meta-text", json=b"fps=8")
    bad = [truncated, zero, text, mismatch, short, meta_list, meta_text]
    with shards.ShardSink(str(directory), "mixed", max_count=3) as sink:
        for sample in good[:2] + bad + good[2:]:
            sink.write(sample)
    return {"truncated": "cannot decode", "zero-bytes": "zero bytes", "not-a-video": "cannot decode",
            "pose-mismatch": "frame-count mismatch", "too-short": "too short",
            "meta-list": "meta-list.json: metadata must be a JSON object", "meta-text": "meta-text.json: not JSON"}


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    reasons = _bad_sample_shards(tmp_path / "mixed")
    loader = build_clip_loader(loader_config(str(tmp_path / "mixed"), resample=False, max_bad_fraction=1.0,
                                             bad_fraction_min_samples=1), 0, 1)
    with caplog.at_level("WARNING", logger="datapipes.loader"):
        keys = [key for batch in loader for key in batch["__key__"]]
    assert sorted(keys) == [f"human-{i:06d}" for i in range(4)]
    assert loader.stats()["bad_samples"] == 7 and loader.stats()["samples_drawn"] == 11
    assert dict((k, r.split(":")[0]) for k, r in loader.recent_bad).keys() == reasons.keys()
    for key, reason in loader.recent_bad:
        assert reasons[key] in reason, (key, reason)
        assert any(key in record.getMessage() for record in caplog.records)


def test_bad_sample_ceiling_stops_with_a_clear_error(tmp_path):
    reasons = _bad_sample_shards(tmp_path / "mixed")
    loader = build_clip_loader(loader_config(str(tmp_path / "mixed"), resample=False, max_bad_fraction=0.2,
                                             bad_fraction_min_samples=5), 0, 1)
    with pytest.raises(BadSampleCeilingError, match="max_bad_fraction") as info:
        list(loader)
    assert any(f"{key}: " in str(info.value) for key in reasons)


def test_configured_face_reenactor_builds_in_workers_and_only_changes_the_face_maps(portrait_shards):
    settings = dict(with_face=True, scene_probability=0.5, batches_per_epoch=3, num_workers=2, start_method="spawn")
    plain = list(build_clip_loader(loader_config(portrait_shards, **settings), 0, 1))
    reenacted = list(build_clip_loader(loader_config(
        portrait_shards, face_reenactor="tests.data.reenactors:constant_face",
        face_reenactor_kwargs={"value": 0.5}, **settings), 0, 1))
    grey = torch.tensor(128 / 255)   # 0.5 as the uint8 the worker ships, scaled back
    for before, after in zip(plain, reenacted, strict=True):
        assert after["__key__"] == before["__key__"]
        for name in ("video", "reference", "pose"):
            assert torch.equal(after[name], before[name]), name
        face = after["face"]
        assert set(face.unique().tolist()) <= {0.0, grey.item()}
        assert torch.all(face[before["face"] > 0] == grey)   # the hook's frames fill the same masks
        human = ~after["is_scene"]
        if human.any():
            assert (face[human] == grey).any()


@pytest.mark.parametrize("target, message", [
    ("tests.data.reenactors", "must be 'package.module:attribute'"),
    ("tests.data.no_such_module:f", "cannot import 'tests.data.no_such_module'"),
    ("tests.data.reenactors:missing", "has no 'missing'"),
    ("tests.data.reenactors:NOT_CALLABLE", "is not callable"),
])
def test_bad_face_reenactor_is_rejected_naming_it(portrait_shards, target, message):
    with pytest.raises(ValueError, match=message):
        build_clip_loader(loader_config(portrait_shards, with_face=True, face_reenactor=target), 0, 1)


def test_face_reenactor_without_face_maps_is_a_config_error(portrait_shards):
    with pytest.raises(ValueError, match="with_face is false"):
        build_clip_loader(loader_config(portrait_shards, face_reenactor="tests.data.reenactors:constant_face"), 0, 1)


def test_loader_workers_ignore_ctrl_c_so_the_main_process_can_save_the_step(portrait_shards):
    """Ctrl-C reaches every process of the terminal's foreground group; the training process saves
    the finished step and stops its workers itself, so a worker must not die of it first."""
    import multiprocessing
    import os
    import signal

    loader = build_clip_loader(loader_config(portrait_shards, num_workers=2, batches_per_epoch=6), 0, 1)
    batches = iter(loader)
    next(batches), next(batches)  # one batch from each worker (round robin): both are iterating
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    assert len(list(batches)) == 4  # without the fix: "DataLoader worker ... exited unexpectedly"
