"""Elastic data position (docs/data.md, *Resuming*): a loader state gathered from N ranks x W
workers resumes on M ranks x V workers. Finite passes deliver every sample of the interrupted
epoch exactly once across the change; resampled streams get fresh generators, keep pending
samples and the epoch's global batch count."""
import math
import pickle
from collections import Counter

import numpy as np
import pytest

from datapipes import shards
from datapipes.clips import load_clip
from datapipes.loader import build_clip_loader, worker_generator
from tests.data.conftest import loader_config
from tests.data.test_loader import _all_keys
from tests.data.test_sources import _three_sources, three_sets  # noqa: F401 (fixture)


def _keys(batches):
    return [key for batch in batches for key in batch["__key__"]]


def _run(cfg, world, stop_after=None, state=None):
    """Every rank of ``world`` resumed from ``state`` (gathered form), each stopped after
    ``stop_after`` batches (None: the whole epoch). Returns (delivered keys, gathered state)."""
    keys, states = [], {}
    for rank in range(world):
        loader = build_clip_loader(cfg, rank, world)
        if state is not None:
            loader.load_state_dict(pickle.loads(pickle.dumps(state)))
        taken = 0
        for batch in loader:
            keys += batch["__key__"]
            taken += 1
            if taken == stop_after:
                break
        states[rank] = loader.state_dict()
    return keys, {"ranks": states}


def _epoch(*specs):
    """Every sample key of the shard sets ``specs``: one finite epoch."""
    return Counter(_all_keys(list(specs)))


def _finite(shard_spec, workers, **overrides):
    values = dict(resample=False, num_workers=workers, batch_size=3, num_frames=1)
    values.update(overrides)
    return loader_config(shard_spec, **values)


@pytest.mark.parametrize("onto", [(1, 1), (3, 2)])
def test_finite_pass_from_two_ranks_of_two_workers_delivers_the_rest_exactly_once(portrait_shards, landscape_shards, onto):
    # Two buckets: the old workers hold pending samples (drawn, not delivered) in the state.
    spec = [portrait_shards, landscape_shards]
    settings = dict(buckets=[[64, 32], [32, 64]], batch_size=3)
    before, state = _run(_finite(spec, 2, **settings), 2, stop_after=2)
    assert len(before) == 12
    assert any(w["pending"] != [[], []] for s in state["ranks"].values() for w in s["workers"].values())
    after, _ = _run(_finite(spec, onto[1], **settings), onto[0], state=state)
    assert Counter(before + after) == _epoch(*spec)


def test_finite_pass_one_rank_onto_two_then_three_then_one(portrait_shards, caplog):
    # 1 -> 2 ranks, a same-size resume of the elastic epoch, then 2 x 2 -> 3 x 1 -> 1 x 1: the
    # state of an elastically resumed epoch carries its deal and can change size again.
    cfg = lambda workers: _finite(portrait_shards, workers, batch_size=1)  # noqa: E731
    delivered, state = _run(cfg(0), 1, stop_after=2)
    with caplog.at_level("WARNING", logger="datapipes.loader"):
        keys, state = _run(cfg(2), 2, stop_after=1, state=state)
    assert [r.getMessage() for r in caplog.records] == ["data: resumed from 1 ranks x 1 workers onto 2 ranks x 2 workers"]
    delivered += keys
    keys, state = _run(cfg(2), 2, stop_after=1, state=state)   # same size: exact, no line
    delivered += keys
    keys, state = _run(cfg(1), 3, stop_after=1, state=state)
    delivered += keys
    assert len(set(delivered)) == len(delivered) == 2 + 2 + 2 + 3
    keys, _ = _run(cfg(0), 1, state=state)
    assert Counter(delivered + keys) == _epoch(portrait_shards)


def test_finite_pass_with_fewer_pieces_than_new_workers_splits_them_by_sample(landscape_shards):
    # 2 shards, one partly read: 2 pieces of work for 2 ranks x 2 workers. Split by sample, every
    # new rank gets some (dealt whole, rank 1 would idle while rank 0 reads both).
    cfg = lambda workers: _finite(landscape_shards, workers, batch_size=1, height=32, width=64)  # noqa: E731
    before, state = _run(cfg(0), 1, stop_after=1)
    after = {}
    for rank in range(2):
        loader = build_clip_loader(cfg(2), rank, 2)
        loader.load_state_dict(state)
        after[rank] = _keys(loader)
    assert all(after.values()), after
    assert Counter(before + after[0] + after[1]) == _epoch(landscape_shards)


def test_finite_pass_over_three_sources_resumes_onto_other_sizes(three_sets):  # noqa: F811
    cfg = lambda workers: _three_sources(three_sets, resample=False, num_workers=workers, batch_size=3)  # noqa: E731
    before, state = _run(cfg(2), 2, stop_after=1)
    after, _ = _run(cfg(1), 3, state=state)
    assert Counter(before + after) == _epoch(*three_sets.values())


def _samples(batches):
    return [(key, tuple(batch["frame_index"][i].tolist()), int(batch["reference_index"][i]))
            for batch in batches for i, key in enumerate(batch["__key__"])]


def test_resampled_pending_samples_are_delivered_with_their_own_seeds(portrait_shards, landscape_shards):
    # Two buckets: old workers hold drawn, decoded, undelivered samples; the new worker gets them.
    cfg = lambda workers: loader_config([portrait_shards, landscape_shards], num_workers=workers, batch_size=3,  # noqa: E731
                                        num_frames=2, buckets=[[64, 32], [32, 64]], batches_per_epoch=6)
    _, state = _run(cfg(2), 2, stop_after=4)
    loader = build_clip_loader(cfg(0), 0, 1)
    refs = [ref for s in state["ranks"].values() for w in s["workers"].values() for bucket in w["pending"] for ref in bucket]
    assert refs, "the test needs samples pending in the saved state"
    reader = shards.TarSampleReader(loader.shard_sets[0])
    expected = []
    for shard, offset, seed in refs:   # what the old worker would have delivered
        raw = reader.read(shard, offset)[0]
        sample = load_clip(raw, loader.cfg.clip_spec(), np.random.default_rng(seed))[1]
        expected.append((raw.key, tuple(sample["frame_index"].tolist()), int(sample["reference_index"])))
    reader.close()
    loader.load_state_dict(state)
    assert {len(bucket) for w in state["ranks"][1]["workers"].values() for bucket in w["pending"]} == {0, 2}
    # 2 ranks x 2 remaining batches onto 1 rank: 4 more (len counts the 4 done).
    assert len(loader) == 4 + 4
    after = _samples(list(loader))
    assert len(after) == 4 * 3 and not Counter(expected) - Counter(after)


def test_resampled_streams_are_new_and_the_epoch_keeps_its_global_batch_count(portrait_shards):
    # One bucket of batch size 1 and one mixed source: nothing pending or held back, so a new
    # worker's samples are its generator's alone.
    cfg = lambda workers: loader_config(portrait_shards, num_workers=workers, batch_size=1,  # noqa: E731
                                        scene_probability=None, batches_per_epoch=6)
    old = {rank: _samples(build_clip_loader(cfg(2), rank, 2)) for rank in range(2)}   # never stopped
    _, state = _run(cfg(2), 2, stop_after=2)
    # 2 ranks x 4 remaining batches = 8, on 3 ranks: ceil(8 / 3) = 3 each (len counts the 2 done).
    resumed = [build_clip_loader(cfg(1), rank, 3) for rank in range(3)]
    for loader in resumed:
        loader.load_state_dict(pickle.loads(pickle.dumps(state)))
        assert len(loader) == 2 + math.ceil(8 / 3) and loader.resumed_from == {"ranks": 2, "workers": 2}
    after = [_samples(loader) for loader in resumed]
    assert [len(samples) for samples in after] == [3, 3, 3]
    for rank, new in enumerate(after):   # no new stream repeats an old one's first draws
        for old_rank, old_samples in old.items():
            for worker in range(2):
                assert new != old_samples[worker::2][:3], (rank, old_rank, worker)
    # The next epoch is batches_per_epoch long again and its state an ordinary one.
    assert len(_samples(resumed[0])) == 6 and len(resumed[0]) == 6
    assert "generation" not in resumed[0].state_dict()


def test_elastic_generators_differ_from_every_earlier_stream():
    first_draws = Counter()
    for generation, (ranks, workers) in enumerate([(2, 2), (3, 2), (1, 1), (2, 2)]):
        for rank in range(ranks):
            for worker in range(workers):
                first_draws[tuple(worker_generator(0, 0, rank, worker, generation).integers(2 ** 63, size=4))] += 1
    assert len(first_draws) == 4 + 6 + 1 + 4 and set(first_draws.values()) == {1}


def test_elastic_resume_refuses_another_shard_list_config_or_a_missing_rank(portrait_shards, landscape_shards):
    _, state = _run(_finite(portrait_shards, 1), 2, stop_after=1)
    with pytest.raises(ValueError, match=r"fingerprint .* \(shard list changed: shards per set \[8\] -> \[10\]\)"):
        build_clip_loader(_finite([portrait_shards, landscape_shards], 1), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data config changed: batch_size 3 -> 2\)"):
        build_clip_loader(_finite(portrait_shards, 1, batch_size=2), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks ranks \[1\]"):
        build_clip_loader(_finite(portrait_shards, 1), 0, 1).load_state_dict({"ranks": {0: state["ranks"][0]}})
    # A single rank's state (not the gathered form) still resumes only that rank, as before.
    with pytest.raises(ValueError, match="world_size 2 -> 1"):
        build_clip_loader(_finite(portrait_shards, 1), 0, 1).load_state_dict(state["ranks"][0])


def test_an_elastically_resumed_epoch_resumes_on_the_same_size_exactly(portrait_shards, landscape_shards):
    cfg = lambda workers: loader_config([portrait_shards, landscape_shards], num_workers=workers, batch_size=3,  # noqa: E731
                                        num_frames=2, buckets=[[64, 32], [32, 64]], batches_per_epoch=6)
    _, state = _run(cfg(2), 2, stop_after=4)
    straight = build_clip_loader(cfg(2), 0, 1)
    straight.load_state_dict(state)
    expected = _samples(list(straight))   # the rest of the elastic epoch, never stopped
    assert len(expected) == 3 * 4
    interrupted = build_clip_loader(cfg(2), 0, 1)
    interrupted.load_state_dict(state)
    got, again = [], None
    for batch in interrupted:
        got += _samples([batch])
        if len(got) == 3:
            again = build_clip_loader(cfg(2), 0, 1)
            again.load_state_dict(pickle.loads(pickle.dumps({"ranks": {0: interrupted.state_dict()}})))
            break
    assert again.resumed_from is None and len(again) == len(straight) == 4 + 4
    assert got + _samples(list(again)) == expected


def test_zero_and_one_workers_are_the_same_position(portrait_shards):
    # num_workers 0 (in-process) and 1 (one worker process) both run one logical worker.
    expected = _samples(build_clip_loader(loader_config(portrait_shards, num_workers=0), 0, 1))
    _, state = _run(loader_config(portrait_shards, num_workers=0), 1, stop_after=2)
    resumed = build_clip_loader(loader_config(portrait_shards, num_workers=1), 0, 1)
    resumed.load_state_dict(state)
    assert resumed.resumed_from is None
    assert expected[:4] + _samples(resumed) == expected
