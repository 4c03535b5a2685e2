"""Distribution metrics: FID on frames, FVD / cd-FVD / DTFVD on clips, each on the full frame
or its masked foreground / background. One spec table, one extractor builder, one Frechet
distance; the region is a parameter, never a copy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .i3d import InceptionI3D
from .inception import FIDInceptionV3
from .masks import REGIONS
from .videomae import VIDEOMAE_TINY, VideoMAEv2Features, convert_videomae_v2_state_dict
from .weights import WeightsManifest, load_checkpoint, load_into


@dataclass(frozen=True)
class DistributionSpec:
    weights: str  # manifest entry of the backbone
    unit: str  # "frame" or "clip"
    description: str


DISTRIBUTION_BASES = {
    "fid": DistributionSpec("inception_fid", "frame", "FID, Inception-v3 pool features of single frames"),
    "fvd": DistributionSpec("i3d_kinetics", "clip", "FVD, I3D (Kinetics-400) logits of clips"),
    "dtfvd": DistributionSpec("i3d_dtdb", "clip", "DTFVD, I3D trained on DTDB, 1024-d pool features of clips"),
    "cd_fvd": DistributionSpec("videomae_v2", "clip", "cd-FVD, VideoMAE-v2 ViT-g features of clips"),
}


def split_region(name: str) -> tuple[str, str]:
    """``fg_dtfvd`` -> (``fg``, ``dtfvd``); ``fid`` -> (``full``, ``fid``)."""
    for region in REGIONS[1:]:
        if name.startswith(region + "_") and name[len(region) + 1:] in DISTRIBUTION_BASES:
            return region, name[len(region) + 1:]
    if name in DISTRIBUTION_BASES:
        return "full", name
    raise KeyError(name)


DISTRIBUTION_METRICS = tuple(base if region == "full" else f"{region}_{base}"
                             for base in DISTRIBUTION_BASES for region in REGIONS)


def _build_backbone(base: str, flavour: str) -> nn.Module:
    tiny = flavour == "tiny"
    if flavour not in ("full", "tiny"):
        raise ValueError(f"flavour of {DISTRIBUTION_BASES[base].weights!r} must be 'full' or 'tiny', got {flavour!r}")
    if base == "fid":
        return FIDInceptionV3(input_size=75 if tiny else 299)
    if base == "fvd":
        return InceptionI3D(400, width=1 / 8 if tiny else 1.0, input_size=64 if tiny else 224, feature="logits", bn_eps=1e-3)
    if base == "dtfvd":
        return InceptionI3D(18, width=1 / 8 if tiny else 1.0, input_size=64 if tiny else 224, feature="pool", bn_eps=1e-5)
    return VideoMAEv2Features(**(VIDEOMAE_TINY if tiny else {}))


def build_extractor(base: str, manifest: WeightsManifest, device: str | torch.device = "cpu") -> nn.Module:
    """The backbone for ``base`` with weights from the manifest (verified by SHA-256)."""
    spec = DISTRIBUTION_BASES[base]
    entry = manifest.resolve(spec.weights, needed_by=base)
    net = _build_backbone(base, entry.flavour)
    state = load_checkpoint(entry)
    if base == "fid":
        load_into(net.net, state, spec.weights, entry.path)
    elif base == "cd_fvd":
        load_into(net, convert_videomae_v2_state_dict(state), spec.weights, entry.path)
    else:
        load_into(net, state, spec.weights, entry.path)
    return net.eval().to(device)


def required_clip_frames(extractor: nn.Module) -> int | None:
    """Clip length an extractor insists on (VideoMAE's positional table), else None."""
    return extractor.config.num_frames if isinstance(extractor, VideoMAEv2Features) else None
