"""Consolidate a training checkpoint into per-component safetensors.

A checkpoint (read by :func:`xdyna.checkpoint_io.read_checkpoint`) is either a DeepSpeed directory
(ZeRO shards of the trainable weights only) or a single Lightning ``.ckpt`` file. The export is a
directory::

    <out>/dynamics_adapter.safetensors   # keys: XDynaModel parameter names (model.component_parameters())
    <out>/motion_modules.safetensors
    <out>/pose_controlnet.safetensors
    <out>/face_controlnet.safetensors    # only components the checkpoint trained
    <out>/<component>.ema.safetensors    # their EMA, when the stage kept one (stage.ema; xdyna.train.ema)
    <out>/export.json                    # step, components, model config, noise schedule, source checkpoint
    <out>/provenance.json                # where the weights came from (xdyna.provenance)

Each file holds one component's fp32 weights under the names :meth:`XDynaModel.component_parameters`
gives them, so :func:`xdyna.checkpoint_io.load_components` reads them back with a completeness check.
Stage 2 starts from stage 1's export this way (``init.from_run`` in the training config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from datapipes.atomic import save_safetensors, write_bytes_atomic

from xdyna.checkpoint_io import (EMA_CHECKPOINT_KEY, EXPORT_MANIFEST, EXPORT_SUBDIR, ExportError, component_file,
                                 export_component_files, hyper_parameters, read_checkpoint)
from xdyna import provenance
from xdyna.diffusion import ScheduleConfig

_MODULE_PREFIX = "model."


def component_names(model) -> dict[str, set[str]]:
    return {name: {pname for pname, _ in params} for name, params in model.component_parameters().items()}


def split_by_component(weights: Mapping[str, torch.Tensor], model) -> dict[str, dict[str, torch.Tensor]]:
    """Group LightningModule-named weights into the model's components; all must be complete."""
    model_weights = {k.removeprefix(_MODULE_PREFIX): v for k, v in weights.items() if k.startswith(_MODULE_PREFIX)}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    claimed: set[str] = set()
    for component, names in component_names(model).items():
        present = names & set(model_weights)
        if not present:
            continue
        if present != names:
            missing = sorted(names - present)
            raise ExportError(f"checkpoint holds part of {component}: {len(missing)} tensor(s) absent, e.g. {missing[:3]}")
        groups[component] = {name: model_weights[name].contiguous() for name in sorted(names)}
        claimed |= names
    # DeepSpeed's consolidation also returns buffers (e.g. positional encodings): the model
    # rebuilds those itself, they are not trained weights.
    buffers = {name for name, _ in model.named_buffers()}
    stray = sorted(set(model_weights) - claimed - buffers)
    if stray:
        raise ExportError(f"checkpoint weights outside every component: {stray[:5]}")
    return groups


def ema_components(meta: Mapping[str, Any], model, checkpoint) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None]:
    """The checkpoint's EMA (:mod:`xdyna.train.ema`) grouped by component, and its settings
    (``None``: the run kept no EMA, or it had not started)."""
    state = meta.get(EMA_CHECKPOINT_KEY)
    if not isinstance(state, Mapping) or state.get("weights") is None:
        return {}, None
    try:
        groups = split_by_component({k: v.float() for k, v in state["weights"].items()}, model)
    except ExportError as error:
        raise ExportError(f"{checkpoint}: its EMA: {error}") from None
    return groups, {"config": dict(state.get("config") or {}), "updates": int(state.get("updates", 0)),
                    "last_step": int(state.get("last_step", -1))}


def build_model_from_hparams(hparams: Mapping[str, Any]):
    from xdyna.models import ModelConfig, build_model

    return build_model(ModelConfig.from_mapping(hparams["model"]))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model=None) -> dict[str, Any]:
    """Write the export directory; returns its manifest. ``model`` defaults to one built from the checkpoint."""
    weights, meta = read_checkpoint(checkpoint)
    hparams = hyper_parameters(meta)
    if "model" not in hparams:
        raise ExportError(f"{checkpoint}: no hyper_parameters with a model config (not written by XDynaTrainingModule)")
    model = model if model is not None else build_model_from_hparams(hparams)
    groups = split_by_component(weights, model)
    if not groups:
        raise ExportError(f"{checkpoint}: holds no weights of any component")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("global_step", -1))
    ema_groups, ema_state = ema_components(meta, model, checkpoint)
    files = {"raw": {}, "ema": {}}
    for kind, kind_groups in (("raw", groups), ("ema", ema_groups)):
        for component, tensors in kind_groups.items():
            file = component_file(component, kind)
            save_safetensors(tensors, out_dir / file, metadata={"format": "xdyna-component", "component": component,
                                                               "step": str(step), "weights": kind})
            files[kind][component] = file
    manifest = {
        "components": sorted(groups),
        "step": step,
        "source": str(Path(checkpoint).resolve()),
        "model": hparams["model"],
        "stage": hparams.get("stage"),
        # What the pipeline samples with; a checkpoint from before schedules were configurable
        # was trained with the default one.
        "schedule": ScheduleConfig.from_mapping(hparams.get("schedule")).to_dict(),
        # Which file is which: "raw" the optimizer's weights, "ema" their moving average (when the
        # stage kept one and it had started); "default_weights" is what xdyna-animate loads.
        "weights": {kind: kind_files for kind, kind_files in files.items() if kind_files},
        "default_weights": "ema" if files["ema"] else "raw",
        "ema": ema_state,
    }
    write_bytes_atomic(out_dir / EXPORT_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    # Where the weights came from: the checkpoint's record (xdyna.provenance) and this export.
    recorded = meta.get(provenance.CHECKPOINT_KEY)
    provenance.write_file(out_dir, {
        **(dict(recorded) if isinstance(recorded, Mapping) else
           {"unrecorded": "the checkpoint was written before xdyna-train recorded provenance"}),
        "exported_from": {"checkpoint": manifest["source"], "step": step, "time": provenance.now(),
                          "git": provenance.git_state(), "versions": provenance.versions()},
    })
    return manifest


def export_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike, model=None) -> Path:
    """Export ``checkpoint`` to ``<run_dir>/export``, replacing an older export atomically
    (a stage-2 job reading it never sees a half-written directory)."""
    import shutil

    from xdyna.train.checkpointing import partial_path

    final = Path(run_dir) / EXPORT_SUBDIR
    tmp = partial_path(final)
    try:
        export_checkpoint(checkpoint, tmp, model=model)
        retired = None
        if final.exists():
            retired = partial_path(final, "retired")
            os.replace(final, retired)
        os.replace(tmp, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def init_component_files(init: Mapping[str, Any], run_root: str | os.PathLike) -> dict[str, str]:
    """The ``init`` config group -> ``{component: .safetensors path}`` for ``model.pretrained.components``.

    ``init.from_run`` names a run (id under ``run_root`` or a run directory) whose finished stage
    wrote ``export/``; ``init.components_dir`` names an export directory directly.
    """
    from_run, components_dir = init.get("from_run"), init.get("components_dir")
    if from_run and components_dir:
        raise ExportError("set init.from_run or init.components_dir, not both")
    if not (from_run or components_dir):
        return {}
    if from_run:
        given = Path(str(from_run)).expanduser()
        run_dir = given if given.is_dir() else Path(run_root) / str(from_run)
        if not run_dir.is_dir():
            raise ExportError(f"init.from_run={from_run}: no run directory {run_dir} (nor {given})")
        export_dir = run_dir / EXPORT_SUBDIR
        if not (export_dir / EXPORT_MANIFEST).is_file():
            raise ExportError(
                f"init.from_run={from_run}: {export_dir} holds no export (the run has not finished a stage); "
                f"make one with: xdyna-export {run_dir}/checkpoints {export_dir}"
            )
        key = f"init.from_run={from_run}"
    else:
        export_dir = Path(str(components_dir)).expanduser()
        key = f"init.components_dir={components_dir}"
    return export_component_files(export_dir, init.get("components") or None, key=key)
