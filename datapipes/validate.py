"""Checks shared by ``pack`` (before writing) and ``inspect`` (after): a sample's members
decode, agree on frame counts and meet the minimum length and resolution."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from datapipes import shards
from datapipes.face import face_track_from_json
from datapipes.pose import keypoints_from_json, person_frames
from datapipes.video import Source, VideoDecodeError, VideoInfo, info_of, open_video, read_frames

VERIFY_LEVELS = ("open", "ends", "full")
# A pose video whose checked frames never exceed this value is black: nobody was drawn
# (H.264 keeps black at 0, a small margin absorbs its noise).
BLACK_LEVEL = 16
# Warning categories of :func:`validate_members` (counted by ``pack``'s summary).
NO_PERSON = "no person"
NO_FACE = "no face"


class Rejected(ValueError):
    """An input that must not go into (or is broken inside) a shard set; the message says why."""


@dataclass(frozen=True)
class Rules:
    min_frames: int = 16
    min_height: int = 64
    min_width: int = 64
    verify: str = "ends"     # open: container + first frame; ends: + middle and last; full: all


def check_video(source: Source, name: str, verify: str) -> tuple[VideoInfo, int]:
    """Open and decode ``source`` (bytes, or a local path) as far as ``verify`` asks; return its
    facts and the brightest value of the frames decoded. :class:`Rejected` if any decoder error
    occurs at any frame, or if the header gives no usable frame rate."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    try:
        reader = open_video(source, name)
        info = info_of(reader, name)
        if verify == "full":  # chunks bound the memory at full size
            chunks = [range(start, min(start + 64, info.num_frames)) for start in range(0, info.num_frames, 64)]
        else:
            chunks = [[0] if verify == "open" else sorted({0, info.num_frames // 2, info.num_frames - 1})]
        peak = max(int(read_frames(reader, chunk, name, source).max()) for chunk in chunks)
    except VideoDecodeError as error:
        raise Rejected(str(error)) from None
    if not (math.isfinite(info.fps) and info.fps > 0):
        # A header without a duration gives fps NaN or 0: it cannot be stored (NaN is not JSON)
        # and no clip timing can be derived from it.
        raise Rejected(f"video {name!r}: frame rate {info.fps} from its header (no duration?); "
                       f"remux it, e.g. ffmpeg -i IN -c copy OUT, or re-encode it with -r FPS")
    return info, peak


def validate_members(key: str, members: Mapping[str, Source], rules: Rules,
                     warnings: list[tuple[str, str]] | None = None) -> dict:
    """Validate one sample's members; return its video's facts (num_frames, fps, height, width).
    Raises :class:`Rejected` with the first problem found. Video members may be bytes or local
    paths (``pack`` decodes sources in place, so a rejected file is never read whole); JSON
    members are bytes. With ``warnings``, ``(category, message)`` pairs are appended for a
    sample that is valid but suspicious: :data:`NO_PERSON`, :data:`NO_FACE`."""
    if shards.VIDEO not in members:
        raise Rejected(f"{key}: no video (.mp4) member")
    info, _ = check_video(members[shards.VIDEO], key, rules.verify)
    if info.num_frames < rules.min_frames:
        raise Rejected(f"{key}: too short, {info.num_frames} frames < minimum {rules.min_frames}")
    if info.height < rules.min_height or info.width < rules.min_width:
        raise Rejected(f"{key}: resolution {info.height}x{info.width} below minimum "
                       f"{rules.min_height}x{rules.min_width}")
    notes = warnings if warnings is not None else []
    if shards.POSE_VIDEO in members:
        pose, peak = check_video(members[shards.POSE_VIDEO], f"{key}.pose.mp4", rules.verify)
        if pose.num_frames != info.num_frames:
            raise Rejected(f"{key}: pose/video frame-count mismatch, pose {pose.num_frames} vs "
                           f"video {info.num_frames}")
        if abs(np.log(pose.height / pose.width) - np.log(info.height / info.width)) > 0.02:
            raise Rejected(f"{key}: pose video {pose.height}x{pose.width} has another aspect ratio "
                           f"than the video {info.height}x{info.width}")
        if peak <= BLACK_LEVEL:
            notes.append((NO_PERSON, f"{key}: pose video is black in every frame checked (--verify "
                                     f"{rules.verify}): no person drawn"))
    for member, parse in ((shards.POSE_KEYPOINTS, keypoints_from_json), (shards.FACE, face_track_from_json)):
        if member in members:
            try:
                parsed = parse(members[member], f"{key}.{member}")
            except ValueError as error:
                raise Rejected(f"{key}: {error}") from None
            if len(parsed) != info.num_frames:
                raise Rejected(f"{key}: {member} has {len(parsed)} frames, video {info.num_frames}")
            notes.extend(content_warnings(key, member, parsed))
    return {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width}


def content_warnings(key: str, member: str, parsed) -> list[tuple[str, str]]:
    """``(category, message)`` for keypoints in which nobody is seen in any frame, or a face
    track without a face in any frame (``parsed``: the member's parsed content)."""
    if member == shards.POSE_KEYPOINTS and not person_frames(parsed).any():
        return [(NO_PERSON, f"{key}: {member} sees no person in any of its {len(parsed)} frames")]
    if member == shards.FACE and all(face is None for face in parsed):
        return [(NO_FACE, f"{key}: {member} has no face in any of its {len(parsed)} frames")]
    return []
