"""Checks shared by ``pack`` (before writing) and ``inspect`` (after): a sample's members
decode, agree on frame counts and meet the minimum length and resolution."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from datapipes import shards
from datapipes.face import face_track_from_json
from datapipes.pose import keypoints_from_json
from datapipes.video import VideoDecodeError, VideoInfo, info_of, open_video, read_frames

VERIFY_LEVELS = ("open", "ends", "full")


class Rejected(ValueError):
    """An input that must not go into (or is broken inside) a shard set; the message says why."""


@dataclass(frozen=True)
class Rules:
    min_frames: int = 16
    min_height: int = 64
    min_width: int = 64
    verify: str = "ends"     # open: container + first frame; ends: + middle and last; full: all


def check_video(data: bytes, name: str, verify: str) -> VideoInfo:
    """Open and decode ``data`` as far as ``verify`` asks; :class:`Rejected` if it fails."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    try:
        reader = open_video(data, name)
        info = info_of(reader)
        if verify == "ends":
            read_frames(reader, sorted({0, info.num_frames // 2, info.num_frames - 1}), name, data)
        elif verify == "full":
            for start in range(0, info.num_frames, 64):  # chunks bound the memory at full size
                read_frames(reader, range(start, min(start + 64, info.num_frames)), name, data)
    except VideoDecodeError as error:
        raise Rejected(str(error)) from None
    return info


def validate_members(key: str, members: dict[str, bytes], rules: Rules) -> dict:
    """Validate one sample's members; return its video's facts (num_frames, fps, height, width).
    Raises :class:`Rejected` with the first problem found."""
    if shards.VIDEO not in members:
        raise Rejected(f"{key}: no video (.mp4) member")
    info = check_video(members[shards.VIDEO], key, rules.verify)
    if info.num_frames < rules.min_frames:
        raise Rejected(f"{key}: too short, {info.num_frames} frames < minimum {rules.min_frames}")
    if info.height < rules.min_height or info.width < rules.min_width:
        raise Rejected(f"{key}: resolution {info.height}x{info.width} below minimum "
                       f"{rules.min_height}x{rules.min_width}")
    if shards.POSE_VIDEO in members:
        pose = check_video(members[shards.POSE_VIDEO], f"{key}.pose.mp4", rules.verify)
        if pose.num_frames != info.num_frames:
            raise Rejected(f"{key}: pose/video frame-count mismatch, pose {pose.num_frames} vs "
                           f"video {info.num_frames}")
        if abs(np.log(pose.height / pose.width) - np.log(info.height / info.width)) > 0.02:
            raise Rejected(f"{key}: pose video {pose.height}x{pose.width} has another aspect ratio "
                           f"than the video {info.height}x{info.width}")
    for member, parse in ((shards.POSE_KEYPOINTS, keypoints_from_json), (shards.FACE, face_track_from_json)):
        if member in members:
            try:
                count = len(parse(json.loads(members[member]), f"{key}.{member}"))
            except ValueError as error:
                raise Rejected(f"{key}: {error}") from None
            if count != info.num_frames:
                raise Rejected(f"{key}: {member} has {count} frames, video {info.num_frames}")
    return {"num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width}
