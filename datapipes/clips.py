"""From one raw shard sample to training tensors: clip and reference sampling, aspect-ratio
buckets, one resize/crop shared by video, pose and face maps, blank conditions for scenes.

Every random choice comes from the generator passed in, so a sample can be rebuilt exactly
from its address and its per-sample seed (that is how a resumed loader restores a batch that
was half-filled when the checkpoint was taken).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from datapipes import schema, shards
from datapipes.face import FaceFrame, SFaceGeometry, s_face_maps
# Defined with the data config that validates them (no torch there, for the config checks).
from datapipes.loader_config import CROP_MODES, POSE_SOURCES, REFERENCE_MODES  # noqa: F401
from datapipes.plugins import import_object
from datapipes.pose import draw_face_landmarks, render_pose
from datapipes.video import VideoDecodeError, open_video, read_frames


class BadSample(Exception):
    """A sample that cannot become a training clip; ``reason`` says why, ``key`` which."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class ClipSpec:
    """What a clip looks like; built from the loader config."""
    num_frames: int
    frame_stride: int
    buckets: tuple[tuple[int, int], ...]
    reference: str = "outside"
    crop: str = "random"
    with_face: bool = False
    pose_from: str = "auto"
    decode_threads: int = 1
    face_landmarks_in_pose: bool = False  # w/lmk ablation: draw face.json landmarks into the pose
    # Whether this clip's source provides the face condition (data.sources.<name>.conditions):
    # False leaves face.json unread, so its face maps are blank and no landmarks are drawn.
    face_tracks: bool = True
    # Cached VAE latents (datapipes/latents.py) instead of the clip's pixels: the clip's and the
    # reference frame's posterior mean/std, plus the reference pixels (image prompt, previews).
    latents: bool = False

    @property
    def span(self) -> int:
        return (self.num_frames - 1) * self.frame_stride + 1


def sample_clip_indices(num_frames: int, clip_frames: int, stride: int,
                        rng: np.random.Generator) -> np.ndarray | None:
    """``clip_frames`` indices ``start + stride * i`` with a uniform random start; ``None`` when
    the video is shorter than the clip's span."""
    span = (clip_frames - 1) * stride + 1
    if num_frames < span:
        return None
    start = int(rng.integers(0, num_frames - span + 1))
    return start + stride * np.arange(clip_frames)


def sample_reference_index(num_frames: int, clip: np.ndarray, mode: str,
                           rng: np.random.Generator) -> int:
    """The reference frame: ``outside`` the clip's span (falling back to any frame when the
    clip covers the whole video), ``inside`` it (one of the clip's frames) or ``any``."""
    if mode == "inside":
        return int(clip[rng.integers(len(clip))])
    if mode == "outside":
        first, last = int(clip[0]), int(clip[-1])
        outside = first + (num_frames - 1 - last)
        if outside > 0:
            pick = int(rng.integers(outside))
            return pick if pick < first else last + 1 + (pick - first)
    return int(rng.integers(num_frames))


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) to ``height x width``."""
    ratio = math.log(height / width)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - ratio))


@dataclass(frozen=True)
class ResizeCrop:
    """Resize a ``source`` frame to ``resized`` (covering the target), then crop ``target`` at
    ``(top, left)``. The same instance is applied to video, pose and face geometry."""
    source: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    target: tuple[int, int]

    @classmethod
    def plan(cls, source: tuple[int, int], target: tuple[int, int], mode: str,
             rng: np.random.Generator) -> "ResizeCrop":
        scale = max(target[0] / source[0], target[1] / source[1])
        resized = (max(target[0], round(source[0] * scale)), max(target[1], round(source[1] * scale)))
        slack_y, slack_x = resized[0] - target[0], resized[1] - target[1]
        if mode == "random":
            top, left = int(rng.integers(slack_y + 1)), int(rng.integers(slack_x + 1))
        else:
            top, left = slack_y // 2, slack_x // 2
        return cls(tuple(source), resized, top, left, tuple(target))

    def frames(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8 (T, h, w, 3)`` frames of any size with this source's aspect ->
        ``uint8 (T, 3, H, W)`` in channels-last memory (the decoder's layout).

        Without a resize this is a view of the decoded frames: no copy and no transpose here
        (at 896x512 a channels-first copy costs a tenth of the clip's decode time); the one copy
        a frame needs happens when :func:`collate` stacks the batch, straight into shared memory.
        """
        tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # no copy when contiguous
        if tuple(tensor.shape[-2:]) != self.resized:
            tensor = _to_uint8(F.interpolate(tensor.float().contiguous(memory_format=torch.channels_last),
                                             size=self.resized, mode="bilinear", antialias=True,
                                             align_corners=False))
        height, width = self.target
        return tensor[:, :, self.top:self.top + height, self.left:self.left + width]

    def point_transform(self, source_height: int, source_width: int) -> tuple[float, float, float, float]:
        """``(scale_x, scale_y, shift_x, shift_y)`` taking pixel coordinates of a
        ``source_height x source_width`` frame to the output frame."""
        scale_x = self.resized[1] / source_width
        scale_y = self.resized[0] / source_height
        return scale_x, scale_y, -self.left, -self.top


# A face-reenactment hook: given driving frames float (F, 3, H, W) in [0, 1] and their faces,
# return frames whose faces show the same expression on another identity (cross-identity
# training condition); the default uses the driving face itself.
FaceReenactor = Callable[[torch.Tensor, list, np.random.Generator], torch.Tensor]


class ImportedFaceReenactor:
    """The ``data.face_reenactor`` hook: ``factory(**kwargs)`` from ``"module:factory"`` must return
    a :data:`FaceReenactor`. Built on first use in each worker process, so a re-enactment model
    inside it is loaded where it runs and never pickled between processes."""

    def __init__(self, target: str, kwargs: dict | None = None):
        self.target, self.kwargs = target, dict(kwargs or {})
        self.factory = import_object(target, "face_reenactor")  # fails at config time, not in a worker
        if not callable(self.factory):
            raise ValueError(f"face_reenactor={target!r} is not callable")
        self._built: FaceReenactor | None = None

    def __getstate__(self) -> dict:
        return {"target": self.target, "kwargs": self.kwargs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["target"], state["kwargs"])

    def __call__(self, frames: torch.Tensor, faces: list, rng: np.random.Generator) -> torch.Tensor:
        if self._built is None:
            self._built = self.factory(**self.kwargs)
        out = self._built(frames, faces, rng)
        if not isinstance(out, torch.Tensor) or out.shape != frames.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"face_reenactor {self.target!r} returned {got}; want frames of shape {tuple(frames.shape)}")
        return out


@dataclass(frozen=True)
class SampleDocuments:
    """What the loader needs of a sample besides its videos, validated by :func:`check_sample`."""
    meta: dict
    pose: str | None                            # member the pose comes from; None for scene clips
    keypoints: schema.PoseKeypoints | None      # with pose == pose.json
    faces: schema.FaceTrack | None              # when the spec uses face.json and the sample has one


def check_sample(key: str, members: Mapping[str, bytes], spec: ClipSpec) -> SampleDocuments:
    """Every check the loader makes of a sample before decoding it: metadata
    (:func:`datapipes.schema.sample_meta`), a video member, at least one clip span of frames, a
    pose member for human clips (as ``spec.pose_from`` picks it), and the JSON members the spec
    uses (``pose.json``, ``face.json``) matching the schema with one entry per frame. Raises
    :class:`BadSample`. ``xdyna-data inspect`` runs this same function, so it rejects what the
    loader would."""
    try:
        meta = schema.sample_meta(members.get(shards.META), key)
        count = meta["num_frames"]
        if shards.VIDEO not in members:
            raise BadSample(key, "no .mp4 member")
        if count < spec.span:
            raise BadSample(key, f"too short: {count} frames < clip span {spec.span} "
                                 f"(num_frames {spec.num_frames}, frame_stride {spec.frame_stride})")
        if meta["kind"] == "scene":
            return SampleDocuments(meta, None, None, None)
        sources = {"auto": (shards.POSE_VIDEO, shards.POSE_KEYPOINTS), "video": (shards.POSE_VIDEO,),
                   "keypoints": (shards.POSE_KEYPOINTS,)}[spec.pose_from]
        pose = next((member for member in sources if member in members), None)
        if pose is None:
            raise BadSample(key, f"human clip has no {' or '.join(sources)} member (pose_from {spec.pose_from})")
        keypoints = faces = None
        if pose == shards.POSE_KEYPOINTS:
            keypoints = schema.pose_keypoints(members[pose], f"{key}.{pose}", count)
        if (spec.with_face or spec.face_landmarks_in_pose) and spec.face_tracks and shards.FACE in members:
            faces = schema.face_track(members[shards.FACE], f"{key}.{shards.FACE}", count)
    except schema.SchemaError as error:
        raise BadSample(key, str(error)) from None
    return SampleDocuments(meta, pose, keypoints, faces)


def check_video_facts(key: str, meta: dict, num_frames: int, size: tuple[int, int] | None = None) -> None:
    """The video must have the frame count (and ``size``, height x width, once decoded) that its
    metadata states: JSON members were checked against the stated count. Raises :class:`BadSample`."""
    if num_frames != meta["num_frames"]:
        raise BadSample(key, f"metadata says {meta['num_frames']} frames, the video has {num_frames}")
    if size is not None and tuple(size) != (meta["height"], meta["width"]):
        raise BadSample(key, f"metadata says {meta['height']}x{meta['width']}, the video is {size[0]}x{size[1]}")


def load_clip(raw: shards.RawSample, spec: ClipSpec, rng: np.random.Generator,
              face_reenactor: FaceReenactor | None = None) -> tuple[int, dict]:
    """``(bucket index, sample dict)`` for one raw sample; raises :class:`BadSample`."""
    key = raw.key
    documents = check_sample(key, raw.members, spec)
    meta = documents.meta
    if spec.latents:
        from datapipes import latents as cached

        try:
            cached_array, cached_meta = cached.from_members(key, raw.members, meta["num_frames"])
        except cached.LatentsError as error:
            raise BadSample(key, str(error)) from None
    try:
        video = open_video(raw.members[shards.VIDEO], key, spec.decode_threads)
        count = len(video)
        check_video_facts(key, meta, count)
        clip = sample_clip_indices(count, spec.num_frames, spec.frame_stride, rng)
        reference_index = sample_reference_index(count, clip, spec.reference, rng)
        # From latents only the reference frame is decoded, and the clip's frames when the
        # S-Face maps are made from them.
        wanted = np.unique(np.append(clip, reference_index) if not spec.latents or spec.with_face
                           else [reference_index])
        decoded = read_frames(video, wanted, key, raw.members[shards.VIDEO])
    except VideoDecodeError as error:
        raise BadSample(key, str(error)) from None
    source = decoded.shape[1:3]
    check_video_facts(key, meta, count, source)
    position = {int(index): row for row, index in enumerate(wanted)}
    bucket = choose_bucket(*source, spec.buckets)
    geometry = ResizeCrop.plan(source, spec.buckets[bucket], spec.crop, rng)
    # Samples travel from workers as uint8 (4x less inter-process traffic than float32);
    # to_batch_contract() scales them in the main process.
    video_frames = (geometry.frames(_rows(decoded, [position[int(i)] for i in clip]))
                    if not spec.latents or spec.with_face else None)
    reference_row = position[reference_index]
    sample = {
        "reference": geometry.frames(decoded[reference_row:reference_row + 1])[0],
        "frame_index": torch.from_numpy(clip.astype(np.int64)),
        "reference_index": torch.tensor(reference_index, dtype=torch.int64),
        "is_scene": meta["kind"] == "scene",
        "__key__": key,
    }
    if spec.latents:
        if [cached_meta.get("height"), cached_meta.get("width")] != list(geometry.target) or \
                cached_meta.get("crop") != spec.crop:
            raise BadSample(key, f"latents cached at {cached_meta.get('height')}x{cached_meta.get('width')} "
                                 f"({cached_meta.get('crop')} crop), the clip is {geometry.target[0]}x"
                                 f"{geometry.target[1]} ({spec.crop} crop)")
        # (frames, 2, C, h, w) and (2, C, h, w): [.., 0] the posterior mean, [.., 1] its std
        sample["video_latents"] = torch.from_numpy(np.ascontiguousarray(cached_array[:, clip].swapaxes(0, 1)))
        sample["reference_latents"] = torch.from_numpy(np.ascontiguousarray(cached_array[:, reference_index]))
    else:
        sample["video"] = video_frames
    height, width = spec.buckets[bucket]
    if documents.pose is None:  # scene clip: blank conditions
        sample["pose"] = torch.zeros(spec.num_frames, 3, height, width, dtype=torch.uint8)
        if spec.with_face:
            sample["face"] = torch.zeros(spec.num_frames, 6, height, width, dtype=torch.uint8)
        return bucket, sample
    sample["pose"] = _pose(raw, spec, documents, clip, count, geometry)
    faces = _face_track(documents.faces, clip, geometry)
    if spec.face_landmarks_in_pose:
        sample["pose"] = _with_face_landmarks(sample["pose"], faces)
    if spec.with_face:
        sample["face"] = _face(faces, video_frames, face_reenactor, rng)
    return bucket, sample


def _pose(raw: shards.RawSample, spec: ClipSpec, documents: SampleDocuments, clip: np.ndarray,
          count: int, geometry: ResizeCrop) -> torch.Tensor:
    key = raw.key
    if documents.pose == shards.POSE_VIDEO:
        try:
            pose_video = open_video(raw.members[shards.POSE_VIDEO], f"{key}.pose.mp4", spec.decode_threads)
            if len(pose_video) != count:
                raise BadSample(key, f"pose/video frame-count mismatch: pose {len(pose_video)}, video {count}")
            pose = read_frames(pose_video, clip, f"{key}.pose.mp4", raw.members[shards.POSE_VIDEO])
        except VideoDecodeError as error:
            raise BadSample(key, str(error)) from None
        return geometry.frames(pose)
    document = documents.keypoints
    scale_x, scale_y, shift_x, shift_y = geometry.point_transform(document.height, document.width)
    height, width = geometry.target
    rendered = []
    for index in clip:
        points = document.keypoints[index].copy()
        points[:, 0] = points[:, 0] * scale_x + shift_x
        points[:, 1] = points[:, 1] * scale_y + shift_y
        rendered.append(render_pose(points, height, width, no_head=True))
    return torch.from_numpy(np.stack(rendered)).permute(0, 3, 1, 2)


def _face_track(track: schema.FaceTrack | None, clip: np.ndarray,
                geometry: ResizeCrop) -> list[FaceFrame | None]:
    """The clip's faces in output pixels; ``None`` where a frame has none (or there is no track)."""
    if track is None:
        return [None] * len(clip)
    transform = geometry.point_transform(track.height, track.width)
    return [None if track.faces[i] is None else track.faces[i].transformed(*transform) for i in clip]


def _with_face_landmarks(pose: torch.Tensor, faces: list[FaceFrame | None]) -> torch.Tensor:
    frames = pose.permute(0, 2, 3, 1).numpy()
    drawn = [frame if face is None else draw_face_landmarks(frame, face.points) for frame, face in zip(frames, faces)]
    return torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2)


def _face(faces: list[FaceFrame | None], video_frames: torch.Tensor,
          face_reenactor: FaceReenactor | None, rng: np.random.Generator) -> torch.Tensor:
    frames01 = video_frames.float() / 255.0
    if face_reenactor is not None and any(face is not None for face in faces):
        frames01 = face_reenactor(frames01, faces, rng)
    return _to_uint8(s_face_maps(frames01, faces, SFaceGeometry()) * 255.0)


def _rows(array: np.ndarray, rows: list[int]) -> np.ndarray:
    """``array[rows]``, as a view when the rows are consecutive (the clip without a reference
    frame decoded between its frames: always for ``reference`` outside or inside the clip)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return array[rows[0]:rows[0] + len(rows)]
    return array[rows]


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.round().clamp_(0, 255).to(torch.uint8)


IMAGE_KEYS = ("video", "reference", "pose", "face")
SIGNED_IMAGE_KEYS = ("video", "reference")  # what the VAE encodes; pose and face are ControlNet conditions


def to_batch_contract(batch: Mapping, dtype: torch.dtype = torch.float32) -> dict:
    """uint8 images of a batch -> the float batch contract: video and reference in [-1, 1], pose
    and face in [0, 1] (an all-zero condition stays exactly zero), contiguous (channels-first
    memory; the uint8 batch is channels-last, see :func:`collate`). Returns a new dict; images
    that are not uint8 and every other entry pass through untouched. The loader's float32 output
    and the training device (``xdyna.train.batches.to_float_batch``) both scale with this."""
    out = dict(batch)
    for name in IMAGE_KEYS:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            value = value.to(dtype, memory_format=torch.contiguous_format)
            out[name] = value.div_(127.5).sub_(1.0) if name in SIGNED_IMAGE_KEYS else value.div_(255.0)
    return out


def collate(samples: list[dict], storage: torch.UntypedStorage | None = None) -> dict:
    """Stack samples of one bucket into the batch contract of docs/design.md, as uint8.

    Image tensors keep the decoder's channels-last memory: ``(B, T, 3, H, W)`` views of
    ``(B, T, H, W, 3)`` storage, so stacking is a plain copy, not a transpose. All images of the
    batch live in one storage (:func:`images_nbytes` bytes): ``storage`` when given (a worker's
    reusable buffer, :mod:`datapipes.batch_buffers`), else new memory, shared when in a
    DataLoader worker (as torch's default_collate does), so that sending the batch to the main
    process copies nothing more.
    """
    layout, nbytes = _image_layout(samples)
    if storage is None:
        storage = (torch.UntypedStorage._new_shared(nbytes) if get_worker_info() is not None
                   else torch.UntypedStorage(nbytes))
    elif storage.nbytes() < nbytes:
        raise ValueError(f"collate: the batch's images need {nbytes} bytes, the buffer has {storage.nbytes()}")
    batch = {}
    for name, offset, shape, dtype in layout:
        out = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        batch[name] = torch.stack([s[name].movedim(-3, -1) for s in samples], out=out).movedim(-1, -3)
    batch.update({name: torch.stack([s[name] for s in samples]) for name in samples[0]
                  if name not in IMAGE_KEYS and isinstance(samples[0][name], torch.Tensor)})
    batch["is_scene"] = torch.tensor([s["is_scene"] for s in samples], dtype=torch.bool)
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch


_ALIGN = 64  # bytes; each image tensor of a batch starts on a cache line


def _image_layout(samples: list[dict]) -> tuple[list[tuple[str, int, tuple, torch.dtype]], int]:
    """``([(name, byte offset, channels-last batch shape, dtype)], total bytes)``."""
    layout, offset = [], 0
    for name in IMAGE_KEYS:
        if name in samples[0]:
            first = samples[0][name]
            shape = (len(samples),) + tuple(first.movedim(-3, -1).shape)
            layout.append((name, offset, shape, first.dtype))
            offset += -(-first.numel() * len(samples) * first.element_size() // _ALIGN) * _ALIGN
    return layout, offset


def images_nbytes(samples: list[dict]) -> int:
    """Bytes of the one storage :func:`collate` puts the batch's images in."""
    return _image_layout(samples)[1]
