"""The ``data`` config group: :class:`ClipLoaderConfig`, its weighted sources and what they are
checked against. No torch, decoder or webdataset here: the config checks of ``xdyna-train`` and
``xdyna-launch`` validate a data config before anything heavy is imported. :mod:`datapipes.loader`
(the loader itself) re-exports every name.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from datapipes.plugins import import_object
from datapipes.schema import KINDS

if TYPE_CHECKING:
    from datapipes.clips import ClipSpec

# How a clip is cut and its pose read (datapipes.clips builds it so, and re-exports these).
REFERENCE_MODES = ("outside", "inside", "any")
CROP_MODES = ("random", "center")
POSE_SOURCES = ("auto", "video", "keypoints")
OUTPUT_DTYPES = ("float32", "uint8")
# What each kind of source provides: the clip kinds it yields and the conditions its clips can
# carry. ``mixed``: shards holding both clip kinds, taken as they come (is_scene per clip).
SOURCE_KINDS = {"human": {"clips": ("human",), "conditions": ("pose", "face")},
                "scene": {"clips": ("scene",), "conditions": ()},
                "mixed": {"clips": KINDS, "conditions": ("pose", "face")}}
SOURCE_FIELDS = ("shards", "weight", "kind", "conditions")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class ClipLoaderConfig:
    """The ``data`` config group (``conf/data/*.yaml``); one field per key."""
    shards: Any = "demo_data/shards"          # directory, brace pattern, glob, file, or list
    scene_shards: Any = None                  # optional separate scene-clip source
    scene_probability: float | None = 0.25    # P(scene) per sample; None = the stream's own mix
    # N weighted sources, name -> {shards, weight, kind, conditions} (docs/data.md); replaces the
    # three keys above, which are its two-source case (see data_sources()).
    sources: dict | None = None
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
    mix_queue: int = 16                       # held-back clips per source when one stream is split by kind
    seed: int = 0
    max_bad_fraction: float = 0.05            # stop when bad / drawn exceeds this ...
    bad_fraction_min_samples: int = 100       # ... once this many samples were drawn
    decode_threads: int = 1
    # float32: the batch contract of docs/design.md, scaled in the loader's main process.
    # uint8: video/reference/pose/face stay uint8 (0..255) so the training device scales them
    # (video/reference x/127.5-1, pose/face x/255; datapipes.clips.to_batch_contract or
    # xdyna.train.batches.to_float_batch): 4x less host memory traffic per batch.
    output_dtype: str = "float32"
    # Batches carry the cached VAE latents of `xdyna-data encode` shards (video_latents,
    # reference_latents: posterior mean and std) instead of the clip's pixels; the crop and
    # resolution must be the cached ones (docs/data.md, "Cached latents").
    latents: bool = False

    def bucket_sizes(self) -> tuple[tuple[int, ...], ...]:
        """The aspect buckets as ``((height, width), ...)``: ``buckets``, or the one of ``height x width``."""
        return tuple(tuple(int(v) for v in b) for b in (self.buckets or [[self.height, self.width]]))

    def clip_spec(self) -> ClipSpec:
        from datapipes.clips import ClipSpec  # the clip decoder (torch, video): only where clips are built

        return ClipSpec(self.num_frames, self.frame_stride, self.bucket_sizes(), self.reference, self.crop,
                        self.with_face, self.pose_from, self.decode_threads, self.face_landmarks_in_pose,
                        latents=self.latents)

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
        try:
            self.data_sources()
        except ValueError as error:
            problems.append(str(error))
        for bucket in self.bucket_sizes():
            if len(bucket) != 2 or min(bucket) < 1:
                problems.append(f"bucket {list(bucket)} is not [height, width]")
        if problems:
            raise ValueError("invalid data config: " + "; ".join(problems))

    def data_sources(self) -> list["DataSource"]:
        """The weighted sources samples are drawn from: ``sources`` as configured, or the
        two-key form translated. ``shards`` with ``scene_probability`` p is two sources on the
        same shards split by kind, ``human`` (weight 1 - p) and ``scene`` (weight p), or with
        ``scene_shards`` the scene source reads those; ``scene_probability: null`` is one
        ``mixed`` source per shard set. Raises ``ValueError`` naming the key for a bad table."""
        if self.sources is None:
            if self.scene_probability is None:
                if self.scene_shards is not None and self.resample:
                    raise ValueError("scene_shards needs scene_probability (the mix of the two sources)")
                sets = [("shards", self.shards)] + ([("scene_shards", self.scene_shards)]
                                                    if self.scene_shards is not None else [])
                return [DataSource(key, spec, "mixed", 1.0, SOURCE_KINDS["mixed"]["conditions"], key)
                        for key, spec in sets]
            scene_key = "shards" if self.scene_shards is None else "scene_shards"
            # Zero weights are allowed here only: scene_probability 0 or 1 keeps both sources so
            # that a sample's draw uses the generator exactly as before sources existed.
            return [DataSource("human", self.shards, "human", 1.0 - self.scene_probability,
                               SOURCE_KINDS["human"]["conditions"], "shards"),
                    DataSource("scene", getattr(self, scene_key), "scene", self.scene_probability, (),
                               scene_key)]
        both = [key for key, unset in (("shards", None), ("scene_shards", None), ("scene_probability", None))
                if getattr(self, key) is not unset]
        if both:
            raise ValueError(f"sources and {', '.join(both)} are both set: with sources, set "
                             f"{', '.join(f'{key}=null' for key in both)} (the weights hold the mix; "
                             f"no fusion is no scene source)")
        if not isinstance(self.sources, Mapping) or not self.sources:
            raise ValueError(f"sources must map names to {{shards, weight, kind}}, got {self.sources!r}")
        return [_parse_source(name, entry) for name, entry in self.sources.items()]


@dataclass(frozen=True)
class DataSource:
    """One weighted source of clips: ``data.sources.<name>`` after validation."""
    name: str
    shards: Any                     # as configured: directory, brace pattern, glob, file or list
    kind: str                       # a key of SOURCE_KINDS
    weight: float                   # drawn with probability weight / sum of weights
    conditions: tuple[str, ...]     # what its human clips carry, of SOURCE_KINDS[kind]["conditions"]
    shards_key: str                 # the config key of ``shards``, for error messages


def _parse_source(name: Any, entry: Any) -> DataSource:
    key = f"sources.{name}"
    if not isinstance(name, str) or not _SOURCE_NAME.match(name):
        raise ValueError(f"sources: name {name!r} must be letters, digits, '_' or '-'")
    if not isinstance(entry, Mapping):
        raise ValueError(f"{key} must be a mapping {{shards, weight, kind}}, got {entry!r}")
    unknown = sorted(set(entry) - set(SOURCE_FIELDS))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; known: {list(SOURCE_FIELDS)}")
    if entry.get("shards") in (None, "", []):
        raise ValueError(f"{key}.shards is not set")
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{key}.kind must be one of {list(SOURCE_KINDS)}, got {kind!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{key}.weight must be a number > 0, got {weight!r}")
    offered = SOURCE_KINDS[kind]["conditions"]
    conditions = entry.get("conditions", offered)
    if isinstance(conditions, str) or not isinstance(conditions, (list, tuple)) or \
            any(c not in offered for c in conditions) or (offered and "pose" not in conditions):
        need = f"a list of {list(offered)} with 'pose'" if offered else "[] (scene clips carry none)"
        raise ValueError(f"{key}.conditions must be {need}, got {conditions!r}")
    return DataSource(name, entry["shards"], kind, float(weight), tuple(c for c in offered if c in conditions),
                      f"{key}.shards")


def config_from_dict(values: dict) -> ClipLoaderConfig:
    """A config from a mapping; unknown keys are an error naming them."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(ClipLoaderConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known: {sorted(known)}")
    return ClipLoaderConfig(**values)
