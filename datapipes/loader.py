"""Streaming clip loader: shards -> collated batches, for many ranks and workers, resumable.

How it works (details in docs/data.md):

* Every DataLoader worker runs a :class:`_WorkerStream` for one *logical* worker
  ``(rank, w)``. It reads samples by ``(shard, byte offset)`` through
  :class:`~datapipes.shards.TarSampleReader`, decodes clips with decord inside the worker and
  batches them per aspect-ratio bucket, so a batch never mixes shapes.
* ``resample=True`` (training): each worker draws shards at random with its own generator,
  seeded from ``(seed, epoch, rank, worker)``, keeps ``open_shards`` of them interleaved, and
  produces an exact quota of batches so every rank yields ``batches_per_epoch`` batches.
  Harmonic data fusion draws ``scene`` with probability ``scene_probability`` per sample.
* ``resample=False`` (evaluation, inspection): one pass; shards (or, with fewer shards than
  workers in total, samples) are dealt to the ``world_size * num_workers`` workers so every
  sample is seen exactly once.
* Each batch carries its worker's state *after* the batch; the main process keeps the state
  of the last consumed batch of every worker. That is the loader's ``state_dict()``: byte
  offsets, pending bucket entries and generator states, a few hundred bytes per worker.
  A resumed loader rebuilds each worker exactly and continues the round-robin where it
  stopped, so it yields exactly the batches an uninterrupted loader would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datapipes import schema, shards
from datapipes.batch_buffers import ReleaseBoard, WorkerBuffers
from datapipes.clips import (CROP_MODES, POSE_SOURCES, REFERENCE_MODES, BadSample, ClipSpec,
                             ImportedFaceReenactor, collate, images_nbytes, load_clip,
                             to_batch_contract)
from datapipes.plugins import import_object

log = logging.getLogger(__name__)

STATE_VERSION = 1
OUTPUT_DTYPES = ("float32", "uint8")
_META = "_loader"  # private batch entry carrying worker state; removed before batches leave


@dataclass
class ClipLoaderConfig:
    """The ``data`` config group (``conf/data/*.yaml``); one field per key."""
    shards: Any = "demo_data/shards"          # directory, brace pattern, glob, file, or list
    scene_shards: Any = None                  # optional separate scene-clip source
    scene_probability: float | None = 0.25    # P(scene) per sample; None = the stream's own mix
    num_frames: int = 8
    frame_stride: int = 1
    height: int = 128
    width: int = 64
    buckets: list | None = None               # [[h, w], ...]; None = one bucket height x width
    crop: str = "random"                      # random | center
    reference: str = "outside"                # outside | inside | any (of the clip)
    with_face: bool = False
    face_landmarks_in_pose: bool = False      # w/lmk ablation: face.json landmarks drawn into pose
    face_reenactor: str | None = None         # "module:factory" -> cross-identity face hook (with_face)
    face_reenactor_kwargs: dict | None = None  # keyword arguments of that factory
    pose_from: str = "auto"                   # auto | video | keypoints
    batch_size: int = 2
    num_workers: int = 0
    start_method: str | None = None           # fork | spawn | forkserver | None (platform)
    prefetch_factor: int = 2
    # Reusable shared-memory batch buffers per worker (datapipes/batch_buffers.py): a worker
    # collates into one the main process has let go of, instead of into fresh shared memory
    # (page faults on every batch). 0: fresh shared memory per batch, as torch does.
    shm_buffers: int = 4
    resample: bool = True
    batches_per_epoch: int = 50               # per rank; used when resample is true
    open_shards: int = 2                      # shards interleaved per worker
    mix_queue: int = 16                       # held-back samples per kind when mixing one stream
    seed: int = 0
    max_bad_fraction: float = 0.05            # stop when bad / drawn exceeds this ...
    bad_fraction_min_samples: int = 100       # ... once this many samples were drawn
    decode_threads: int = 1
    # float32: the batch contract of docs/design.md, scaled in the loader's main process.
    # uint8: video/reference/pose/face stay uint8 (0..255) so the training device scales them
    # (video/reference x/127.5-1, pose/face x/255; datapipes.clips.to_batch_contract or
    # xdyna.train.batches.to_float_batch): 4x less host memory traffic per batch.
    output_dtype: str = "float32"

    def clip_spec(self) -> ClipSpec:
        buckets = tuple(tuple(int(v) for v in b) for b in (self.buckets or [[self.height, self.width]]))
        return ClipSpec(self.num_frames, self.frame_stride, buckets, self.reference, self.crop,
                        self.with_face, self.pose_from, self.decode_threads, self.face_landmarks_in_pose)

    def validate(self) -> None:
        problems = []
        if self.num_frames < 1 or self.frame_stride < 1:
            problems.append("num_frames and frame_stride must be >= 1")
        if self.batch_size < 1 or self.num_workers < 0:
            problems.append("batch_size must be >= 1 and num_workers >= 0")
        if self.shm_buffers < 0:
            problems.append(f"shm_buffers must be >= 0, got {self.shm_buffers}")
        if self.reference not in REFERENCE_MODES:
            problems.append(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.crop not in CROP_MODES:
            problems.append(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.pose_from not in POSE_SOURCES:
            problems.append(f"pose_from must be one of {POSE_SOURCES}, got {self.pose_from!r}")
        if self.scene_probability is not None and not 0 <= self.scene_probability <= 1:
            problems.append(f"scene_probability must be in [0, 1] or null, got {self.scene_probability}")
        if self.resample and self.batches_per_epoch < 1:
            problems.append("batches_per_epoch must be >= 1 when resample is true")
        if self.output_dtype not in OUTPUT_DTYPES:
            problems.append(f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}")
        if self.face_reenactor is not None:
            if not self.with_face:
                problems.append("face_reenactor is set but with_face is false (it only changes the S-Face maps)")
            try:
                import_object(self.face_reenactor, "face_reenactor")
            except ValueError as error:
                problems.append(str(error))
        if self.open_shards < 1 or self.mix_queue < 1:
            problems.append("open_shards and mix_queue must be >= 1")
        for bucket in self.clip_spec().buckets:
            if len(bucket) != 2 or min(bucket) < 1:
                problems.append(f"bucket {list(bucket)} is not [height, width]")
        if problems:
            raise ValueError("invalid data config: " + "; ".join(problems))


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
    sources: list[list[str]]       # [main urls] or [human urls, scene urls]
    epoch: int
    batches_done: int              # consumed batches of this epoch at (re)start
    worker_states: dict            # logical worker -> state after its last consumed batch
    face_reenactor: Any = None
    release_board: ReleaseBoard | None = None  # with workers and shm_buffers > 0


class _Source:
    """One shard set as a sample stream of one logical worker, addressed by byte offsets."""

    def __init__(self, index: int, shard_ids: list[int], plan: _Plan, worker: int,
                 rng: np.random.Generator, reader: shards.TarSampleReader):
        # shard_ids index the reader's url list, which holds every source's shards.
        self.index, self.shard_ids, self.rng, self.reader = index, shard_ids, rng, reader
        self.resample = plan.cfg.resample
        self.open_limit = min(plan.cfg.open_shards, len(shard_ids))
        self.open: list[list[int]] = []      # resample: [[shard, offset], ...]
        global_worker = plan.rank * plan.num_workers + worker
        total = plan.world_size * plan.num_workers
        if not self.resample:
            order = list(shard_ids)
            # The same permutation on every rank: the deal below must partition the set.
            np.random.default_rng([plan.cfg.seed, plan.epoch, index]).shuffle(order)
            if len(order) >= total:  # deal shards
                self.shards, self.stride, self.phase = order[global_worker::total], 1, 0
            else:                    # too few shards: every worker reads all, keeps every total-th
                self.shards, self.stride, self.phase = order, total, global_worker
            self.cursor, self.offset, self.counter = 0, 0, 0

    def state(self) -> list:
        if self.resample:
            return [list(slot) for slot in self.open]
        return [self.cursor, self.offset, self.counter]

    def restore(self, state: list) -> None:
        if self.resample:
            self.open = [list(slot) for slot in state]
        else:
            self.cursor, self.offset, self.counter = state

    def next(self) -> shards.RawSample | None:
        """The next sample, or ``None`` when a finite pass is over."""
        return self._next_resampled() if self.resample else self._next_finite()

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

    def _next_finite(self) -> shards.RawSample | None:
        while self.cursor < len(self.shards):
            sample, next_offset = self.reader.read(self.shards[self.cursor], self.offset)
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


class _WorkerStream:
    """The batches of one logical worker (runs inside a DataLoader worker process)."""

    def __init__(self, plan: _Plan, worker: int, quota: int | None,
                 buffers: WorkerBuffers | None = None):
        cfg = plan.cfg
        self.buffers = buffers
        self.plan, self.cfg, self.worker, self.quota = plan, cfg, worker, quota
        self.spec = cfg.clip_spec()
        seed = np.random.SeedSequence([cfg.seed, plan.epoch, plan.rank, worker])
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.reader = shards.TarSampleReader([url for urls in plan.sources for url in urls])
        base = 0
        self.sources = []
        for index, urls in enumerate(plan.sources):
            self.sources.append(_Source(index, list(range(base, base + len(urls))), plan, worker,
                                        self.rng, self.reader))
            base += len(urls)
        self.mixing = cfg.resample and cfg.scene_probability is not None
        self.queues: dict[str, deque] = {kind: deque() for kind in shards.KINDS}
        self.pending: list[list[tuple[list, dict]]] = [[] for _ in self.spec.buckets]
        self.produced = 0
        self.drawn = 0
        self.bad: list[tuple[str, str]] = []
        state = plan.worker_states.get(worker)
        if state is not None:
            self._restore(state)

    # -- state
    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state,
                "sources": [source.state() for source in self.sources],
                "queues": {kind: [ref for ref, _ in queue] for kind, queue in self.queues.items()},
                "pending": [[ref for ref, _ in bucket] for bucket in self.pending],
                "produced": self.produced}

    def _restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for source, source_state in zip(self.sources, state["sources"]):
            source.restore(source_state)
        for kind, refs in state["queues"].items():
            self.queues[kind] = deque((ref, self._reread(ref)) for ref in refs)
        for bucket, refs in enumerate(state["pending"]):
            # Pending entries were decoded fine before the checkpoint; rebuilding them from the
            # same bytes and per-sample seed gives the same tensors.
            for ref in refs:
                _, sample = load_clip(self._reread(ref), self.spec, np.random.default_rng(ref[2]),
                                      self.plan.face_reenactor)
                self.pending[bucket].append((ref, sample))
        self.produced = state["produced"]

    def _reread(self, ref: list) -> shards.RawSample:
        sample, _ = self.reader.read(ref[0], ref[1])
        if sample is None:
            raise RuntimeError(f"resume: no sample at shard {self.reader.urls[ref[0]]!r} offset {ref[1]}")
        return sample

    # -- drawing samples
    def _draw_raw(self) -> shards.RawSample | None:
        if not self.mixing:
            for source in self.sources:
                sample = source.next()
                if sample is not None:
                    return sample
            return None
        kind = "scene" if self.rng.random() < self.cfg.scene_probability else "human"
        # With a separate scene source, scenes come from it; clips of the other kind met on the
        # way (e.g. scenes inside the human shards) are held back for a later draw.
        source = self.sources[1 if kind == "scene" and len(self.sources) == 2 else 0]
        queue = self.queues[kind]
        misses = 0
        while not queue:
            sample = source.next()
            try:
                sample_kind = sample.meta()["kind"]
            except schema.SchemaError:
                return sample  # let load_clip report it as bad (skipped and counted)
            other = self.queues[sample_kind]
            if sample_kind == kind:
                return sample
            other.append(([sample.shard, sample.offset], sample))
            if len(other) > self.cfg.mix_queue:
                other.popleft()  # resampled data is unbounded: dropping keeps memory bounded
            misses += 1
            if misses > 4096:
                raise ValueError(f"scene_probability={self.cfg.scene_probability} asks for {kind!r} "
                                 f"clips but 4096 samples in a row of {shards.brace_pattern(self.reader.urls)} "
                                 f"were not {kind!r}")
        return queue.popleft()[1]

    def __iter__(self) -> Iterator[dict]:
        try:
            while self.quota is None or self.produced < self.quota:
                raw = self._draw_raw()
                if raw is None:
                    break
                self.drawn += 1
                sample_seed = int(self.rng.integers(2 ** 63))
                try:
                    bucket, sample = load_clip(raw, self.spec, np.random.default_rng(sample_seed),
                                               self.plan.face_reenactor)
                except BadSample as bad:
                    log.warning("skipping bad sample %s (shard %s): %s", bad.key,
                                self.reader.urls[raw.shard], bad.reason)
                    self.bad.append((bad.key, bad.reason))
                    continue
                self.pending[bucket].append(([raw.shard, raw.offset, sample_seed], sample))
                if len(self.pending[bucket]) == self.cfg.batch_size:
                    yield self._emit(bucket)
            if self.quota is None:  # finite pass: flush partial batches
                for bucket in range(len(self.pending)):
                    if self.pending[bucket]:
                        yield self._emit(bucket)
                if self.drawn:  # bad samples after the last batch still have to be counted
                    yield {_META: self._report()}
        finally:
            self.reader.close()

    def _emit(self, bucket: int) -> dict:
        samples = [sample for _, sample in self.pending[bucket]]
        index, storage = -1, None
        if self.buffers is not None:
            index, storage = self.buffers.take(images_nbytes(samples))
        batch = collate(samples, storage)
        self.pending[bucket] = []
        self.produced += 1
        batch[_META] = self._report()
        batch[_META]["buffer"] = index
        return batch

    def _report(self) -> dict:
        report = {"worker": self.worker, "state": self.state(), "drawn": self.drawn, "bad": self.bad}
        self.drawn, self.bad = 0, []
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
            remaining = plan.cfg.batches_per_epoch - plan.batches_done
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
        sources = [shards.expand_shard_urls(cfg.shards)]
        if cfg.scene_shards is not None:
            if not cfg.resample:
                sources.append(shards.expand_shard_urls(cfg.scene_shards))
            elif cfg.scene_probability is None:
                raise ValueError("scene_shards needs scene_probability (the mix of the two sources)")
            else:
                sources.append(shards.expand_shard_urls(cfg.scene_shards))
        self.sources = sources
        self.num_logical_workers = max(1, cfg.num_workers)
        self.epoch = 0
        self.batches_done = 0
        self.worker_states: dict[int, dict] = {}
        self.samples_drawn = 0
        self.bad_samples = 0
        self.recent_bad: deque = deque(maxlen=20)
        # Batches a worker sent in fresh shared memory because all its shm_buffers were held
        # (this process only; not part of the state): > 0 means raise data.shm_buffers.
        self.fresh_shm_batches = 0

    def __len__(self) -> int:
        if not self.cfg.resample:
            raise TypeError("a finite (resample=false) pass has no fixed length")
        return self.cfg.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless the loader is already inside it
        (a resumed loader keeps its position)."""
        if epoch != self.epoch:
            self.epoch, self.batches_done, self.worker_states = int(epoch), 0, {}

    @property
    def bad_fraction(self) -> float:
        return self.bad_samples / self.samples_drawn if self.samples_drawn else 0.0

    def stats(self) -> dict:
        """Counters for logging: ``samples_drawn``, ``bad_samples``, ``bad_fraction``,
        ``fresh_shm_batches``."""
        return {"samples_drawn": self.samples_drawn, "bad_samples": self.bad_samples,
                "bad_fraction": self.bad_fraction, "fresh_shm_batches": self.fresh_shm_batches}

    def _fingerprint(self) -> str:
        """What must not change between save and resume for the state to mean the same."""
        fields = dataclasses.asdict(self.cfg)
        for volatile in ("prefetch_factor", "shm_buffers", "start_method", "max_bad_fraction",
                         "bad_fraction_min_samples", "decode_threads", "output_dtype"):
            fields.pop(volatile)
        for added in ("face_reenactor", "face_reenactor_kwargs"):
            if fields[added] is None:  # keys added later: unset, they keep older checkpoints' fingerprint
                fields.pop(added)
        fields["sources"] = self.sources
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_logical_workers, "fingerprint": self._fingerprint(),
                "epoch": self.epoch, "batches_done": self.batches_done,
                "workers": {int(k): v for k, v in self.worker_states.items()},
                "samples_drawn": self.samples_drawn, "bad_samples": self.bad_samples}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`, or pick this rank's entry from a dict
        ``{"ranks": {rank: state}}`` (as gathered from all ranks by the trainer)."""
        if "ranks" in state:
            ranks = {int(k): v for k, v in state["ranks"].items()}
            if self.rank not in ranks:
                raise ValueError(f"loader state has ranks {sorted(ranks)}, not rank {self.rank}")
            state = ranks[self.rank]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        expected = {"rank": self.rank, "world_size": self.world_size,
                    "num_workers": self.num_logical_workers, "fingerprint": self._fingerprint()}
        changed = [f"{name} {state.get(name)!r} -> {value!r}" for name, value in expected.items()
                   if state.get(name) != value]
        if changed:
            raise ValueError("cannot resume the data loader: " + ", ".join(changed) +
                             " (the saved position is only meaningful for the same shards, "
                             "data config, rank, world size and worker count)")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.worker_states = {int(k): v for k, v in state["workers"].items()}
        self.samples_drawn, self.bad_samples = int(state["samples_drawn"]), int(state["bad_samples"])

    def _dataloader(self) -> tuple[DataLoader, ReleaseBoard | None]:
        board = None
        if self.cfg.num_workers > 0 and self.cfg.shm_buffers > 0:
            board = ReleaseBoard(self.cfg.num_workers, self.cfg.shm_buffers)
        plan = _Plan(self.cfg, self.rank, self.world_size, self.num_logical_workers, self.sources,
                     self.epoch, self.batches_done, dict(self.worker_states), self.face_reenactor,
                     board)
        kwargs = {}
        if self.cfg.num_workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor,
                      "multiprocessing_context": self.cfg.start_method}
        loader = DataLoader(_ClipDataset(plan), batch_size=None, num_workers=self.cfg.num_workers,
                            **kwargs)
        return loader, board

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.resample and self.batches_done >= self.cfg.batches_per_epoch:
            self.set_epoch(self.epoch + 1)
        loader, board = self._dataloader()
        for batch in loader:
            meta = batch.pop(_META)
            if board is not None and batch:
                if meta["buffer"] >= 0:  # every image of a batch lives in that one storage (collate)
                    board.hold(meta["buffer"], batch["video"].untyped_storage())
                else:
                    self.fresh_shm_batches += 1
            self.worker_states[meta["worker"]] = meta["state"]
            self._count(meta)
            if not batch:  # a report without a batch (end of a finite pass)
                continue
            self.batches_done += 1
            yield to_batch_contract(batch) if self.cfg.output_dtype == "float32" else batch
        if self.cfg.resample and self.batches_done < self.cfg.batches_per_epoch:
            raise RuntimeError(f"rank {self.rank} produced {self.batches_done} of "
                               f"{self.cfg.batches_per_epoch} batches")
        if not self.cfg.resample:
            self.epoch, self.batches_done, self.worker_states = self.epoch + 1, 0, {}

    def _count(self, meta: dict) -> None:
        self.samples_drawn += meta["drawn"]
        self.bad_samples += len(meta["bad"])
        self.recent_bad.extend(meta["bad"])
        cfg = self.cfg
        if self.samples_drawn >= cfg.bad_fraction_min_samples and self.bad_fraction > cfg.max_bad_fraction:
            examples = "; ".join(f"{key}: {reason}" for key, reason in list(self.recent_bad)[-5:])
            raise BadSampleCeilingError(
                f"{self.bad_samples} of {self.samples_drawn} samples on rank {self.rank} were bad "
                f"({self.bad_fraction:.1%} > max_bad_fraction {cfg.max_bad_fraction:.1%}); "
                f"latest: {examples}")


def build_clip_loader(cfg: ClipLoaderConfig | dict, rank: int, world_size: int,
                      face_reenactor=None) -> ClipLoader:
    """The loader for ``rank`` of ``world_size``; ``cfg`` may be a dict (e.g. from Hydra)."""
    if not isinstance(cfg, ClipLoaderConfig):
        cfg = config_from_dict(cfg)
    return ClipLoader(cfg, rank, world_size, face_reenactor)


def config_from_dict(values: dict) -> ClipLoaderConfig:
    """A config from a mapping; unknown keys are an error naming them."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(ClipLoaderConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known: {sorted(known)}")
    return ClipLoaderConfig(**values)
