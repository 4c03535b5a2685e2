"""Consolidate a training checkpoint into per-component safetensors, and read them back.

A checkpoint is either a DeepSpeed directory (ZeRO shards of the trainable weights only) or a
single Lightning ``.ckpt`` file. The export is a directory::

    <out>/dynamics_adapter.safetensors   # keys: XDynaModel parameter names (model.component_parameters())
    <out>/motion_modules.safetensors
    <out>/pose_controlnet.safetensors
    <out>/face_controlnet.safetensors    # only components the checkpoint trained
    <out>/export.json                    # step, components, model config, source checkpoint

Each file holds one component's fp32 weights under the names :meth:`XDynaModel.component_parameters`
gives them, so ``load_components`` is a plain ``load_state_dict`` plus a completeness check.
Stage 2 starts from stage 1's export this way (``init.from_run`` in the training config).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file

from datapipes.atomic import save_safetensors, write_bytes_atomic

from xdyna.errors import XDynaUserError

EXPORT_MANIFEST = "export.json"
_MODULE_PREFIX = "model."
# Lightning wraps the LightningModule for DeepSpeed; parameter names inside the shards carry it.
_WRAPPER_PREFIX = "_forward_module."


class ExportError(XDynaUserError, RuntimeError):
    """A checkpoint or export directory that cannot be read as asked."""


# Besides tensors and plain containers (torch's weights-only allow-list), the only objects training
# checkpoints hold: hyper-parameters in Lightning's AttributeDict (older Lightning; read as the
# plain dict it is) and, in DeepSpeed's ZeRO optimizer shards, the stage enum, the loss scaler
# and fragment addresses. Anything else is refused: a checkpoint must never run code on load.
_LIGHTNING_GLOBALS = ((dict, "lightning.fabric.utilities.data.AttributeDict"),)
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading(extra_globals: Iterable = ()) -> Iterator[None]:
    """Every ``torch.load`` inside, third-party code's included (DeepSpeed's consolidation asks for
    ``weights_only=False``), runs weights-only with the training checkpoints' allow-list plus
    ``extra_globals``. torch's public switches: ``safe_globals`` and its force-weights-only variable."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([*_LIGHTNING_GLOBALS, *extra_globals]):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _unsafe_globals(path: Path, extra_globals: Iterable) -> list[str]:
    """Globals a checkpoint file's pickle names outside the allow-list (read without unpickling)."""
    allowed = {name for _, name in _LIGHTNING_GLOBALS} | {f"{g.__module__}.{g.__qualname__}" for g in extra_globals}
    try:
        return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # not a zip checkpoint: nothing to list
        return []


def _refusal(path: Path, error: Exception, extra_globals: Iterable) -> ExportError:
    """The one-line reason a checkpoint file was not read: objects outside the allow-list (named),
    else not a torch checkpoint at all."""
    unsafe = _unsafe_globals(path, extra_globals)
    if unsafe:
        return ExportError(f"checkpoint {str(path)!r} is refused: it holds {', '.join(unsafe[:5])}, which is not allowed in a "
                           "checkpoint (only tensors, plain containers and what xdyna-train writes are read; loading "
                           "anything else could run code)")
    # torch's weights-only message opens with advice to load unsafely; its reason follows "error:".
    reason = str(error).rpartition("WeightsUnpickler error:")[2].strip() or type(error).__name__
    return ExportError(f"checkpoint {str(path)!r} is not a readable torch checkpoint ({reason.splitlines()[0][:200]})")


def checkpoint_refusal(path: str | os.PathLike, error: Exception) -> ExportError:
    """The one-line reason a checkpoint file, or a DeepSpeed checkpoint directory, was refused by a
    weights-only read. DeepSpeed's own refusal names no file: the first shard holding a disallowed
    object is named."""
    path, allowed = Path(path), deepspeed_globals()
    if path.is_dir():
        shards = sorted(path.rglob("*.pt"))
        path = next((shard for shard in shards if _unsafe_globals(shard, allowed)), shards[0] if shards else path)
    return _refusal(path, error, allowed)


def load_checkpoint_file(path: str | os.PathLike, extra_globals: Iterable = ()) -> Any:
    """``torch.load`` of one checkpoint file, weights-only (see :func:`weights_only_loading`);
    a file holding anything else fails with :class:`ExportError` naming what it holds."""
    path = Path(path)
    extra_globals = list(extra_globals)
    with weights_only_loading(extra_globals):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError) as error:
            raise _refusal(path, error, extra_globals) from None


def _deepspeed_states(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = checkpoint_dir / "checkpoint"
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        raise ExportError(f"{checkpoint_dir}: no DeepSpeed model states under checkpoint/")
    client_state = load_checkpoint_file(model_states[0])
    with weights_only_loading(deepspeed_globals()):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="checkpoint")
        except pickle.UnpicklingError as error:
            raise checkpoint_refusal(checkpoint_dir, error) from None
    weights = {k.removeprefix(_WRAPPER_PREFIX): v for k, v in state.items()}
    return weights, client_state


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full-precision trainable weights (LightningModule names) and the checkpoint's metadata."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    if path.is_dir():
        weights, meta = _deepspeed_states(path)
    else:
        meta = load_checkpoint_file(path)
        weights = meta.get("state_dict") or {}
    if "hyper_parameters" not in meta:
        raise ExportError(f"{path}: no hyper_parameters (not written by XDynaTrainingModule)")
    return {k: v.float() for k, v in weights.items()}, meta


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


def build_model_from_hparams(hparams: Mapping[str, Any]):
    from xdyna.models import ModelConfig, build_model

    return build_model(ModelConfig.from_mapping(hparams["model"]))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model=None) -> dict[str, Any]:
    """Write the export directory; returns its manifest. ``model`` defaults to one built from the checkpoint."""
    weights, meta = read_checkpoint(checkpoint)
    hparams = meta["hyper_parameters"]
    model = model if model is not None else build_model_from_hparams(hparams)
    groups = split_by_component(weights, model)
    if not groups:
        raise ExportError(f"{checkpoint}: holds no weights of any component")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("global_step", -1))
    for component, tensors in groups.items():
        save_safetensors(tensors, out_dir / f"{component}.safetensors",
                         metadata={"format": "xdyna-component", "component": component, "step": str(step)})
    manifest = {
        "components": sorted(groups),
        "step": step,
        "source": str(Path(checkpoint).resolve()),
        "model": hparams["model"],
        "stage": hparams.get("stage"),
    }
    write_bytes_atomic(out_dir / EXPORT_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return manifest


def load_components(model, export_dir: str | os.PathLike, components: Iterable[str] | None = None) -> list[str]:
    """Load exported components into ``model`` (an XDynaModel); returns the names loaded.

    ``components=None`` loads every component present in the export. Each file must match the
    model's component exactly (same names and shapes), else a clear error names the difference.
    """
    export_dir = Path(export_dir)
    manifest_path = export_dir / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{export_dir} is not an xdyna export (no {EXPORT_MANIFEST}); make one with xdyna-export")
    available = json.loads(manifest_path.read_text())["components"]
    wanted = list(available if components is None else components)
    absent = sorted(set(wanted) - set(available))
    if absent:
        raise ExportError(f"{export_dir} has no {absent} (it has {available})")
    expected = component_names(model)
    own = model.state_dict()
    for component in wanted:
        tensors = load_file(str(export_dir / f"{component}.safetensors"))
        if set(tensors) != expected[component]:
            diff = sorted(set(tensors) ^ expected[component])
            raise ExportError(f"{component}.safetensors does not match this model's {component}: e.g. {diff[:3]}")
        bad_shape = [k for k, v in tensors.items() if own[k].shape != v.shape]
        if bad_shape:
            raise ExportError(f"{component}.safetensors shape mismatch for {bad_shape[:3]} (another flavour?)")
        model.load_state_dict(tensors, strict=False)
    return wanted


# A finished stage exports its newest checkpoint here (``checkpoint.export_at_end``);
# ``init.from_run=<run id>`` reads it.
EXPORT_SUBDIR = "export"


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
        if not (export_dir / EXPORT_MANIFEST).is_file():
            raise ExportError(f"init.components_dir={components_dir}: no {EXPORT_MANIFEST} there; make one with xdyna-export")
        key = f"init.components_dir={components_dir}"
    available = json.loads((export_dir / EXPORT_MANIFEST).read_text())["components"]
    wanted = list(init.get("components") or available)
    absent = sorted(set(wanted) - set(available))
    if absent:
        raise ExportError(f"{key}: the export has no {absent} (it has {available})")
    return {name: str((export_dir / f"{name}.safetensors").resolve()) for name in wanted}
