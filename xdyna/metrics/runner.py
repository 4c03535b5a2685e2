"""One evaluation run: stream every matched video pair chunk by chunk, accumulate per-frame
values, features and face results, then aggregate into a JSON-ready report."""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .distribution import DISTRIBUTION_BASES, DISTRIBUTION_METRICS, build_extractor, required_clip_frames, split_region
from .face import (FaceDetector, ExpressionBackend, aligned_faces, build_adaface, embed_faces, expression_errors,
                   face_cosines)
from .fidelity import FIDELITY_METRICS, fidelity_per_frame, to_unit_float
from .frechet import frechet_with_bootstrap
from .lpips import build_lpips
from .masks import Segmenter, apply_region, masks_from_video_frames
from .sources import EvalInputError, VideoPair, read_image
from .weights import WeightsManifest

FACE_METRICS = ("face_det", "face_cos", "face_exp")
ALL_METRICS = tuple(FIDELITY_METRICS) + DISTRIBUTION_METRICS + FACE_METRICS
METRIC_GROUPS = {
    "cheap": ("l1", "psnr", "ssim", "lpips", "face_det"),
    "fidelity": ("l1", "psnr", "ssim", "lpips"),
    "disco": ("disco_l1", "disco_psnr", "disco_ssim", "disco_lpips"),
    "paper": ("l1", "psnr", "ssim", "lpips", "disco_l1", "disco_psnr", "disco_ssim", "disco_lpips", "fid", "fg_fid",
              "bg_fid", "dtfvd", "fg_dtfvd", "bg_dtfvd", "cd_fvd", "face_det", "face_cos"),
}


# What xdyna-eval computes without --metrics: of these, the ones whose weights and packages are at hand.
DEFAULT_METRICS = ("cheap",)


def metric_weights(metric: str) -> tuple[str, ...]:
    """The weights-manifest entries ``metric`` cannot run without (LPIPS's heads ship in a wheel;
    MTCNN's weights ship in facenet-pytorch)."""
    if metric in ("lpips", "disco_lpips"):
        return ("vgg16_imagenet",)
    if metric in DISTRIBUTION_METRICS:
        return (DISTRIBUTION_BASES[split_region(metric)[1]].weights,)
    if metric == "face_cos":
        return ("adaface",)
    return ()


# An optional dependency (pyproject's ``faces`` extra): MTCNN, with its weights inside the wheel.
FACE_PACKAGE = "facenet_pytorch"
FACE_PACKAGE_HINT = "the facenet-pytorch package (pip install --no-deps 'facenet-pytorch>=2.6,<2.7')"


def _package_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def missing_requirements(metric: str, manifest: WeightsManifest) -> list[str]:
    """What ``metric`` lacks to run here, each as a phrase naming how to supply it; [] if nothing."""
    needs = [f"weights manifest entry {name!r}" for name in metric_weights(metric) if name not in manifest]
    if metric in FACE_METRICS and not _package_available(FACE_PACKAGE):
        needs.append(FACE_PACKAGE_HINT)
    return needs


def usable_metrics(metrics: Sequence[str], manifest: WeightsManifest) -> tuple[list[str], dict[str, list[str]]]:
    """``(metrics that can run here, {skipped metric: what it lacks})`` (see :func:`missing_requirements`)."""
    usable, skipped = [], {}
    for metric in metrics:
        missing = missing_requirements(metric, manifest)
        if missing:
            skipped[metric] = missing
        else:
            usable.append(metric)
    return usable, skipped


def resolve_metrics(names: Sequence[str]) -> list[str]:
    """Expand group names and check every metric exists (order kept, duplicates dropped)."""
    resolved: list[str] = []
    for name in names:
        for metric in METRIC_GROUPS.get(name, (name,)):
            if metric not in ALL_METRICS:
                raise ValueError(f"unknown metric {metric!r}; known: {', '.join(ALL_METRICS)}; groups: {', '.join(METRIC_GROUPS)}")
            if metric not in resolved:
                resolved.append(metric)
    if not resolved:
        raise ValueError("no metrics requested")
    return resolved


@dataclass
class EvalOptions:
    metrics: Sequence[str]
    manifest: WeightsManifest = field(default_factory=WeightsManifest.empty)
    device: str = "cpu"
    clip_frames: int = 16
    num_bootstrap: int = 100
    face_policy: str = "skip"
    segmenter: Segmenter | None = None
    expression_backend: ExpressionBackend | None = None
    max_frames: int | None = None
    seed: int = 0
    progress: bool = True


class _Models:
    """Backbones built once per run, only for the metrics asked for."""

    def __init__(self, metrics: list[str], options: EvalOptions):
        device = options.device
        self.lpips = build_lpips(options.manifest).to(device) if {"lpips", "disco_lpips"} & set(metrics) else None
        bases = {split_region(m)[1] for m in metrics if m in DISTRIBUTION_METRICS}
        self.extractors = {base: build_extractor(base, options.manifest, device) for base in sorted(bases)}
        for base, extractor in self.extractors.items():
            needed = required_clip_frames(extractor)
            if needed is not None and needed != options.clip_frames:
                raise ValueError(f"{base} backbone takes {needed}-frame clips but --clip-frames is {options.clip_frames}")
        self.detector = FaceDetector(device) if set(FACE_METRICS) & set(metrics) else None
        self.adaface = build_adaface(options.manifest).to(device) if "face_cos" in metrics else None
        if "face_exp" in metrics and options.expression_backend is None:
            raise ValueError("face_exp needs an expression backend (--face-exp-backend module:callable); none ships, "
                             "since X-Dyna's expression model is unpublished")


def _summary(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"mean": float(values.mean()) if len(values) else None,
            "std": float(finite.std()) if len(finite) else None,  # spread of the finite frames only
            "frames": int(len(values)), "non_finite_frames": int(len(values) - len(finite))}


def evaluate(pairs: Sequence[VideoPair], options: EvalOptions) -> dict:
    metrics = resolve_metrics(options.metrics)
    if options.face_policy not in ("skip", "zero"):
        raise ValueError(f"face policy must be 'skip' or 'zero', got {options.face_policy!r}")
    needs_masks = any(m in DISTRIBUTION_METRICS and split_region(m)[0] != "full" for m in metrics)
    for pair in pairs:
        if needs_masks and pair.mask is None and options.segmenter is None:
            raise EvalInputError(f"FG/BG metrics need masks: pass --masks DIR or a segmenter (video {pair.name!r})")
    models = _Models(metrics, options)
    fidelity_names = [m for m in metrics if m in FIDELITY_METRICS]
    distribution_names = [m for m in metrics if m in DISTRIBUTION_METRICS]
    chunk = options.clip_frames

    per_frame: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    features: dict[str, dict[str, list[np.ndarray]]] = {m: {"pred": [], "gt": []} for m in distribution_names}
    face_counts = {"frames": 0, "pred_faces": 0, "gt_faces": 0}
    face_cos_values: list[torch.Tensor] = []
    face_exp_values: list[torch.Tensor] = []
    dropped_tail_frames = 0

    total_chunks = sum(math.ceil(min(p.pred.num_frames, options.max_frames or p.pred.num_frames) / chunk) for p in pairs)
    progress = tqdm(total=total_chunks, desc="xdyna-eval", unit="chunk", disable=not options.progress, file=sys.stderr)
    for pair in pairs:
        num_frames = min(pair.pred.num_frames, options.max_frames or pair.pred.num_frames)
        reference_embedding = None
        if models.adaface is not None and pair.reference is not None:
            reference = read_image(pair.reference).unsqueeze(0)
            reference_embedding = embed_faces(models.adaface, reference, models.detector(reference))
        for start in range(0, num_frames, chunk):
            count = min(chunk, num_frames - start)
            pred, gt = pair.pred.read(start, count), pair.gt.read(start, count)
            for name in fidelity_names:
                per_frame[pair.name][name] += fidelity_per_frame(name, pred, gt, models.lpips).tolist()
            if distribution_names:
                if pair.mask is not None:
                    pred_masks = gt_masks = masks_from_video_frames(pair.mask.read(start, count))
                elif needs_masks:
                    pred_masks, gt_masks = options.segmenter(pred), options.segmenter(gt)
                else:
                    pred_masks = gt_masks = None
                for name in distribution_names:
                    region, base = split_region(name)
                    is_clip = DISTRIBUTION_BASES[base].unit == "clip"
                    if is_clip and count < chunk:
                        continue
                    extractor = models.extractors[base]
                    for side, frames, masks in (("pred", pred, pred_masks), ("gt", gt, gt_masks)):
                        batch = to_unit_float(apply_region(frames, masks, region)).to(options.device)
                        with torch.no_grad():
                            output = extractor(batch.unsqueeze(0) if is_clip else batch)
                        features[name][side].append(output.double().cpu().numpy())
                if count < chunk and any(DISTRIBUTION_BASES[split_region(n)[1]].unit == "clip" for n in distribution_names):
                    dropped_tail_frames += count
            if models.detector is not None:
                pred_faces = models.detector(pred)
                face_counts["frames"] += count
                face_counts["pred_faces"] += sum(d is not None for d in pred_faces)
                gt_faces = models.detector(gt) if ("face_exp" in metrics or reference_embedding is None) else None
                if gt_faces is not None:
                    face_counts["gt_faces"] += sum(d is not None for d in gt_faces)
                if models.adaface is not None:
                    pred_embeddings = embed_faces(models.adaface, pred, pred_faces)
                    target = reference_embedding if reference_embedding is not None else embed_faces(models.adaface, gt, gt_faces)
                    face_cos_values.append(face_cosines(pred_embeddings, target, options.face_policy))
                if "face_exp" in metrics:
                    both = [i for i in range(count) if pred_faces[i] is not None and gt_faces[i] is not None]
                    pred_crops, _ = aligned_faces(pred[both], [pred_faces[i] for i in both])
                    gt_crops, _ = aligned_faces(gt[both], [gt_faces[i] for i in both])
                    face_exp_values.append(expression_errors(options.expression_backend, pred_crops, gt_crops))
            progress.update(1)
    progress.close()

    results: dict[str, dict] = {}
    for name in fidelity_names:
        values = np.concatenate([np.asarray(per_frame[p.name][name], dtype=np.float64) for p in pairs])
        results[name] = {**_summary(values), "definition": "disco" if name.startswith("disco_") else "correct"}
    for name in distribution_names:
        region, base = split_region(name)
        pred_features, gt_features = features[name]["pred"], features[name]["gt"]
        count_pred = sum(len(f) for f in pred_features)
        if count_pred < 2:
            unit = DISTRIBUTION_BASES[base].unit
            results[name] = {"value": None, "error": f"needs at least 2 {unit}s per side, got {count_pred}"
                                                     f" (clips are {chunk} frames; lower --clip-frames or add videos)"}
            continue
        result = frechet_with_bootstrap(np.concatenate(pred_features), np.concatenate(gt_features),
                                        num_bootstrap=options.num_bootstrap, seed=options.seed)
        results[name] = {**result.as_dict(), "region": region, "unit": DISTRIBUTION_BASES[base].unit,
                         "rank_deficient": result.count_a <= result.dim}
    if "face_det" in metrics:
        frames = face_counts["frames"]
        results["face_det"] = {"value": face_counts["pred_faces"] / frames, "frames_with_face": face_counts["pred_faces"],
                               "frames": frames}
    if "face_cos" in metrics:
        cosines = torch.cat(face_cos_values) if face_cos_values else torch.zeros(0)
        results["face_cos"] = {"value": float(cosines.mean()) if len(cosines) else None, "frames_used": int(len(cosines)),
                               "policy": options.face_policy,
                               "target": "reference" if all(p.reference is not None for p in pairs) else "gt",
                               "face_det_pred": face_counts["pred_faces"] / max(face_counts["frames"], 1)}
    if "face_exp" in metrics:
        errors = torch.cat(face_exp_values) if face_exp_values else torch.zeros(0)
        results["face_exp"] = {"value": float(errors.mean()) if len(errors) else None, "frames_used": int(len(errors)),
                               "verified_against_paper": False}

    per_video = {p.name: {m: float(np.mean(per_frame[p.name][m])) for m in fidelity_names} for p in pairs}
    return {
        "tool": "xdyna-eval",
        "metrics": results,
        "per_video": per_video,
        "per_frame": {p.name: {m: per_frame[p.name][m] for m in fidelity_names} for p in pairs},
        "protocol": {"videos": len(pairs), "frames": sum(min(p.pred.num_frames, options.max_frames or p.pred.num_frames)
                                                         for p in pairs),
                     "clip_frames": chunk, "clips_non_overlapping": True, "dropped_tail_frames_for_clip_metrics": dropped_tail_frames,
                     "bootstrap": options.num_bootstrap, "seed": options.seed, "face_policy": options.face_policy,
                     "region_fill": "zero", "masks": "mask videos" if pairs and pairs[0].mask is not None
                     else ("segmenter" if needs_masks else None)},
    }
