"""N weighted data sources (data.sources): draw frequencies, exact resume, per-source counts and
bad-sample ceiling, the batch's ``source`` entry, config errors, and the two-key configs
(shards / scene_shards / scene_probability) giving exactly the samples they gave before sources
existed (tests/data/legacy_samples.json, recorded from commit 4dec446 with the cases below)."""
import copy
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from datapipes import shards
from datapipes.loader import BadSampleCeilingError, ClipLoaderConfig, build_clip_loader
from datapipes.synthetic import synthetic_sample, write_synthetic_shards
from tests.data.conftest import loader_config

LEGACY = json.loads((Path(__file__).parent / "legacy_samples.json").read_text())


def _keyed_set(directory, prefix: str, kind: str, count: int, seed: int, truncate: bool = False) -> str:
    """``count`` synthetic clips of ``kind`` keyed ``<prefix>-<i>`` (so a key tells its set)."""
    with shards.ShardSink(str(directory), prefix, max_count=2) as sink:
        for i in range(count):
            sample = dict(synthetic_sample(kind, i, seed, 12, 64, 32), __key__=f"{prefix}-{i}")
            if truncate:
                sample["mp4"] = sample["mp4"][: len(sample["mp4"]) // 2]
            sink.write(sample)
    return str(directory)


@pytest.fixture(scope="module")
def scene_only_shards(tmp_path_factory) -> str:
    """3 scene clips, one per shard: the legacy cases' separate scene source."""
    out = tmp_path_factory.mktemp("scenes") / "shards"
    write_synthetic_shards(str(out), human=0, scene=3, frames=12, height=64, width=32, seed=3, shard_size=1)
    return str(out)


@pytest.fixture(scope="module")
def three_sets(tmp_path_factory, portrait_shards) -> dict:
    root = tmp_path_factory.mktemp("three")
    return {"dance": portrait_shards,   # 10 human + 6 scene clips: the human source skips the scenes
            "second": _keyed_set(root / "second", "second", "human", 5, seed=4),
            "nature": _keyed_set(root / "nature", "nature", "scene", 4, seed=5)}


def _three_sources(sets, weights=(5, 3, 2), **overrides):
    sources = {"dance": {"shards": sets["dance"], "weight": weights[0], "kind": "human"},
               "second": {"shards": sets["second"], "weight": weights[1], "kind": "human"},
               "nature": {"shards": sets["nature"], "weight": weights[2], "kind": "scene"}}
    return loader_config(None, scene_probability=None, sources=sources, **overrides)


def _samples(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for batch in loader:
            out += [(key, int(source), tuple(batch["frame_index"][i].tolist()), int(batch["reference_index"][i]))
                    for i, (key, source) in enumerate(zip(batch["__key__"], batch["source"]))]
    return out


# ----------------------------------------------------------------------------- the two-key configs


def _legacy_cases(portrait, landscape, scenes):
    """The configs recorded in legacy_samples.json: (config, rank, world size)."""
    p, l, s = portrait, landscape, scenes
    return {
        "one_stream_p03_two_workers": (loader_config(p, scene_probability=0.3, num_workers=2, batches_per_epoch=8), 1, 2),
        "scene_shards_p03": (loader_config(p, scene_shards=s, scene_probability=0.3, batches_per_epoch=8), 0, 1),
        "stream_mix_null": (loader_config(p, scene_probability=None, batches_per_epoch=6), 0, 1),
        "p0": (loader_config(p, scene_probability=0.0, batches_per_epoch=4), 0, 1),
        "p1_scene_shards": (loader_config(p, scene_shards=s, scene_probability=1.0, batches_per_epoch=3), 0, 1),
        "buckets_p04": (loader_config([p, l], buckets=[[64, 32], [32, 64]], scene_probability=0.4, num_frames=2,
                                      batches_per_epoch=6), 0, 1),
        "finite_scene_shards_rank0": (loader_config(p, scene_shards=s, resample=False, batch_size=3), 0, 2),
        "finite_scene_shards_rank1": (loader_config(p, scene_shards=s, resample=False, batch_size=3), 1, 2),
    }


def _legacy_samples(loader):
    """Key, clip frames, reference frame and is_scene of every sample (the format recorded)."""
    return [[key, batch["frame_index"][i].tolist(), int(batch["reference_index"][i]), bool(batch["is_scene"][i])]
            for batch in loader for i, key in enumerate(batch["__key__"])]


@pytest.mark.parametrize("case", sorted(LEGACY["cases"]))
def test_two_key_configs_give_the_samples_they_gave_before_sources(case, portrait_shards, landscape_shards,
                                                                   scene_only_shards):
    cfg, rank, world = _legacy_cases(portrait_shards, landscape_shards, scene_only_shards)[case]
    assert _legacy_samples(build_clip_loader(cfg, rank, world)) == LEGACY["cases"][case]


def test_two_key_configs_keep_their_fingerprint_and_resume_from_a_state_saved_before_sources(
        portrait_shards, landscape_shards, scene_only_shards):
    # Remote urls are not checked, so this fingerprint does not depend on where the shards lie.
    remote = ClipLoaderConfig(shards=["pipe:cat /x/a.tar"], scene_shards=["pipe:cat /x/b.tar"], scene_probability=0.3)
    assert build_clip_loader(remote, 0, 1)._fingerprint() == LEGACY["fingerprint_remote"]
    cfg, rank, world = _legacy_cases(portrait_shards, landscape_shards, scene_only_shards)["scene_shards_p03"]
    resumed = build_clip_loader(cfg, rank, world)
    state = copy.deepcopy(LEGACY["state_after_3_scene_shards_p03"])   # saved after 3 batches of 2
    state["fingerprint"] = resumed._fingerprint()  # recorded with other shard paths, same shards
    resumed.load_state_dict(state)
    assert _legacy_samples(resumed) == LEGACY["cases"]["scene_shards_p03"][6:]


def test_two_key_config_is_two_named_sources(portrait_shards, scene_only_shards):
    loader = build_clip_loader(loader_config(portrait_shards, scene_shards=scene_only_shards, scene_probability=0.3), 0, 1)
    assert loader.source_names == ["human", "scene"]
    assert [(s.kind, s.weight) for s in loader.sources] == [("human", 0.7), ("scene", 0.3)]
    assert len(loader.shard_sets) == 2 and loader.source_sets == [0, 1]
    one_stream = build_clip_loader(loader_config(portrait_shards), 0, 1)
    assert one_stream.source_sets == [0, 0] and len(one_stream.shard_sets) == 1   # split by kind


# ----------------------------------------------------------------------------- N sources


def test_three_sources_are_drawn_at_their_weights_and_counted_per_source(three_sets):
    cfg = _three_sources(three_sets, num_frames=1, frame_stride=1, batch_size=10, batches_per_epoch=50)
    loader = build_clip_loader(cfg, 0, 1)
    assert loader.source_names == ["dance", "second", "nature"]
    batches = list(loader)
    sources = torch.cat([b["source"] for b in batches])
    assert sources.dtype == torch.int64 and len(sources) == 500
    counts = Counter(sources.tolist())
    # Fixed seed: deterministic. Binomial standard errors on 500 draws are 0.018-0.022, the
    # tolerance 0.1 about 5 of them.
    for index, weight in enumerate((0.5, 0.3, 0.2)):
        assert abs(counts[index] / 500 - weight) < 0.1, (index, counts)
    for batch in batches:
        for key, source, scene in zip(batch["__key__"], batch["source"].tolist(), batch["is_scene"].tolist()):
            assert scene == (source == 2)   # is_scene comes from the kind
            # The scene source also takes the scenes met in the human source "dance"'s shards.
            assert key.startswith({0: ("human-",), 1: ("second-",), 2: ("nature-", "scene-")}[source]), (key, source)
    stats = loader.stats()
    for index, name in enumerate(loader.source_names):
        assert stats[f"{name}/samples_drawn"] == counts[index] and stats[f"{name}/bad_samples"] == 0
    assert stats["samples_drawn"] == 500


@pytest.mark.parametrize("stop_after", [3, 7])
def test_resume_with_three_sources_yields_the_uninterrupted_samples(three_sets, stop_after):
    # Two workers; the human source "dance" reads shards that also hold scenes, held back for
    # "nature": the state carries three sources' shard positions and that queue.
    cfg = _three_sources(three_sets, num_workers=2, batches_per_epoch=5, num_frames=2)
    expected = _samples(build_clip_loader(cfg, 0, 1), epochs=2)
    interrupted = build_clip_loader(cfg, 0, 1)
    got = []
    while len(got) < 2 * stop_after:
        for batch in interrupted:
            got += _samples([batch])
            if len(got) == 2 * stop_after:
                break
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    assert state["source_samples_drawn"] == dict(zip(interrupted.source_names, interrupted.source_drawn))
    resumed = build_clip_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    counters = lambda loader: {k: v for k, v in loader.stats().items() if k != "fresh_shm_batches"}  # noqa: E731
    assert counters(resumed) == counters(interrupted)
    while len(got) < len(expected):
        got += _samples(resumed)
    assert got == expected
    assert {source for _, source, _, _ in expected} == {0, 1, 2}


def test_resume_refuses_other_weights(three_sets):
    loader = build_clip_loader(_three_sources(three_sets), 0, 1)
    next(iter(loader))
    with pytest.raises(ValueError, match="fingerprint"):
        build_clip_loader(_three_sources(three_sets, weights=(5, 3, 3)), 0, 1).load_state_dict(loader.state_dict())


def test_finite_pass_over_three_sources_sees_every_sample_once_across_ranks(three_sets):
    keys, sources = [], Counter()
    for rank in range(2):
        for batch in build_clip_loader(_three_sources(three_sets, resample=False, num_workers=2, batch_size=3), rank, 2):
            keys += batch["__key__"]
            sources.update(batch["source"].tolist())
    expected = [key for spec in three_sets.values()
                for key in (s.key for s in _read_all(spec))]
    assert Counter(keys) == Counter(expected)
    # Every clip of a source's shards belongs to it, except the scenes in "dance", which belong
    # to the scene source "nature".
    assert sources == {0: 10, 1: 5, 2: 4 + 6}


def _read_all(spec):
    reader = shards.TarSampleReader(shards.expand_shard_urls(spec))
    samples = [s for i in range(len(reader.urls)) for s in reader.iter_shard(i)]
    reader.close()
    return samples


def test_bad_sample_ceiling_applies_per_source_and_names_it(three_sets, tmp_path):
    broken = _keyed_set(tmp_path / "broken", "broken", "human", 4, seed=6, truncate=True)
    sources = {"dance": {"shards": three_sets["dance"], "weight": 9, "kind": "human"},
               "broken": {"shards": broken, "weight": 1, "kind": "human"}}
    cfg = loader_config(None, scene_probability=None, sources=sources, num_frames=1, batches_per_epoch=500,
                        max_bad_fraction=0.3, bad_fraction_min_samples=10)
    loader = build_clip_loader(cfg, 0, 1)
    with pytest.raises(BadSampleCeilingError, match="of source 'broken' on rank 0") as info:
        list(loader)
    assert "broken-" in str(info.value) and "cannot decode" in str(info.value)
    stats = loader.stats()
    # Over all sources the rate is far below the ceiling: only the per-source check stops this.
    assert stats["broken/bad_fraction"] == 1.0 and stats["bad_fraction"] < 0.3
    assert stats["dance/bad_samples"] == 0 and stats["broken/samples_drawn"] == 10


def test_a_source_without_the_face_condition_has_blank_face_maps(three_sets):
    sources = {"faces": {"shards": three_sets["dance"], "kind": "human"},
               "no_faces": {"shards": three_sets["second"], "kind": "human", "conditions": ["pose"]}}
    cfg = loader_config(None, scene_probability=None, sources=sources, with_face=True, batches_per_epoch=4)
    seen = set()
    for batch in build_clip_loader(cfg, 0, 1):
        for face, pose, source in zip(batch["face"], batch["pose"], batch["source"].tolist()):
            seen.add(source)
            assert pose.amax() > 0.5                        # both provide pose
            assert (face.abs().sum() == 0) == (source == 1)  # only "faces" provides face maps
    assert seen == {0, 1}


@pytest.mark.parametrize("change, message", [
    (dict(sources={}), "sources must map names to {shards, weight, kind}, got {}"),
    (dict(sources={"a": {"shards": "x", "kind": "robot"}}), "sources.a.kind must be one of ['human', 'scene', 'mixed'], got 'robot'"),
    (dict(sources={"a": {"shards": "x", "kind": "human", "weight": 0}}), "sources.a.weight must be a number > 0, got 0"),
    (dict(sources={"a": {"shards": "x", "kind": "human", "weight": -1.5}}), "sources.a.weight must be a number > 0, got -1.5"),
    (dict(sources={"a": {"shards": "x", "kind": "human", "wieght": 1}}), "sources.a: unknown keys ['wieght']"),
    (dict(sources={"a": {"kind": "human"}}), "sources.a.shards is not set"),
    (dict(sources={"a": {"shards": "x", "kind": "scene", "conditions": ["pose"]}}),
     "sources.a.conditions must be [] (scene clips carry none), got ['pose']"),
    (dict(sources={"a b": {"shards": "x", "kind": "human"}}), "sources: name 'a b' must be letters"),
    (dict(sources={"a": {"shards": "x", "kind": "human"}}, scene_shards="y"),
     "sources and scene_shards are both set: with sources, set scene_shards=null"),
    (dict(sources={"a": {"shards": "x", "kind": "human"}}, shards="x", scene_probability=0.25),
     "sources and shards, scene_probability are both set"),
])
def test_bad_source_config_is_one_line_naming_the_key(change, message):
    values = dict(shards=None, scene_probability=None)
    values.update(change)
    with pytest.raises(ValueError) as info:
        build_clip_loader(loader_config(**values), 0, 1)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_source_shard_errors_name_the_source(three_sets, tmp_path):
    missing = {"a": {"shards": three_sets["second"], "kind": "human"},
               "b": {"shards": str(tmp_path / "nowhere"), "kind": "scene"}}
    with pytest.raises(FileNotFoundError, match=r"^data\.sources\.b\.shards: shard .*nowhere"):
        build_clip_loader(loader_config(None, scene_probability=None, sources=missing), 0, 1)
    twice = {"a": {"shards": three_sets["dance"], "kind": "human"},
             "b": {"shards": three_sets["dance"], "kind": "mixed"}}
    with pytest.raises(ValueError, match="sources.a and sources.b both take the human clips of the same shards"):
        build_clip_loader(loader_config(None, scene_probability=None, sources=twice), 0, 1)
