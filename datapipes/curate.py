"""From raw footage to training clips: shots, clip spans, a motion score, a person count.

``pack --shots`` (in each part, before packing) runs :func:`curate_items` on its raw videos:

1. Shots: PySceneDetect's ``ContentDetector`` (HSV content change between consecutive frames,
   ``shot_threshold``) over frames decoded by decord at a small analysis size.
2. Clip spans: each shot loses ``cut_margin`` frames on each side that touches a cut (a frame at
   or next to a cut, often a blend or a compression smear, is never a clip's first frame), then is
   cut into clips of at most ``max_clip_frames``; what is shorter than ``min_clip_frames`` is
   left out (a decision with its length).
3. Motion: the mean magnitude of OpenCV's Farneback optical flow between ``motion_pairs``
   consecutive-frame pairs spread over the clip, in pixels per frame at the analysis size
   (``motion: diff`` measures the mean absolute grey-level difference instead, cheaper but it
   also rises with noise, flicker and lighting; docs/data.md has the figures that chose flow).
   Scene clips below ``min_motion`` are left out of the scene pool: harmonic data fusion exists
   to teach dynamics, and a still landscape teaches none.
4. People (human clips, with ``person_detector_model``): the most people the YOLOX detector finds
   in ``people_frames`` frames; clips with more than ``max_people`` are left out.

Every clip considered becomes one decision ``{"key", "video", "shot", "start", "end", "frames",
"motion", "people", "decision": keep|drop, "reason"}`` in the part's record and the index, so
thresholds can be retuned from the index without decoding again. Kept clips are re-encoded
(H.264, full resolution) into the part's staging folder and packed like any input.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from datapipes.pack import PackItem, key_from_path
from datapipes.video import VideoDecodeError, encode_mp4

MOTION_METHODS = ("farneback", "diff")


@dataclass(frozen=True)
class CurateConfig:
    shot_threshold: float = 27.0      # ContentDetector's default
    min_clip_frames: int = 16
    max_clip_frames: int = 128
    cut_margin: int = 2               # frames dropped on each side of a cut
    motion: str = "farneback"
    # Scene clips with less motion are left out. Farneback px/frame at analysis_size: a still
    # frame scores ~0, real dance clips 0.3-1.6 (docs/data.md, "Curation").
    min_motion: float = 0.1
    motion_pairs: int = 8
    analysis_size: int = 128          # short side (px) of the frames shots and motion are measured on
    max_people: int = 1
    person_detector_model: str | None = None
    people_frames: int = 4
    people_min_score: float = 0.3

    def validate(self) -> "CurateConfig":
        try:
            import cv2  # noqa: F401
            import scenedetect  # noqa: F401
        except ImportError as error:
            raise ImportError(f"--shots needs the curate extra (pip install -e '.[curate]': scenedetect, "
                              f"opencv-python-headless): {error}") from None
        if self.motion not in MOTION_METHODS:
            raise ValueError(f"--motion must be one of {MOTION_METHODS}, got {self.motion!r}")
        if not 1 <= self.min_clip_frames <= self.max_clip_frames:
            raise ValueError(f"need 1 <= --min-clip-frames ({self.min_clip_frames}) <= --max-clip-frames "
                             f"({self.max_clip_frames})")
        if self.cut_margin < 0 or self.motion_pairs < 1 or self.analysis_size < 16 or self.people_frames < 1:
            raise ValueError("--cut-margin must be >= 0, motion pairs and people frames >= 1, analysis size >= 16")
        if not (math.isfinite(self.min_motion) and self.min_motion >= 0):
            raise ValueError(f"--min-motion must be a finite number >= 0, got {self.min_motion}")
        if self.person_detector_model and not os.path.isfile(self.person_detector_model):
            raise FileNotFoundError(f"--person-detector-model {self.person_detector_model!r} does not exist")
        return self


def _reader(path: str, size: int | None = None):
    """A decord reader of ``path``, scaled so its short side is ``size`` (even sizes)."""
    import decord

    try:
        reader = decord.VideoReader(path, num_threads=1)
        if size is None:
            return reader
        height, width = reader[0].shape[:2]
        scale = size / min(height, width)
        target = (max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2))
        return decord.VideoReader(path, num_threads=1, height=target[0], width=target[1])
    except Exception as error:  # decord's errors carry C++ text
        raise VideoDecodeError(path, str(error).strip().splitlines()[0][:300] if str(error).strip() else "") from None


def detect_shots(reader, threshold: float = 27.0, chunk: int = 128) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` (end exclusive) covering every frame of ``reader``, split where
    PySceneDetect's ContentDetector finds a cut. Frames are streamed in chunks: memory does not
    grow with the video's length."""
    import cv2
    from scenedetect.detectors import ContentDetector

    # min_scene_len 1: the clip length rules below decide what is too short, with a recorded reason.
    detector = ContentDetector(threshold=threshold, min_scene_len=1)
    total, cuts = len(reader), []
    for start in range(0, total, chunk):
        frames = reader.get_batch(list(range(start, min(start + chunk, total)))).asnumpy()
        for offset, frame in enumerate(frames):
            cuts.extend(detector.process_frame(start + offset, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)))
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < total) + [total]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def clip_spans(shots: list[tuple[int, int]], total: int, config: CurateConfig) -> list[dict]:
    """Clip spans of the shots: ``{"shot", "start", "end", "keep", "reason"}``; see the module
    docstring (margins at cuts, at most ``max_clip_frames``, shorter than ``min_clip_frames`` dropped)."""
    spans = []
    for number, (start, end) in enumerate(shots):
        first = start + (config.cut_margin if start > 0 else 0)       # a cut before: skip its margin
        stop = end - (config.cut_margin if end < total else 0)        # a cut after: likewise
        if stop - first < config.min_clip_frames:
            spans.append({"shot": number, "start": start, "end": end, "keep": False,
                          "reason": f"shot has {max(0, stop - first)} usable frames < --min-clip-frames "
                                    f"{config.min_clip_frames}"})
            continue
        for clip_start in range(first, stop, config.max_clip_frames):
            clip_end = min(clip_start + config.max_clip_frames, stop)
            short = clip_end - clip_start < config.min_clip_frames
            spans.append({"shot": number, "start": clip_start, "end": clip_end, "keep": not short,
                          "reason": (f"rest of the shot has {clip_end - clip_start} frames < --min-clip-frames "
                                     f"{config.min_clip_frames}") if short else None})
    return spans


def _pair_starts(start: int, end: int, pairs: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(start, end - 2, pairs).round()}) if end - start >= 2 else []


def motion_score(reader, start: int, end: int, method: str = "farneback", pairs: int = 8) -> float:
    """Mean motion of frames ``[start, end)`` of ``reader`` over ``pairs`` consecutive-frame pairs:
    Farneback flow magnitude (px/frame at the reader's size) or mean absolute grey difference (0..255)."""
    import cv2

    firsts = _pair_starts(start, end, pairs)
    if not firsts:
        return 0.0
    indices = sorted({i for first in firsts for i in (first, first + 1)})
    frames = dict(zip(indices, reader.get_batch(indices).asnumpy()))
    grey = {i: cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for i, frame in frames.items()}
    values = []
    for first in firsts:
        a, b = grey[first], grey[first + 1]
        if method == "diff":
            values.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
        else:
            # OpenCV's documented example parameters (pyramid 0.5 x 3 levels, window 15).
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
            values.append(float(np.linalg.norm(flow, axis=2).mean()))
    return float(np.mean(values))


def _non_max_count(boxes: np.ndarray, scores: np.ndarray, min_score: float, overlap: float = 0.45) -> int:
    """People in one frame: boxes over ``min_score`` after greedy non-maximum suppression."""
    order = [int(i) for i in np.argsort(-scores) if scores[i] >= min_score]
    kept: list[np.ndarray] = []
    for i in order:
        box = boxes[i]
        area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
        duplicate = False
        for other in kept:
            w = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
            h = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
            union = area + (other[2] - other[0]) * (other[3] - other[1]) - w * h
            if union > 0 and w * h / union > overlap:
                duplicate = True
                break
        if not duplicate:
            kept.append(box)
    return len(kept)


_detectors: dict = {}


def count_people(reader, start: int, end: int, config: CurateConfig) -> int:
    """The most people the YOLOX person detector finds in ``people_frames`` frames of the clip."""
    from datapipes.pose_estimator import YoloxPersonBox

    path = config.person_detector_model
    if path not in _detectors:  # one ONNX session per process
        _detectors[path] = YoloxPersonBox(path, min_score=config.people_min_score)
    detector = _detectors[path]
    indices = sorted({int(i) for i in np.linspace(start, end - 1, config.people_frames).round()})
    counts = []
    for frame in reader.get_batch(indices).asnumpy():
        boxes, scores = detector.detect(frame)
        counts.append(_non_max_count(boxes, scores, config.people_min_score))
    return max(counts)


def curate_video(item: PackItem, clip_dir: str, config: CurateConfig,
                 max_video_bytes: float = float("inf")) -> tuple[list[PackItem], list[dict]]:
    """Cut one raw video into clips: the kept clips as pack inputs (re-encoded into ``clip_dir``)
    and a decision for every clip considered. A video that fails pack's source checks (a FIFO, a
    directory, empty, too large, no container) or cannot be decoded here is passed on unchanged:
    ``pack`` quarantines it with its own reason."""
    from datapipes.pack import _check_container
    from datapipes.validate import Rejected

    key = item.key or key_from_path(item.video)
    try:
        _check_container(item.video, "video", max_video_bytes)  # before any decoder opens it
    except Rejected:
        return [item], []
    if item.pose_video or item.keypoints or item.face:
        return [replace(item, problem="--shots cuts raw footage, but this input has pose/face companions "
                                      "(their frames cannot follow the cuts): pack it without --shots")], []
    try:
        small = _reader(item.video, config.analysis_size)
        shots = detect_shots(small, config.shot_threshold)
    except (VideoDecodeError, RuntimeError, ValueError, OSError):
        return [item], []
    full, fps = None, None
    clips, decisions = [], []
    for number, span in enumerate(clip_spans(shots, len(small), config)):
        clip_key = f"{key}/shot{span['shot']:04d}-{number:03d}"
        decision = {"key": clip_key, "video": item.source or item.video, "kind": item.kind, "shot": span["shot"],
                    "start": span["start"], "end": span["end"], "frames": span["end"] - span["start"],
                    "motion": None, "motion_method": config.motion, "people": None,
                    "decision": "keep" if span["keep"] else "drop", "reason": span["reason"]}
        decisions.append(decision)
        if not span["keep"]:
            continue
        decision["motion"] = round(motion_score(small, span["start"], span["end"], config.motion,
                                                config.motion_pairs), 4)
        if item.kind == "scene" and decision["motion"] < config.min_motion:
            decision.update(decision="drop", reason=f"scene clip motion {decision['motion']:.3f} < --min-motion "
                                                    f"{config.min_motion:g} ({config.motion})")
            continue
        if item.kind == "human" and config.person_detector_model:
            decision["people"] = count_people(small, span["start"], span["end"], config)
            if decision["people"] > config.max_people:
                decision.update(decision="drop", reason=f"{decision['people']} people > --max-people "
                                                        f"{config.max_people}")
                continue
        if full is None:
            full = _reader(item.video)
            fps = float(full.get_avg_fps())
        frames = full.get_batch(list(range(span["start"], span["end"]))).asnumpy()
        path = os.path.join(clip_dir, f"{clip_key}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(encode_mp4(frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2], fps))
        clips.append(PackItem(video=path, kind=item.kind, key=clip_key, source=item.source or item.video,
                              license=item.license))
    return clips, decisions


def _curate_task(item: PackItem, job: tuple) -> tuple[list[PackItem], list[dict]]:
    """:func:`curate_video` for a pack worker (``job`` = ``(clip_dir, config, max_video_bytes)``): an error on one
    video (OpenCV's, a decoder's) hands that video on with the reason, to be quarantined."""
    clip_dir, config, max_video_bytes = job
    try:
        return curate_video(item, clip_dir, config, max_video_bytes)
    except Exception as error:
        text = (str(error).strip() or type(error).__name__).splitlines()[0][:300]
        return _curate_failure(item, f"cutting it into clips failed: {type(error).__name__}: {text}")


def _curate_failure(item: PackItem, reason: str) -> tuple[list[PackItem], list[dict]]:
    return [replace(item, problem=f"--shots: {reason}")], []


def curate_items(items: list[PackItem], clip_dir: str, config: CurateConfig, workers: int = 0,
                 item_timeout: float | None = None,
                 max_video_bytes: float = float("inf")) -> tuple[list[PackItem], list[dict]]:
    """:func:`curate_video` over ``items``, in input order, in ``workers`` processes of pack's
    worker pool (0: here): a video whose worker crashes or overruns ``item_timeout`` is handed on
    with that reason and quarantined, as in validation. Items with a ``problem`` pass unchanged."""
    from datapipes.pack import _WorkerPool

    todo = [item for item in items if not item.problem]
    job = (clip_dir, config, max_video_bytes)
    pool, finished = None, False
    try:
        if workers > 0 and todo:
            pool = _WorkerPool(min(workers, len(todo)), job, "spawn", task=_curate_task,
                               failure=_curate_failure, timeout=item_timeout)
            results = pool.results(todo)
        else:
            results = (_curate_task(item, job) for item in todo)
        clips, decisions = [], []
        for item in items:
            kept, decided = ([item], []) if item.problem else next(results)
            clips.extend(kept)
            decisions.extend(decided)
        finished = True
    finally:
        if pool:
            pool.close(force=not finished)
    return clips, decisions
