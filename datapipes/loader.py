"""Streaming clip loader: shards -> collated batches, for many ranks and workers, resumable.

How it works (details in docs/data.md):

* Every DataLoader worker runs a :class:`_WorkerStream` for one *logical* worker
  ``(rank, w)``. It reads samples by ``(shard, byte offset)`` through
  :class:`~datapipes.shards.TarSampleReader`, decodes clips with decord inside the worker and
  batches them per aspect-ratio bucket, so a batch never mixes shapes.
* ``resample=True`` (training): each worker draws shards at random with its own generator,
  seeded from ``(seed, epoch, rank, worker)``, keeps ``open_shards`` of them interleaved, and
  produces an exact quota of batches so every rank yields ``batches_per_epoch`` batches.
  Each sample comes from one of the weighted ``sources`` (:class:`DataSource`), drawn with
  probability weight / sum of weights from the same generator; harmonic data fusion is the
  two-source case human + scene (``scene_probability`` is the scene source's weight).
* ``resample=False`` (evaluation, inspection): one pass over every shard set; each set's shards
  (or, with fewer shards than workers in total, samples) are dealt to the
  ``world_size * num_workers`` workers so every sample is seen exactly once.
* Each batch carries its worker's state *after* the batch; the main process keeps the state
  of the last consumed batch of every worker. That is the loader's ``state_dict()``: byte
  offsets, pending bucket entries and generator states, a few hundred bytes per worker.
  A resumed loader rebuilds each worker exactly and continues the round-robin where it
  stopped, so it yields exactly the batches an uninterrupted loader would have.
* Every rank's states gathered resume on another world size or worker count
  (:meth:`ClipLoader.load_elastic`): the old workers' remaining work is dealt to the new ones,
  exactly once in a finite pass; resampled streams are re-derived (:func:`worker_generator`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datapipes import schema, shards
from datapipes.batch_buffers import ReleaseBoard, WorkerBuffers
from datapipes.clips import (BadSample, ImportedFaceReenactor, collate, images_nbytes, load_clip,
                             to_batch_contract)
# The data config lives in a light module (the config checks import no torch); its names are
# this module's too.
from datapipes.loader_config import (OUTPUT_DTYPES, SOURCE_FIELDS, SOURCE_KINDS,  # noqa: F401
                                     ClipLoaderConfig, DataSource, config_from_dict)

log = logging.getLogger(__name__)

STATE_VERSION = 1
_META = "_loader"  # private batch entry carrying worker state; removed before batches leave
# Spawn key of the generators an elastic resume re-derives, (ELASTIC_TAG, generation): distinct
# from the streams (seed, epoch, rank, worker) of every earlier generation of the same epoch.
ELASTIC_TAG = zlib.crc32(b"elastic resume")


def shard_sets(cfg: ClipLoaderConfig) -> tuple[list[list[str]], list[int]]:
    """``(shard sets, the set of each source)``: every source's shards expanded, sources on the
    same shards sharing one set (one stream of samples split by kind). A missing path raises
    ``FileNotFoundError`` naming its key (``data.sources.<name>.shards: ...``); two sources that
    would take the same clips of the same shards raise ``ValueError``."""
    sets: list[list[str]] = []
    of_source: list[int] = []
    taken: dict[tuple[int, str], str] = {}
    for source in cfg.data_sources():
        try:
            urls = shards.expand_shard_urls(source.shards)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"data.{source.shards_key}: {error}") from None
        if urls not in sets:
            sets.append(urls)
        index = sets.index(urls)
        of_source.append(index)
        for kind in SOURCE_KINDS[source.kind]["clips"]:
            other = taken.setdefault((index, kind), source.name)
            if other != source.name:
                raise ValueError(f"invalid data config: sources.{other} and sources.{source.name} both take "
                                 f"the {kind} clips of the same shards: make them one source (weights add)")
    if cfg.latents:  # one line now, rather than every sample skipped as bad later
        _latents_records(cfg, sets, of_source)
    return sets, of_source


def _latents_records(cfg: ClipLoaderConfig, sets: list[list[str]], of_source: list[int]) -> dict[str, dict]:
    from datapipes.latents import check_shard_set

    named = {index: source.shards_key for source, index in reversed(list(zip(cfg.data_sources(), of_source)))}
    return {f"data.{key}": check_shard_set(sets[index], cfg.clip_spec().buckets, cfg.crop, f"data.{key}")
            for index, key in sorted(named.items())}


def latents_records(cfg: ClipLoaderConfig) -> dict[str, dict]:
    """Per shard set of ``data.latents=true`` (by its config key), the latents record of its first
    sample (crop, resolution, the VAE that encoded it), checked against the clip as
    :func:`shard_sets` does; the trainer checks the VAE against the model's."""
    return _latents_records(cfg, *shard_sets(cfg))


class BadSampleCeilingError(RuntimeError):
    """Too many corrupt samples: the data is broken, training on it would be silently wrong."""


# --------------------------------------------------------------------------- worker side


@dataclass
class _Plan:
    """Everything a worker needs, picklable for any start method."""
    cfg: ClipLoaderConfig
    rank: int
    world_size: int
    num_workers: int               # logical workers per rank (>= 1)
    shard_sets: list[list[str]]    # distinct shard url lists (shard_sets())
    sources: list[DataSource]
    source_sets: list[int]         # the shard set of each source
    epoch: int
    batches_done: int              # consumed batches of this epoch at (re)start
    worker_states: dict            # logical worker -> state after its last consumed batch
    face_reenactor: Any = None
    release_board: ReleaseBoard | None = None  # with workers and shm_buffers > 0
    epoch_batches: int = 0         # this rank's batches in this epoch (resample)
    generation: int = 0            # elastic resumes within this epoch (0: none)
    elastic_deal: dict = dataclasses.field(default_factory=dict)  # worker -> work dealt on resume


def worker_generator(seed: int, epoch: int, rank: int, worker: int, generation: int = 0) -> np.random.Generator:
    """The generator of logical worker ``(rank, worker)`` in ``epoch``: seeded from
    ``(seed, epoch, rank, worker)``; after the ``generation``-th elastic resume within the epoch
    with the spawn key ``(ELASTIC_TAG, generation)`` too, so no stream repeats an earlier one."""
    spawn_key = () if generation == 0 else (ELASTIC_TAG, generation)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, rank, worker],
                                                                      spawn_key=spawn_key)))


def _finite_deal(shard_ids: list[int], seed: int, epoch: int, shard_set: int, global_worker: int,
                 total: int) -> tuple[list[int], int, int]:
    """``(shards, stride, phase)`` of global worker ``global_worker`` of ``total`` in a finite pass
    over one shard set: the same permutation on every rank, so that the deal partitions the set."""
    order = list(shard_ids)
    np.random.default_rng([seed, epoch, shard_set]).shuffle(order)
    if len(order) >= total:  # deal shards
        return order[global_worker::total], 1, 0
    return order, total, global_worker  # too few shards: every worker reads all, keeps every total-th


class _Run:
    """Part of a finite pass: ``shards`` read in order from ``(cursor, offset)``, keeping the
    samples whose running count (``counter``, over the whole run) is ``phase`` modulo ``stride``."""

    def __init__(self, shards_: list[int], stride: int = 1, phase: int = 0, cursor: int = 0,
                 offset: int = 0, counter: int = 0):
        self.shards, self.stride, self.phase = [int(s) for s in shards_], int(stride), int(phase)
        self.cursor, self.offset, self.counter = int(cursor), int(offset), int(counter)

    def state(self) -> list:
        return [list(self.shards), self.stride, self.phase, self.cursor, self.offset, self.counter]

    def next(self, reader: shards.TarSampleReader) -> shards.RawSample | None:
        """The run's next sample, or ``None`` when it is over."""
        while self.cursor < len(self.shards):
            sample, next_offset = reader.read(self.shards[self.cursor], self.offset)
            if next_offset is None:
                self.cursor, self.offset = self.cursor + 1, 0
            else:
                self.offset = next_offset
            if sample is None:
                continue
            self.counter += 1
            if (self.counter - 1) % self.stride == self.phase:
                return sample
        return None

    def pieces(self) -> list["_Run"]:
        """The rest of the run as independent runs: one per shard when every sample is kept
        (the counter then does not matter), else the run itself (its counter spans shards)."""
        if self.cursor >= len(self.shards):
            return []
        if self.stride > 1:
            return [self]
        return [_Run([shard], offset=self.offset if i == 0 else 0)
                for i, shard in enumerate(self.shards[self.cursor:])]

    def split(self, parts: int) -> list["_Run"]:
        """``parts`` runs over the same bytes that together keep exactly this run's samples."""
        return [_Run(self.shards, self.stride * parts, self.phase + j * self.stride, self.cursor, self.offset,
                     self.counter) for j in range(parts)]


class _ShardStream:
    """One shard set as a sample stream of one logical worker, addressed by byte offsets."""

    def __init__(self, index: int, shard_ids: list[int], plan: _Plan, worker: int,
                 rng: np.random.Generator, reader: shards.TarSampleReader):
        # shard_ids index the reader's url list, which holds every shard set's shards.
        self.index, self.shard_ids, self.rng, self.reader = index, shard_ids, rng, reader
        self.resample = plan.cfg.resample
        self.open_limit = min(plan.cfg.open_shards, len(shard_ids))
        self.open: list[list[int]] = []      # resample: [[shard, offset], ...]
        if not self.resample:
            self.run = _Run(*_finite_deal(shard_ids, plan.cfg.seed, plan.epoch, index,
                                          plan.rank * plan.num_workers + worker,
                                          plan.world_size * plan.num_workers))

    def state(self) -> list:
        if self.resample:
            return [list(slot) for slot in self.open]
        return [self.run.cursor, self.run.offset, self.run.counter]

    def restore(self, state: list) -> None:
        if self.resample:
            self.open = [list(slot) for slot in state]
        else:
            self.run.cursor, self.run.offset, self.run.counter = state

    def next(self) -> shards.RawSample | None:
        """The next sample, or ``None`` when a finite pass is over."""
        return self._next_resampled() if self.resample else self.run.next(self.reader)

    def _next_resampled(self) -> shards.RawSample:
        empty_reads = 0
        while True:
            while len(self.open) < self.open_limit:
                self.open.append([self.shard_ids[int(self.rng.integers(len(self.shard_ids)))], 0])
            slot = self.open[int(self.rng.integers(len(self.open)))]
            sample, next_offset = self.reader.read(slot[0], slot[1])
            if next_offset is None:
                self.open.remove(slot)
            else:
                slot[1] = next_offset
            if sample is not None:
                return sample
            empty_reads += 1
            if empty_reads > 10 * len(self.shard_ids) + 10:
                urls = [self.reader.urls[i] for i in self.shard_ids]
                raise FileNotFoundError(f"shards {shards.brace_pattern(urls)} hold no samples")


def _owners(sources: list[DataSource], source_sets: list[int], n_sets: int) -> list[dict[str, int]]:
    """For each shard set and clip kind, the source that takes such a clip: the source on that
    set that takes the kind, else (a clip met on the way, e.g. a scene in human shards while
    a separate scene source exists) the first source anywhere that takes it; absent: none does."""
    owners: list[dict[str, int]] = []
    for shard_set in range(n_sets):
        owner = {}
        for kind in shards.KINDS:
            takers = [i for i, source in enumerate(sources) if kind in SOURCE_KINDS[source.kind]["clips"]]
            here = [i for i in takers if source_sets[i] == shard_set]
            if here or takers:
                owner[kind] = (here or takers)[0]
        owners.append(owner)
    return owners


class _WorkerStream:
    """The batches of one logical worker (runs inside a DataLoader worker process)."""

    def __init__(self, plan: _Plan, worker: int, quota: int | None,
                 buffers: WorkerBuffers | None = None):
        cfg = plan.cfg
        self.buffers = buffers
        self.plan, self.cfg, self.worker, self.quota = plan, cfg, worker, quota
        self.spec = cfg.clip_spec()
        self.rng = worker_generator(cfg.seed, plan.epoch, plan.rank, worker, plan.generation)
        self.reader = shards.TarSampleReader([url for urls in plan.shard_sets for url in urls])
        base = 0
        self.streams = []
        self.set_of_shard: list[int] = []
        for index, urls in enumerate(plan.shard_sets):
            self.streams.append(_ShardStream(index, list(range(base, base + len(urls))), plan, worker,
                                             self.rng, self.reader))
            self.set_of_shard += [index] * len(urls)
            base += len(urls)
        self.sources = plan.sources
        self.specs = [dataclasses.replace(self.spec, face_tracks="face" in source.conditions)
                      for source in self.sources]
        self.owner = _owners(plan.sources, plan.source_sets, len(plan.shard_sets))
        self.weights = [source.weight for source in self.sources]
        self.total_weight = sum(self.weights)
        # Held-back clips, per source that will take them (one stream split by kind).
        self.queues: dict[str, deque] = {source.name: deque() for source in self.sources}
        self.pending: list[list[tuple[list, dict]]] = [[] for _ in self.spec.buckets]
        self.produced = 0
        self.drawn = [0] * len(self.sources)
        self.bad: list[tuple[str, str, int]] = []
        # Finite pass after an elastic resume: the runs dealt to this worker replace the deal of
        # the shard sets (None: that deal).
        self.runs: list[_Run] | None = None
        state = plan.worker_states.get(worker)
        if state is not None:
            self._restore(state)
        elif plan.generation:
            self._take_deal(plan.elastic_deal.get(worker, {}))

    # -- state
    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state,
                "sources": [stream.state() for stream in self.streams],  # per shard set
                "queues": {kind: [ref for ref, _ in queue] for kind, queue in self.queues.items()},
                "pending": [[ref for ref, _ in bucket] for bucket in self.pending],
                "produced": self.produced,
                **({} if self.runs is None else {"runs": [run.state() for run in self.runs]})}

    def _restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for stream, stream_state in zip(self.streams, state["sources"]):
            stream.restore(stream_state)
        self._take_deal({"queues": state["queues"], "runs": state.get("runs"),
                         "pending": [ref for refs in state["pending"] for ref in refs]})
        self.produced = state["produced"]

    def _take_deal(self, deal: dict) -> None:
        """Held-back clips, pending samples and finite runs from a saved state or an elastic deal."""
        for name, refs in deal.get("queues", {}).items():
            if refs:  # the fingerprint guarantees the name; empty queues of older states may not match
                self.queues[name] = deque((ref, self._reread(ref)) for ref in refs)
        if deal.get("runs") is not None:
            self.runs = [_Run(*run) for run in deal["runs"]]
        for ref in deal.get("pending", []):
            # Pending entries were decoded fine before the checkpoint; rebuilding them from the
            # same bytes and per-sample seed gives the same tensors, in the same bucket and order
            # (and the same source: the owner of the clip's shard set and kind, as when drawn).
            raw = self._reread(ref)
            bucket, sample = self._load(raw, self._owner_in_pass(self.set_of_shard[raw.shard], raw), ref[2])
            self.pending[bucket].append((ref, sample))

    def _reread(self, ref: list) -> shards.RawSample:
        sample, _ = self.reader.read(ref[0], ref[1])
        if sample is None:
            raise RuntimeError(f"resume: no sample at shard {self.reader.urls[ref[0]]!r} offset {ref[1]}")
        return sample

    # -- drawing samples
    def _pick(self) -> int:
        """The source of the next sample: source i with probability weight_i / total."""
        if len(self.sources) == 1:
            return 0
        # One uniform draw against the cumulative weights taken from the last source back: for
        # the two-key config (sources human, scene) that is "scene when u < scene_probability",
        # the draw the loader made before sources existed, so its samples stay the same.
        u = self.rng.random() * self.total_weight
        cumulative, picked = 0.0, None
        for index in reversed(range(len(self.sources))):
            cumulative += self.weights[index]
            if self.weights[index] > 0:
                picked = index
                if u < cumulative:
                    return index
        return picked  # u at the top of the range by rounding: the last source with a weight

    def _draw_raw(self) -> tuple[shards.RawSample | None, int]:
        """``(raw sample, its source)``; ``(None, 0)`` when a finite pass is over."""
        if not self.cfg.resample:
            # One pass over every shard set; each clip belongs to the source of its set and kind.
            while self.runs:  # the runs dealt by an elastic resume, in order
                sample = self.runs[0].next(self.reader)
                if sample is not None:
                    return sample, self._owner_in_pass(self.set_of_shard[sample.shard], sample)
                self.runs.pop(0)
            if self.runs is not None:
                return None, 0
            for index, stream in enumerate(self.streams):
                sample = stream.next()
                if sample is not None:
                    return sample, self._owner_in_pass(index, sample)
            return None, 0
        source_index = self._pick()
        source = self.sources[source_index]
        queue = self.queues[source.name]
        if queue:
            return queue.popleft()[1], source_index
        stream = self.streams[self.plan.source_sets[source_index]]
        wanted = SOURCE_KINDS[source.kind]["clips"]
        misses = 0
        while True:
            sample = stream.next()
            try:
                sample_kind = sample.meta()["kind"]
            except schema.SchemaError:
                return sample, source_index  # let load_clip report it as bad (skipped and counted)
            if sample_kind in wanted:
                return sample, source_index
            # A clip of another kind (e.g. a scene inside human shards) is held back for the
            # source that takes it; a queue is bounded: resampled data is unbounded, dropping
            # keeps memory bounded.
            taker = self.owner[self.set_of_shard[sample.shard]].get(sample_kind)
            if taker is not None:
                other = self.queues[self.sources[taker].name]
                other.append(([sample.shard, sample.offset], sample))
                if len(other) > self.cfg.mix_queue:
                    other.popleft()
            misses += 1
            if misses > 4096:
                urls = self.plan.shard_sets[self.plan.source_sets[source_index]]
                raise ValueError(f"data.{source.shards_key} (source {source.name!r}, weight {source.weight:g}) "
                                 f"asks for {source.kind!r} clips but 4096 samples in a row of "
                                 f"{shards.brace_pattern(urls)} were not {source.kind!r}")

    def _owner_in_pass(self, shard_set: int, sample: shards.RawSample) -> int:
        try:
            owner = self.owner[shard_set].get(sample.meta()["kind"])
        except schema.SchemaError:
            owner = None
        return self.plan.source_sets.index(shard_set) if owner is None else owner

    def _load(self, raw: shards.RawSample, source: int, seed: int) -> tuple[int, dict]:
        bucket, sample = load_clip(raw, self.specs[source], np.random.default_rng(seed), self.plan.face_reenactor)
        sample["source"] = torch.tensor(source, dtype=torch.int64)
        return bucket, sample

    def __iter__(self) -> Iterator[dict]:
        try:
            while self.quota is None or self.produced < self.quota:
                # A bucket can hold more than a batch only after an elastic resume dealt this
                # worker several old workers' pending samples; otherwise this emits a bucket
                # right after the sample that filled it.
                full = next((b for b, entries in enumerate(self.pending) if len(entries) >= self.cfg.batch_size), None)
                if full is not None:
                    yield self._emit(full)
                    continue
                raw, source = self._draw_raw()
                if raw is None:
                    break
                self.drawn[source] += 1
                sample_seed = int(self.rng.integers(2 ** 63))
                try:
                    bucket, sample = self._load(raw, source, sample_seed)
                except BadSample as bad:
                    log.warning("skipping bad sample %s (source %s, shard %s): %s", bad.key,
                                self.sources[source].name, self.reader.urls[raw.shard], bad.reason)
                    self.bad.append((bad.key, bad.reason, source))
                    continue
                self.pending[bucket].append(([raw.shard, raw.offset, sample_seed], sample))
            if self.quota is None:  # finite pass: flush partial batches
                for bucket in range(len(self.pending)):
                    while self.pending[bucket]:
                        yield self._emit(bucket)
                if any(self.drawn):  # bad samples after the last batch still have to be counted
                    yield {_META: self._report()}
        finally:
            self.reader.close()

    def _emit(self, bucket: int) -> dict:
        samples = [sample for _, sample in self.pending[bucket][:self.cfg.batch_size]]
        index, storage = -1, None
        if self.buffers is not None:
            index, storage = self.buffers.take(images_nbytes(samples))
        batch = collate(samples, storage)
        self.pending[bucket] = self.pending[bucket][self.cfg.batch_size:]
        self.produced += 1
        batch[_META] = self._report()
        batch[_META]["buffer"] = index
        return batch

    def _report(self) -> dict:
        report = {"worker": self.worker, "state": self.state(), "drawn": self.drawn, "bad": self.bad}
        self.drawn, self.bad = [0] * len(self.sources), []
        return report


class _ClipDataset(IterableDataset):
    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            # Ctrl-C reaches the whole foreground process group. The main process turns it into
            # "save the finished step, then stop" and shuts its workers down itself; a worker
            # dying of it first would crash that step instead.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        slot = 0 if info is None else info.id
        plan = self.plan
        workers = plan.num_workers
        # Rotate slots so that the first batch after a resume comes from the logical worker
        # whose turn it was: the DataLoader always starts its round-robin at slot 0.
        worker = (slot + plan.batches_done) % workers
        quota = None
        if plan.cfg.resample:
            remaining = plan.epoch_batches - plan.batches_done
            quota_now = len(range(slot, remaining, workers))
            quota = plan.worker_states.get(worker, {}).get("produced", 0) + quota_now
        torch.set_num_threads(1)  # parallelism comes from workers; threads would oversubscribe
        buffers = None
        if info is not None and plan.release_board is not None:
            buffers = WorkerBuffers(plan.release_board, slot)  # by process, not logical worker
        yield from _WorkerStream(plan, worker, quota, buffers)


# --------------------------------------------------------------------------- main process


class ClipLoader:
    """Iterable of collated batches (docs/design.md batch contract) for one rank."""

    def __init__(self, cfg: ClipLoaderConfig, rank: int, world_size: int, face_reenactor=None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        if face_reenactor is None and cfg.face_reenactor:
            face_reenactor = ImportedFaceReenactor(cfg.face_reenactor, cfg.face_reenactor_kwargs)
        self.face_reenactor = face_reenactor
        self.sources = cfg.data_sources()
        self.shard_sets, self.source_sets = shard_sets(cfg)
        self.num_logical_workers = max(1, cfg.num_workers)
        self.epoch = 0
        self.batches_done = 0
        self.worker_states: dict[int, dict] = {}
        self.source_drawn = [0] * len(self.sources)   # per source, in the order of source_names
        self.source_bad = [0] * len(self.sources)
        self._recent_bad: deque = deque(maxlen=20)    # (key, reason, source index)
        # Batches a worker sent in fresh shared memory because all its shm_buffers were held
        # (this process only; not part of the state): > 0 means raise data.shm_buffers.
        self.fresh_shm_batches = 0
        self._new_epoch(0)
        # After an elastic resume: {"ranks", "workers"} of the run it resumed from (else None).
        self.resumed_from: dict | None = None

    def _new_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.worker_states = int(epoch), 0, {}
        # Only an elastically resumed epoch differs from the config: its length on this rank,
        # the resume generation (seeds its generators) and the work dealt to this rank's workers.
        self.epoch_batches, self.generation, self.elastic_deal = self.cfg.batches_per_epoch, 0, {}

    def __len__(self) -> int:
        """Batches of the current epoch on this rank: ``batches_per_epoch``, except in an epoch
        resumed onto another world size (see :meth:`load_elastic`)."""
        if not self.cfg.resample:
            raise TypeError("a finite (resample=false) pass has no fixed length")
        return self.epoch_batches

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless the loader is already inside it
        (a resumed loader keeps its position)."""
        if epoch != self.epoch:
            self._new_epoch(epoch)

    @property
    def source_names(self) -> list[str]:
        """Source names; a batch's ``source`` entry indexes this list."""
        return [source.name for source in self.sources]

    @property
    def samples_drawn(self) -> int:
        return sum(self.source_drawn)

    @property
    def bad_samples(self) -> int:
        return sum(self.source_bad)

    @property
    def bad_fraction(self) -> float:
        return _fraction(self.bad_samples, self.samples_drawn)

    @property
    def recent_bad(self) -> list[tuple[str, str]]:
        """The latest ``(key, reason)`` of bad samples, oldest first."""
        return [(key, reason) for key, reason, _ in self._recent_bad]

    def stats(self) -> dict:
        """Counters for logging: ``samples_drawn``, ``bad_samples``, ``bad_fraction``,
        ``fresh_shm_batches``, and per source ``<name>/samples_drawn``, ``<name>/bad_samples``,
        ``<name>/bad_fraction``."""
        stats = {"samples_drawn": self.samples_drawn, "bad_samples": self.bad_samples,
                 "bad_fraction": self.bad_fraction, "fresh_shm_batches": self.fresh_shm_batches}
        for name, drawn, bad in zip(self.source_names, self.source_drawn, self.source_bad):
            stats.update({f"{name}/samples_drawn": drawn, f"{name}/bad_samples": bad,
                          f"{name}/bad_fraction": _fraction(bad, drawn)})
        return stats

    def _fingerprint(self, num_workers: int | None = None) -> str:
        """What must not change between save and resume for the state to mean the same
        (``num_workers``: as if configured with that many, for an elastic resume's check)."""
        return hashlib.sha256(json.dumps(self._fingerprint_fields(num_workers), sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]

    def _fingerprint_parts(self, num_workers: int | None = None) -> dict:
        """The fingerprint's fields grouped as a resume refusal names them: the shard lists
        (count and hash per set), the sources and the rest of the data config."""
        fields = json.loads(json.dumps(self._fingerprint_fields(num_workers), sort_keys=True, default=str))
        shard_list = [[len(urls), hashlib.sha256(json.dumps(urls).encode()).hexdigest()[:16]]
                      for urls in fields.pop("sources")]
        for key in ("shards", "scene_shards"):  # named by the shard list they expand to
            fields.pop(key)
        return {"shard list": shard_list, "sources": fields.pop("source_table", None), "data config": fields}

    def _fingerprint_fields(self, num_workers: int | None = None) -> dict:
        fields = dataclasses.asdict(self.cfg)
        if num_workers is not None:
            fields["num_workers"] = num_workers
        for volatile in ("prefetch_factor", "shm_buffers", "start_method", "max_bad_fraction",
                         "bad_fraction_min_samples", "decode_threads", "output_dtype"):
            fields.pop(volatile)
        for added in ("face_reenactor", "face_reenactor_kwargs", "sources"):
            if fields[added] is None:  # keys added later: unset, they keep older checkpoints' fingerprint
                fields.pop(added)
        if not fields["latents"]:  # added later too
            fields.pop("latents")
        if self.cfg.sources is not None:
            fields["source_table"] = [[s.name, s.kind, s.weight, list(s.conditions), shard_set]
                                      for s, shard_set in zip(self.sources, self.source_sets)]
        fields["sources"] = self.shard_sets  # the shard urls (the key predates named sources)
        return fields

    def state_dict(self) -> dict:
        state = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                 "num_workers": self.num_logical_workers, "fingerprint": self._fingerprint(),
                 "fingerprint_parts": self._fingerprint_parts(),
                 "epoch": self.epoch, "batches_done": self.batches_done,
                 "workers": {int(k): v for k, v in self.worker_states.items()},
                 "samples_drawn": self.samples_drawn, "bad_samples": self.bad_samples,
                 "source_samples_drawn": dict(zip(self.source_names, self.source_drawn)),
                 "source_bad_samples": dict(zip(self.source_names, self.source_bad))}
        if self.generation:  # an elastically resumed epoch (absent otherwise: older states read the same)
            state.update(epoch_batches=self.epoch_batches, generation=self.generation,
                         elastic_deal={int(k): v for k, v in self.elastic_deal.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`, or from every rank's states gathered as
        ``{"ranks": {rank: state}}`` (:class:`xdyna.train.loader_state.RankGatheredLoader`).

        Saved with this world size and worker count: this rank's entry is restored exactly (the
        other entries are not read). Saved with another world size or worker count (gathered
        form only): :meth:`load_elastic`. A single rank's state must be this rank's."""
        if "ranks" in state:
            ranks = {int(k): v for k, v in state["ranks"].items()}
            own = ranks.get(self.rank)
            if not own or (own.get("world_size"), own.get("num_workers")) != (self.world_size,
                                                                              self.num_logical_workers):
                self.load_elastic(ranks)
                return
            state = own
        self._check_state(state, {"rank": self.rank, "world_size": self.world_size,
                                  "num_workers": self.num_logical_workers},
                          "(the saved position is only meaningful for the same shards, data config, "
                          "rank, world size and worker count; the gathered states of all ranks "
                          "resume onto another world size)")
        self._new_epoch(int(state["epoch"]))
        self.batches_done = int(state["batches_done"])
        self.worker_states = {int(k): v for k, v in state["workers"].items()}
        self.epoch_batches = int(state.get("epoch_batches", self.cfg.batches_per_epoch))
        self.generation = int(state.get("generation", 0))
        self.elastic_deal = {int(k): v for k, v in state.get("elastic_deal", {}).items()}
        self._set_counters([state])

    def _check_state(self, state: dict, expected: dict, why: str) -> None:
        """One ``ValueError`` naming what differs between ``state`` and this loader; the
        configured worker count is checked through ``expected`` (logical workers) only."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        changed = [f"{name} {state.get(name)!r} -> {value!r}" for name, value in expected.items()
                   if state.get(name) != value]
        # The fingerprint holds the configured num_workers (one logical worker is 0 or 1 of
        # them): compare as configured when saved, so that only the rest of the config counts.
        saved = (state.get("fingerprint_parts") or {}).get("data config", {}).get("num_workers")
        logical = state.get("num_workers")
        workers = [saved] if saved is not None else [0, 1] if logical == 1 else [logical]
        if state.get("fingerprint") not in [self._fingerprint(n) for n in workers]:
            changed.append(f"fingerprint {state.get('fingerprint')!r} -> {self._fingerprint(workers[0])!r}" +
                           _what_changed(state.get("fingerprint_parts"), self._fingerprint_parts(workers[0])))
        if changed:
            raise ValueError("cannot resume the data loader: " + ", ".join(changed) + " " + why)

    def _set_counters(self, states: list[dict]) -> None:
        # Per-source counters (absent from states saved before sources existed: counted anew).
        self.source_drawn = [sum(int(s.get("source_samples_drawn", {}).get(name, 0)) for s in states)
                             for name in self.source_names]
        self.source_bad = [sum(int(s.get("source_bad_samples", {}).get(name, 0)) for s in states)
                           for name in self.source_names]

    def load_elastic(self, ranks: Mapping[int, dict]) -> None:
        """Resume from the states of every rank of a run with another world size or worker
        count (``{rank: state}``, all ranks): "elastic determinism" (docs/data.md, *Resuming*).

        The old workers' remaining work is gathered and dealt the same way on every new rank to
        its ``world_size x num_workers`` workers, whose generators are re-derived with the next
        resume generation (:func:`worker_generator`):

        * finite pass: every shard not yet started, the rest of every shard being read and the
          samples pending in buckets (re-decoded with their own per-sample seeds): each sample
          the old run had not delivered is delivered exactly once, none delivered is repeated;
        * resampled: pending and held-back samples are dealt on (not lost, not repeated); open
          shard positions are not (new streams draw shards afresh); the epoch keeps its global
          batch count: the old ranks' remaining batches, split evenly (rounded up) over the new
          ranks, so ``len(loader)`` is this epoch's length on this rank.

        Refused, naming what changed: another shard list, other sources or data config, or a
        missing rank."""
        states = {int(rank): state for rank, state in ranks.items() if state}
        if not states:
            raise ValueError("cannot resume the data loader: the gathered loader state holds no rank's state")
        first = states[min(states)]
        old_world, old_workers = first.get("world_size"), first.get("num_workers")
        why = "(an elastic resume needs every old rank's state, saved with the same shards and data config)"
        for rank, state in sorted(states.items()):
            self._check_state(state, {"rank": rank, "world_size": old_world, "num_workers": old_workers}, why)
        missing = sorted(set(range(old_world)) - set(states))
        if missing:
            raise ValueError(f"cannot resume the data loader onto {self.world_size} ranks: the gathered state "
                             f"of the {old_world}-rank run lacks ranks {missing} {why}")
        old = [states[rank] for rank in range(old_world)]
        epoch = min(int(state["epoch"]) for state in old)
        if self.cfg.resample and any(int(state["epoch"]) != epoch for state in old):
            raise ValueError(f"cannot resume the data loader: the old ranks are in epochs "
                             f"{[state['epoch'] for state in old]} (a resampled run keeps its ranks in step)")
        # A finite pass: ranks past `epoch` have delivered their whole share of it.
        current = [state for state in old if int(state["epoch"]) == epoch]
        self._new_epoch(epoch)
        self.generation = max(int(state.get("generation", 0)) for state in old) + 1
        refs, queues, runs = self._remaining_work(current, old_world, old_workers)
        total = self.world_size * self.num_logical_workers
        if runs and len(runs) < total:  # too few pieces for the new workers: split them by sample
            parts = -(-total // len(runs))
            runs = [piece for run in runs for piece in run.split(parts)]
        first_worker = self.rank * self.num_logical_workers
        for worker in range(self.num_logical_workers):
            deal = slice(first_worker + worker, None, total)
            self.elastic_deal[worker] = {
                "pending": refs[deal], "queues": {name: entries[deal] for name, entries in queues.items()},
                **({} if self.cfg.resample else {"runs": [run.state() for run in runs[deal]]})}
        if self.cfg.resample:
            remaining = sum(int(state.get("epoch_batches", self.cfg.batches_per_epoch)) - int(state["batches_done"])
                            for state in old)
            self.batches_done = max(int(state["batches_done"]) for state in old)
            self.epoch_batches = self.batches_done + max(0, -(-remaining // self.world_size))
        # Each old rank's counts go to one new rank, so the sum over ranks is kept.
        self._set_counters([state for rank, state in enumerate(old) if rank % self.world_size == self.rank])
        self.resumed_from = {"ranks": old_world, "workers": old_workers}
        if self.rank == 0:
            log.warning("data: resumed from %d ranks x %d workers onto %d ranks x %d workers",
                        old_world, old_workers, self.world_size, self.num_logical_workers)

    def _remaining_work(self, states: list[dict], old_world: int, old_workers: int
                        ) -> tuple[list, dict[str, list], list[_Run]]:
        """What the old workers of ``states`` had not delivered, in a fixed order: sample
        references ``[shard, offset, seed]`` drawn but not delivered, held-back references per
        source, and (finite pass) the runs of shards still to read."""
        refs: list = []
        queues: dict[str, list] = {name: [] for name in self.source_names}
        runs: list[_Run] = []
        bases = np.cumsum([0] + [len(urls) for urls in self.shard_sets]).tolist()
        for state in states:
            rank = int(state["rank"])
            workers = {int(k): v for k, v in state["workers"].items()}
            dealt = {int(k): v for k, v in state.get("elastic_deal", {}).items()}
            for worker in range(old_workers):
                saved = workers.get(worker)
                if saved is not None:  # the worker's position after its last delivered batch
                    work = {"pending": [ref for bucket in saved["pending"] for ref in bucket],
                            "queues": saved["queues"], "runs": saved.get("runs")}
                else:  # no batch delivered: what it started the epoch (or generation) with
                    work = dealt.get(worker, {}) if state.get("generation") else {}
                refs += work.get("pending", [])
                for name, entries in work.get("queues", {}).items():
                    queues.setdefault(name, []).extend(entries)
                if self.cfg.resample:
                    continue
                if state.get("generation"):
                    worker_runs = [_Run(*run) for run in work.get("runs") or []]
                else:  # the deal of the shard sets, at the saved position
                    worker_runs = []
                    for index, urls in enumerate(self.shard_sets):
                        run = _Run(*_finite_deal(list(range(bases[index], bases[index + 1])), self.cfg.seed,
                                                 int(state["epoch"]), index, rank * old_workers + worker,
                                                 old_world * old_workers))
                        if saved is not None:
                            run.cursor, run.offset, run.counter = saved["sources"][index]
                        worker_runs.append(run)
                runs += [piece for run in worker_runs for piece in run.pieces()]
        return refs, queues, runs

    def _dataloader(self) -> tuple[DataLoader, ReleaseBoard | None]:
        board = None
        if self.cfg.num_workers > 0 and self.cfg.shm_buffers > 0:
            board = ReleaseBoard(self.cfg.num_workers, self.cfg.shm_buffers)
        plan = _Plan(self.cfg, self.rank, self.world_size, self.num_logical_workers, self.shard_sets,
                     self.sources, self.source_sets, self.epoch, self.batches_done, dict(self.worker_states),
                     self.face_reenactor, board, self.epoch_batches, self.generation, dict(self.elastic_deal))
        kwargs = {}
        if self.cfg.num_workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor,
                      "multiprocessing_context": self.cfg.start_method}
        loader = DataLoader(_ClipDataset(plan), batch_size=None, num_workers=self.cfg.num_workers,
                            **kwargs)
        return loader, board

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.resample and self.batches_done >= self.epoch_batches:
            self.set_epoch(self.epoch + 1)
        loader, board = self._dataloader()
        for batch in loader:
            meta = batch.pop(_META)
            if board is not None and batch:
                if meta["buffer"] >= 0:  # every image of a batch lives in that one storage (collate)
                    board.hold(meta["buffer"], batch["reference"].untyped_storage())  # video is absent from latents
                else:
                    self.fresh_shm_batches += 1
            self.worker_states[meta["worker"]] = meta["state"]
            self._count(meta)
            if not batch:  # a report without a batch (end of a finite pass)
                continue
            self.batches_done += 1
            yield to_batch_contract(batch) if self.cfg.output_dtype == "float32" else batch
        if self.cfg.resample and self.batches_done < self.epoch_batches:
            raise RuntimeError(f"rank {self.rank} produced {self.batches_done} of "
                               f"{self.epoch_batches} batches")
        if not self.cfg.resample:
            self._new_epoch(self.epoch + 1)

    def _count(self, meta: dict) -> None:
        for index, drawn in enumerate(meta["drawn"]):
            self.source_drawn[index] += drawn
        for key, reason, index in meta["bad"]:
            self.source_bad[index] += 1
            self._recent_bad.append((key, reason, index))
        cfg = self.cfg
        # Per source, so that a broken source stops the run even when its weight is small; then
        # over all sources, for sources too rarely drawn to reach bad_fraction_min_samples alone.
        scopes = [(f"source {name!r}", drawn, bad, index) for index, (name, drawn, bad)
                  in enumerate(zip(self.source_names, self.source_drawn, self.source_bad))]
        scopes.append(("all sources", self.samples_drawn, self.bad_samples, None))
        for where, drawn, bad, index in scopes:
            if drawn >= cfg.bad_fraction_min_samples and _fraction(bad, drawn) > cfg.max_bad_fraction:
                latest = [f"{key}: {reason}" for key, reason, i in self._recent_bad if index in (None, i)]
                raise BadSampleCeilingError(
                    f"{bad} of {drawn} samples of {where} on rank {self.rank} were bad "
                    f"({_fraction(bad, drawn):.1%} > max_bad_fraction {cfg.max_bad_fraction:.1%}); "
                    f"latest: {'; '.join(latest[-5:])}")


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _what_changed(saved: dict | None, now: dict) -> str:
    """`` (<what> changed: ...)`` for a refusal; empty for states saved before the parts were."""
    if not saved:
        return ""
    changed = [part for part in now if saved.get(part) != now[part]]
    config = saved.get("data config") or {}
    keys = [key for key in sorted(set(config) | set(now["data config"]))
            if config.get(key) != now["data config"].get(key)]
    details = [f"{key} {config.get(key)!r} -> {now['data config'].get(key)!r}" for key in keys]
    if saved.get("shard list") != now["shard list"]:
        details.append(f"shards per set {[n for n, _ in saved.get('shard list') or []]} -> "
                       f"{[n for n, _ in now['shard list']]}")
    return f" ({', '.join(changed)} changed: {'; '.join(details) or 'see data.sources'})" if changed else ""


def build_clip_loader(cfg: ClipLoaderConfig | dict, rank: int, world_size: int,
                      face_reenactor=None) -> ClipLoader:
    """The loader for ``rank`` of ``world_size``; ``cfg`` may be a dict (e.g. from Hydra)."""
    if not isinstance(cfg, ClipLoaderConfig):
        cfg = config_from_dict(cfg)
    return ClipLoader(cfg, rank, world_size, face_reenactor)

