"""Reading what training writes: ``xdyna-train`` checkpoints and ``xdyna-export`` folders.

One reader for every consumer (resume in ``xdyna-train``, ``xdyna-export``, the inference
pipeline), kept outside :mod:`xdyna.train` because the pipeline must not depend on the Lightning
layer: nothing here imports Lightning (its ``AttributeDict`` is allowed by name only) and DeepSpeed
is imported only to read a DeepSpeed checkpoint.

A checkpoint is either a single Lightning ``.ckpt`` file or a DeepSpeed directory (ZeRO shards of
the trainable weights only). Every read is weights-only: a checkpoint never runs code on load, and
one holding anything else is refused with one line naming what it holds and where.

An export is a directory of per-component safetensors plus ``export.json`` (see
:mod:`xdyna.train.export`, which writes it).
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

from xdyna.errors import XDynaUserError

EXPORT_MANIFEST = "export.json"
# A finished stage exports its newest checkpoint here (``checkpoint.export_at_end``);
# ``init.from_run=<run id>`` reads it.
EXPORT_SUBDIR = "export"
# Where a checkpoint keeps the EMA of its trainable weights (xdyna.train.ema), whole tensors under
# LightningModule names; an export writes it as <component>.ema.safetensors.
EMA_CHECKPOINT_KEY = "ema"
# Which weights a reader wants: "raw" (what the optimizer trained), "ema" (their moving average),
# "default" (the EMA when there is one, else raw).
WEIGHT_CHOICES = ("default", "ema", "raw")
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


def deepspeed_model_states(checkpoint_dir: Path) -> list[Path]:
    """The model-state files of a DeepSpeed checkpoint directory (empty: not one)."""
    return sorted((checkpoint_dir / "checkpoint").glob("*model_states.pt"))


def _deepspeed_states(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_states = deepspeed_model_states(checkpoint_dir)
    if not model_states:
        raise ExportError(f"checkpoint {str(checkpoint_dir)!r} is a folder without DeepSpeed model states "
                          "(checkpoint/*model_states.pt): give a .ckpt file or a DeepSpeed checkpoint folder")
    client_state = load_checkpoint_file(model_states[0])
    with weights_only_loading(deepspeed_globals()):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="checkpoint")
        except pickle.UnpicklingError as error:
            raise checkpoint_refusal(checkpoint_dir, error) from None
    weights = {k.removeprefix(_WRAPPER_PREFIX): v for k, v in state.items()}
    return weights, client_state


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, metadata)`` of an ``xdyna-train`` checkpoint: the full-precision trainable
    weights under their LightningModule names (``model.<XDynaModel name>``) and the checkpoint's
    other entries (``hyper_parameters``, ``global_step``, ...; ``{}`` where absent)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        weights, meta = _deepspeed_states(path)
    else:
        meta = load_checkpoint_file(path)
        if not isinstance(meta, Mapping):
            raise ExportError(f"checkpoint {str(path)!r} holds a {type(meta).__name__}, expected a dict")
        # A Lightning checkpoint keeps its weights under state_dict; a bare state dict is its weights.
        weights = meta.get("state_dict", meta)
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ExportError(f"checkpoint {str(path)!r} has no state_dict of tensors")
    return {k: v.float() for k, v in weights.items()}, dict(meta)


def hyper_parameters(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters as a plain dict (``{}`` when it records none)."""
    hyper = meta.get("hyper_parameters")
    return dict(hyper) if isinstance(hyper, Mapping) else {}


# ---------------------------------------------------------------------- exports

def read_export_manifest(export_dir: str | os.PathLike, key: str | None = None) -> dict[str, Any]:
    """``export.json`` of an export directory; ``key`` (the config key or option that named the
    folder) leads the error message."""
    export_dir = Path(export_dir).expanduser()
    manifest_file = export_dir / EXPORT_MANIFEST
    where = f"{key}: " if key else ""
    if not manifest_file.is_file():
        raise ExportError(f"{where}{str(export_dir)!r} is not an xdyna export (no {EXPORT_MANIFEST}); make one with xdyna-export")
    try:
        manifest = json.loads(manifest_file.read_text())
        components = manifest["components"]
        if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
            raise TypeError(f"components is {components!r}, expected a list of names")
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{where}{str(manifest_file)!r} is unreadable ({error}); re-export with xdyna-export") from None
    return manifest


def component_file(component: str, weights: str = "raw") -> str:
    """An export's file name for ``component``'s ``weights`` ("raw" or "ema")."""
    return f"{component}.ema.safetensors" if weights == "ema" else f"{component}.safetensors"


def resolve_weights(manifest: Mapping[str, Any], weights: str, where: str) -> str:
    """``weights`` (one of :data:`WEIGHT_CHOICES`) -> "raw" or "ema" for an export's manifest."""
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"weights={weights!r}: expected one of {list(WEIGHT_CHOICES)}")
    has_ema = bool((manifest.get("weights") or {}).get("ema"))
    if weights == "default":
        return "ema" if has_ema else "raw"
    if weights == "ema" and not has_ema:
        raise ExportError(f"{where} holds no EMA weights (its stage kept no EMA, stage.ema.decay=null, or it had not "
                          "started): use the raw weights")
    return weights


def export_component_files(export_dir: str | os.PathLike, components: Iterable[str] | None = None,
                           key: str | None = None, weights: str = "raw") -> dict[str, str]:
    """``{component: .safetensors path}`` of an export, for ``components`` (``None``: all it has)
    and ``weights`` (see :data:`WEIGHT_CHOICES`; raw unless asked)."""
    export_dir = Path(export_dir).expanduser()
    manifest = read_export_manifest(export_dir, key)
    available = manifest["components"]
    wanted = list(available if components is None else components)
    absent = sorted(set(wanted) - set(available))
    if absent:
        raise ExportError(f"{f'{key}: ' if key else ''}the export {str(export_dir)!r} has no {absent} (it has {available})")
    kind = resolve_weights(manifest, weights, f"{f'{key}: ' if key else ''}the export {str(export_dir)!r}")
    return {name: str((export_dir / component_file(name, kind)).resolve()) for name in wanted}


def load_components(model, export_dir: str | os.PathLike, components: Iterable[str] | None = None,
                    weights: str = "raw") -> list[str]:
    """Load exported components into ``model`` (an XDynaModel); returns the names loaded.

    ``components=None`` loads every component present in the export. Each file must match the
    model's component exactly (same names and shapes), else nothing of it is loaded and the error
    names the difference (:func:`xdyna.models.loading.load_component_safetensors`).
    """
    from xdyna.models.loading import load_component_safetensors

    files = export_component_files(export_dir, components, weights=weights)
    for component, file in files.items():
        load_component_safetensors(model, component, file)
    return list(files)
