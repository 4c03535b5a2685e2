"""Procedural clips for tests and the demo: a moving stick figure on an animated background
(``human``: video, head-less skeleton video, keypoints, face track) and background-only clips
(``scene``: drifting waves and blobs, no pose or face members).

Everything is a pure function of the seed, so a shard set can be regenerated bit for bit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from datapipes.face import FaceFrame, face_track_to_json
from datapipes.pose import keypoints_to_json, render_pose_video, stroke_width
from datapipes.shards import ShardSink, brace_pattern, make_sample
from datapipes.video import encode_mp4

SYNTHETIC_LICENSE = "CC0-1.0"


def animated_background(rng: np.random.Generator, frames: int, height: int, width: int,
                        blobs: int = 0) -> np.ndarray:
    """``uint8 (T, H, W, 3)``: travelling colour waves, plus ``blobs`` drifting discs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    freq = rng.uniform(0.5, 2.5, size=(3, 2)) * 2 * np.pi / np.array([width, height])
    speed = rng.uniform(0.2, 0.8, size=3) * 2 * np.pi
    centres = rng.uniform(0, 1, size=(blobs, 2)) * [width, height]
    velocity = rng.uniform(-0.08, 0.08, size=(blobs, 2)) * [width, height]
    radius = rng.uniform(0.08, 0.2, size=blobs) * min(height, width)
    colours = rng.uniform(0, 255, size=(blobs, 3))
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        phase = speed * t / 8.0
        frame = np.stack([base[c] + 45 * np.sin(freq[c, 0] * x + freq[c, 1] * y + phase[c])
                          for c in range(3)], axis=-1)
        for centre, step, r, colour in zip(centres, velocity, radius, colours):
            cx, cy = (centre + step * t) % [width, height]
            inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
            frame[inside] = 0.4 * frame[inside] + 0.6 * colour
        video[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return video


@dataclass
class StickFigure:
    """A walking stick figure whose limbs swing over time, in OpenPose-18 keypoints."""
    height: int
    width: int
    phase: float
    tempo: float
    drift: float

    @property
    def scale(self) -> float:
        return 0.9 * min(self.height, 2.2 * self.width)

    def keypoints(self, t: int) -> np.ndarray:
        s = self.scale
        top = (self.height - s) / 2
        angle = self.phase + self.tempo * t
        cx = self.width / 2 + self.drift * self.width * math.sin(0.5 * angle)
        swing = 0.6 * math.sin(angle)
        points = np.zeros((18, 3))
        points[:, 2] = 1.0

        def at(index, x, y):
            points[index, :2] = (x, top + y)

        def limb(index, origin, length, theta):
            ox, oy = points[origin, 0], points[origin, 1] - top
            at(index, ox + length * s * math.sin(theta), oy + length * s * math.cos(theta))

        at(0, cx, 0.13 * s)                      # nose
        at(1, cx, 0.22 * s)                      # neck
        at(2, cx - 0.09 * s, 0.24 * s)           # right shoulder (image left)
        at(5, cx + 0.09 * s, 0.24 * s)
        limb(3, 2, 0.15, -0.3 + swing)           # elbows and wrists swing in opposite phase
        limb(4, 3, 0.14, -0.1 + 1.4 * swing)
        limb(6, 5, 0.15, 0.3 - swing)
        limb(7, 6, 0.14, 0.1 - 1.4 * swing)
        at(8, cx - 0.05 * s, 0.52 * s)
        at(11, cx + 0.05 * s, 0.52 * s)
        limb(9, 8, 0.2, -0.6 * swing)
        limb(10, 9, 0.2, -0.3 * swing)
        limb(12, 11, 0.2, 0.6 * swing)
        limb(13, 12, 0.2, 0.3 * swing)
        at(14, cx - 0.025 * s, 0.115 * s)        # eyes and ears
        at(15, cx + 0.025 * s, 0.115 * s)
        at(16, cx - 0.05 * s, 0.125 * s)
        at(17, cx + 0.05 * s, 0.125 * s)
        return points

    def head(self, t: int) -> tuple[float, float, float, float]:
        """Head ellipse centre and radii."""
        nose = self.keypoints(t)[0]
        return nose[0], nose[1] - 0.005 * self.scale, 0.055 * self.scale, 0.07 * self.scale

    def face(self, t: int) -> FaceFrame:
        """A box and 68 iBUG-ordered landmarks laid out on the head ellipse; mouth and eyes
        open and close over time so the track carries an expression signal."""
        hx, hy, rx, ry = self.head(t)
        mouth_open = 0.5 + 0.5 * math.sin(0.9 * t + self.phase)
        eye_open = 1.0 if (t + int(self.phase * 10)) % 7 else 0.15
        jaw = [(hx + rx * math.cos(a), hy + ry * math.sin(a)) for a in np.linspace(math.pi, 0, 17)]
        brows = [(hx + rx * f, hy - 0.4 * ry) for f in np.linspace(-0.75, -0.15, 5)]
        brows += [(hx + rx * f, hy - 0.4 * ry) for f in np.linspace(0.15, 0.75, 5)]
        bridge = [(hx, hy + ry * f) for f in np.linspace(-0.3, 0.1, 4)]
        nostrils = [(hx + rx * f, hy + 0.2 * ry) for f in np.linspace(-0.25, 0.25, 5)]
        eyes = []
        for ex in (hx - 0.4 * rx, hx + 0.4 * rx):
            eyes += [(ex + 0.2 * rx * math.cos(a), hy - 0.15 * ry + 0.08 * ry * eye_open * math.sin(a))
                     for a in np.linspace(math.pi, -math.pi, 6, endpoint=False)]
        my = hy + 0.5 * ry
        outer = [(hx + 0.4 * rx * math.cos(a), my + (0.05 + 0.12 * mouth_open) * ry * math.sin(a))
                 for a in np.linspace(math.pi, -math.pi, 12, endpoint=False)]
        inner = [(hx + 0.25 * rx * math.cos(a), my + 0.1 * mouth_open * ry * math.sin(a))
                 for a in np.linspace(math.pi, -math.pi, 8, endpoint=False)]
        points = np.asarray(jaw + brows + bridge + nostrils + eyes + outer + inner)
        return FaceFrame((hx - rx, hy - ry, hx + rx, hy + ry), points, 1.0)

    def draw(self, frame: np.ndarray, t: int, colour: tuple[int, int, int]) -> np.ndarray:
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        points = self.keypoints(t)
        line = 2 * stroke_width(self.height, self.width) + 1
        for a, b in ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (1, 11), (8, 11),
                     (8, 9), (9, 10), (11, 12), (12, 13)):
            draw.line([tuple(points[a, :2]), tuple(points[b, :2])], fill=colour, width=line)
        hx, hy, rx, ry = self.head(t)
        draw.ellipse([hx - rx, hy - ry, hx + rx, hy + ry], fill=(224, 182, 150))
        face = self.face(t).points
        for eye in (face[36:42], face[42:48]):
            (x0, y0), (x1, y1) = eye.min(0), eye.max(0)
            draw.ellipse([x0, y0, x1, max(y1, y0 + 1)], fill=(30, 30, 30))
        (x0, y0), (x1, y1) = face[48:60].min(0), face[48:60].max(0)
        draw.ellipse([x0, y0, x1, max(y1, y0 + 1)], fill=(150, 40, 50))
        return np.asarray(image)


def human_clip(seed: int, frames: int, height: int, width: int) -> dict:
    """Video, skeleton video, keypoints and face track of one synthetic person clip."""
    rng = np.random.default_rng(seed)
    video = animated_background(rng, frames, height, width, blobs=1)
    figure = StickFigure(height, width, phase=rng.uniform(0, 2 * np.pi),
                         tempo=rng.uniform(0.4, 0.9), drift=rng.uniform(0.05, 0.15))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    video = np.stack([figure.draw(video[t], t, colour) for t in range(frames)])
    keypoints = np.stack([figure.keypoints(t) for t in range(frames)])
    return {"video": video, "pose": render_pose_video(keypoints, height, width, no_head=True),
            "keypoints": keypoints, "faces": [figure.face(t) for t in range(frames)]}


def scene_clip(seed: int, frames: int, height: int, width: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"video": animated_background(rng, frames, height, width, blobs=int(rng.integers(2, 5)))}


def synthetic_sample(kind: str, index: int, seed: int, frames: int, height: int, width: int,
                     fps: float = 8.0) -> dict:
    """One shard sample (``make_sample`` dict) of kind ``human`` or ``scene``."""
    key = f"{kind}-{index:06d}"
    clip_seed = int(np.random.SeedSequence([seed, 0 if kind == "human" else 1, index]).generate_state(1)[0])
    meta = {"fps": fps, "num_frames": frames, "height": height, "width": width, "kind": kind,
            "source": f"synthetic:{key}", "license": SYNTHETIC_LICENSE, "seed": clip_seed}
    if kind == "scene":
        return make_sample(key, encode_mp4(scene_clip(clip_seed, frames, height, width)["video"], fps), meta)
    clip = human_clip(clip_seed, frames, height, width)
    return make_sample(key, encode_mp4(clip["video"], fps), meta,
                       pose_video=encode_mp4(clip["pose"], fps),
                       face=face_track_to_json(clip["faces"], height, width, detector="synthetic"),
                       pose_keypoints=keypoints_to_json(clip["keypoints"], height, width))


@dataclass
class SynthSummary:
    urls: list[str]
    human: int
    scene: int

    def __str__(self) -> str:
        return (f"wrote {self.human} human + {self.scene} scene clips to {len(self.urls)} shard(s): "
                f"{brace_pattern(self.urls)}")


def write_synthetic_shards(out_dir: str, human: int, scene: int, frames: int, height: int,
                           width: int, seed: int = 0, shard_size: int = 100, fps: float = 8.0,
                           progress: bool = False) -> SynthSummary:
    """Write ``human`` + ``scene`` synthetic clips, kinds interleaved in a seeded order so every
    shard mixes both, as ``out_dir/synthetic-%06d.tar`` shards of ``shard_size`` samples."""
    if human < 0 or scene < 0 or human + scene == 0:
        raise ValueError(f"synth needs at least one clip, got human={human} scene={scene}")
    if frames < 1 or height < 2 or width < 2:
        raise ValueError(f"synth needs frames >= 1 and a size >= 2x2, got {frames}x{height}x{width}")
    if height % 2 or width % 2:
        raise ValueError(f"synth needs even height and width (H.264 yuv420p), got {height}x{width}")
    if os.path.isdir(out_dir) and any(name.endswith(".tar") for name in os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir!r} already holds .tar shards; choose an empty directory")
    order = [("human", i) for i in range(human)] + [("scene", i) for i in range(scene)]
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    from tqdm import tqdm

    with ShardSink(out_dir, prefix="synthetic", max_count=shard_size) as sink:
        for kind, index in tqdm(order, desc="synth", unit="clip", disable=not progress):
            sink.write(synthetic_sample(kind, index, seed, frames, height, width, fps))
    return SynthSummary(sink.urls, human, scene)
