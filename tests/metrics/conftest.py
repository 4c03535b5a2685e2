"""Fixtures for the metric tests: tiny random backbones saved in their public key layouts and
listed in a SHA-256 manifest (so tests run the real loading code), synthetic videos, and the
shared example data when present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datapipes.video import encode_mp4
from xdyna.metrics.adaface import AdaFaceIR
from xdyna.metrics.i3d import InceptionI3D
from xdyna.metrics.inception import FIDInceptionV3
from xdyna.metrics.lpips import LPIPSVGG
from xdyna.metrics.videomae import VIDEOMAE_TINY, VideoMAEv2Features, to_videomae_v2_original
from xdyna.metrics.weights import sha256_of

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "xdyna_examples"


@pytest.fixture(scope="session")
def examples() -> Path:
    if not (EXAMPLES / "example_1_driving.mp4").is_file():
        pytest.skip(f"shared example data not present at {EXAMPLES}")
    return EXAMPLES


def _randomise_batch_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Non-trivial running statistics, so a layout or eps mix-up changes the outputs.
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and child.running_mean is not None:
            child.running_mean.normal_(0, 0.1, generator=generator)
            child.running_var.uniform_(0.5, 1.5, generator=generator)


def tiny_checkpoints() -> dict[str, tuple[object, str]]:
    """name -> (payload to torch.save, flavour), each in the public release's container and keys."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    inception = FIDInceptionV3(input_size=75)
    kinetics = InceptionI3D(400, width=1 / 8, input_size=64, feature="logits", bn_eps=1e-3)
    dtdb = InceptionI3D(18, width=1 / 8, input_size=64, feature="pool", bn_eps=1e-5)
    videomae = VideoMAEv2Features(**VIDEOMAE_TINY)
    adaface = AdaFaceIR(18)
    for module in (inception, kinetics, dtdb, adaface):
        _randomise_batch_norms(module, generator)
    vgg = {f"features.{k}": v for k, v in LPIPSVGG().features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # the real file has a classifier; it must be ignored
    videomae_original = to_videomae_v2_original(videomae.state_dict())
    videomae_original["head.weight"] = torch.zeros(174, VIDEOMAE_TINY["hidden_size"])
    return {
        "inception_fid": (inception.net.state_dict(), "tiny"),
        "i3d_kinetics": (kinetics.state_dict(), "tiny"),
        "i3d_dtdb": ({"state_dict": dtdb.state_dict(), "epoch": 7}, "tiny"),
        "videomae_v2": ({"module": videomae_original}, "tiny"),
        "vgg16_imagenet": (vgg, "full"),
        "adaface": ({"state_dict": {**{f"model.{k}": v for k, v in adaface.state_dict().items()},
                                    "head.kernel": torch.zeros(512, 3)}}, "tiny"),
    }


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    entries = {}
    for name, (payload, flavour) in tiny_checkpoints().items():
        path = folder / f"{name}.pth"
        torch.save(payload, path)
        entries[name] = {"path": path.name, "sha256": sha256_of(path), "flavour": flavour}
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(entries))
    return manifest


def synthetic_video(seed: int, frames: int = 8, height: int = 96, width: int = 64) -> np.ndarray:
    """A moving bright square on a gradient: smooth enough for H.264, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 80 + 40 * (seed % 3))], axis=-1)
    video = np.repeat(base[None], frames, axis=0).astype(np.int64)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    for t in range(frames):
        video[t, top + t: top + t + 12, left: left + 12] = [250, 240, 30]
    return np.clip(video + rng.integers(-6, 7, video.shape), 0, 255).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path


@pytest.fixture(scope="session")
def eval_folders(tmp_path_factory) -> dict[str, Path]:
    """pred/gt/masks/ref folders of 3 synthetic 8-frame videos; pred = gt shifted by one pixel + noise."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for index in range(3):
        name = f"clip{index}"
        gt = synthetic_video(index)
        pred = np.clip(np.roll(gt, 1, axis=2).astype(int) + rng.integers(-10, 11, gt.shape), 0, 255).astype(np.uint8)
        write_video(root / "gt" / f"{name}.mp4", gt)
        write_video(root / "pred" / f"{name}.mp4", pred)
        mask = np.zeros_like(gt)
        mask[:, 24:72, 16:48] = 255
        write_video(root / "masks" / f"{name}.mp4", mask)
    return {key: root / key for key in ("gt", "pred", "masks")} | {"root": root}
