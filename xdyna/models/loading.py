"""Reading real weights from local files and folders, never downloading.

Every loader maps a file's own key layout onto our modules, checks the whole mapping (every key
known, every shape equal, every required key present) and only then copies: a mismatched file
fails with a message listing what did not match and leaves the model untouched.

Formats read here (facts about key layouts from the public releases):

- original AnimateDiff motion modules (``mm_sd_v15.ckpt``): ``<block>.motion_modules.<j>.temporal_transformer.``
  + ``norm``, ``proj_in``, ``proj_out``, ``transformer_blocks.0.attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0,pos_encoder.pe}``,
  ``transformer_blocks.0.norms.{0,1}``, ``transformer_blocks.0.ff.net.{0.proj,2}``, ``transformer_blocks.0.ff_norm``;
- original IP-Adapter (``ip-adapter-plus_sd15.bin``): ``{"image_proj": Resampler, "ip_adapter": {"<i>.to_k_ip.weight", ...}}``
  where ``i`` counts the UNet's attention processors (down, up, mid blocks; attn1, attn2 per block);
- released X-Dyna checkpoints (torch pickles, optional ``state_dict`` key, optional ``module.`` prefix):
  the UNet in diffusers names with AnimateDiff motion modules, ``attn1.to_q_ff``/``attn1.to_out_ff``
  (Dynamics-Adapter) and ``attn2.to_k_ip``/``attn2.to_v_ip``; ControlNets in diffusers names;
- our own per-component exports: safetensors keyed by :class:`XDynaModel` parameter names.

Pickles are read with ``torch.load(weights_only=True)``: a file from elsewhere cannot run code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import XDynaUserError
from ..paths import require_file

COMPONENT_FORMAT = "xdyna-component"


class PretrainedNotFoundError(XDynaUserError, FileNotFoundError):
    """A configured weights path does not exist or lacks what it should hold."""


class WeightsMismatchError(XDynaUserError, RuntimeError):
    """A weights file does not fit the module it is loaded into (nothing was loaded)."""


def require_folder(path: str | Path, what: str, config_key: str, must_contain: tuple[str, ...] = ()) -> Path:
    """Return ``path`` as a Path after checking it is a folder holding ``must_contain``.

    The message names the config key, the path and what the folder should be, because this is the
    first thing a user sees when a cluster job points at the wrong place.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} does not exist (expected {what})")
    if not folder.is_dir():
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} is a file, expected a folder ({what})")
    missing = [name for name in must_contain if not (folder / name).exists()]
    if missing:
        raise PretrainedNotFoundError(f"{config_key}: {str(folder)!r} lacks {missing} (expected {what})")
    return folder


# ---------------------------------------------------------------------- reading files

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        # Anything else (epoch counters, optimizer hyper-parameters) is not a weight.
    return flat


def read_state_dict(path: str | Path, what: str = "weights", config_key: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors of a weights file, flat. safetensors, or a torch pickle read with
    ``weights_only=True``; an outer ``state_dict`` entry is unwrapped, a DDP ``module.`` prefix
    stripped, nested dicts (IP-Adapter's ``image_proj``/``ip_adapter``) joined with dots."""
    file = require_file(path, what, config_key, error=PretrainedNotFoundError)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for code-carrying pickles, anything for junk
            raise WeightsMismatchError(f"{config_key}: cannot read {str(file)!r} as a weights-only torch file: {error}") from None
        if not isinstance(state, Mapping):
            raise WeightsMismatchError(f"{config_key}: {str(file)!r} holds a {type(state).__name__}, not a state dict")
        if isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        state = _flatten(state)
    return {key.removeprefix("module."): value for key, value in state.items()}


# ---------------------------------------------------------------------- strict loading

@dataclass
class LoadReport:
    """What a load did: ``loaded`` target names, ``not_in_file`` target names the file left as they were."""

    source: str
    loaded: list[str] = field(default_factory=list)
    not_in_file: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.source}: loaded {len(self.loaded)} tensor(s), {len(self.not_in_file)} left as they were"


def _show(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def mismatch_problems(
    targets: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    required: Iterable[str],
    foreign: Iterable[str] = (),
) -> list[str]:
    """What keeps ``converted`` from loading into ``targets``, one phrase per kind (empty: loads).

    ``foreign``: source keys no conversion could place; ``required``: targets that must be given.
    """
    foreign = sorted(foreign)
    unknown = sorted(name for name in converted if name not in targets)
    wrong_shape = sorted(
        f"{name} {tuple(converted[name].shape)} vs {tuple(targets[name].shape)}"
        for name in converted
        if name in targets and tuple(converted[name].shape) != tuple(targets[name].shape)
    )
    absent = sorted(set(required) - set(converted))
    problems = []
    if foreign:
        problems.append(f"{len(foreign)} key(s) of no known layout: {_show(foreign)}")
    if unknown:
        problems.append(f"{len(unknown)} key(s) with no counterpart in this model: {_show(unknown)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_show(wrong_shape, 5)}")
    if absent:
        problems.append(f"{len(absent)} required key(s) missing: {_show(absent)}")
    return problems


def load_mapped(
    targets: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    source: str,
    foreign: Iterable[str] = (),
    required: Iterable[str] | None = None,
) -> LoadReport:
    """Copy ``converted`` (target name -> tensor) into ``targets`` (name -> parameter/buffer).

    ``foreign``: source keys the conversion could not place. Fails, copying nothing, on foreign keys,
    converted names that are not targets, shape mismatches, or ``required`` targets absent
    (``None``: every target is required).
    """
    problems = mismatch_problems(targets, converted, set(targets) if required is None else required, foreign)
    if problems:
        raise WeightsMismatchError(f"{source} does not match the model, nothing loaded: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in converted.items():
            target = targets[name]
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    return LoadReport(source, sorted(converted), sorted(set(targets) - set(converted)))


def module_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``module`` by state-dict name (tensors, not copies)."""
    tensors = dict(module.named_parameters(prefix=prefix.rstrip(".")))
    non_persistent = set()
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        non_persistent |= {f"{name}.{b}" if name else b for b in sub._non_persistent_buffers_set}
    tensors.update({n: b for n, b in module.named_buffers(prefix=prefix.rstrip(".")) if n not in non_persistent})
    return tensors


def _merge(converted: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, source_key: str, clashes: list[str]) -> None:
    # Several source keys may map onto one target only when they agree (AnimateDiff stores the same
    # sinusoidal table in both temporal attentions; diffusers keeps one per block).
    if name in converted and not torch.equal(converted[name], tensor):
        clashes.append(f"{source_key} (disagrees with another key mapped onto {name})")
    converted[name] = tensor


# ---------------------------------------------------------------------- AnimateDiff motion modules

_MOTION_KEY = re.compile(r"^(?P<block>(?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(?P<j>\d+)\.temporal_transformer\.(?P<rest>.+)$")
_MOTION_RENAMES = (
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.\d+\.pos_encoder\.pe$"), r"transformer_blocks.\1.pos_embed.pe"),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.0\."), r"transformer_blocks.\1.attn1."),
    (re.compile(r"^transformer_blocks\.(\d+)\.attention_blocks\.1\."), r"transformer_blocks.\1.attn2."),
    (re.compile(r"^transformer_blocks\.(\d+)\.norms\.0\."), r"transformer_blocks.\1.norm1."),
    (re.compile(r"^transformer_blocks\.(\d+)\.norms\.1\."), r"transformer_blocks.\1.norm2."),
    (re.compile(r"^transformer_blocks\.(\d+)\.ff_norm\."), r"transformer_blocks.\1.norm3."),
)


def animatediff_motion_key(key: str) -> str | None:
    """Original AnimateDiff motion-module key -> diffusers/our UNet key, ``None`` if not one."""
    match = _MOTION_KEY.match(key)
    if match is None:
        return None
    rest = match["rest"]
    for pattern, replacement in _MOTION_RENAMES:
        rest = pattern.sub(replacement, rest)
    return f"{match['block']}.motion_modules.{match['j']}.{rest}"


def convert_animatediff_motion(state: Mapping[str, torch.Tensor], prefix: str = "unet.") -> tuple[dict[str, torch.Tensor], list[str]]:
    converted: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, tensor in state.items():
        name = animatediff_motion_key(key)
        if name is None:
            foreign.append(key)
        else:
            _merge(converted, prefix + name, tensor, key, foreign)
    return converted, foreign


# ---------------------------------------------------------------------- IP-Adapter-plus

_RESAMPLER_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.0\.norm1\."), r"layers.\1.ln0."),
    (re.compile(r"^layers\.(\d+)\.0\.norm2\."), r"layers.\1.ln1."),
    (re.compile(r"^layers\.(\d+)\.0\.to_q\."), r"layers.\1.attn.to_q."),
    (re.compile(r"^layers\.(\d+)\.0\.to_out\."), r"layers.\1.attn.to_out.0."),
    (re.compile(r"^layers\.(\d+)\.1\.0\."), r"layers.\1.ff.0."),
    (re.compile(r"^layers\.(\d+)\.1\.1\."), r"layers.\1.ff.1.net.0.proj."),
    (re.compile(r"^layers\.(\d+)\.1\.3\."), r"layers.\1.ff.1.net.2."),
)
_RESAMPLER_PLAIN = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias")
_TO_KV = re.compile(r"^layers\.(\d+)\.0\.to_kv\.weight$")
_IP_LAYER = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def ordered_attention_layers(unet: nn.Module) -> list[str]:
    """The UNet's spatial attention layers (``...attn1``/``...attn2``) in the order of a plain
    ``UNet2DConditionModel``'s ``attn_processors``: down blocks, up blocks, then the mid block
    (the order IP-Adapter's ``ip_adapter.<i>`` numbering counts in)."""
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    names = [
        name.removesuffix(".processor")
        for name in unet.attn_processors
        if "motion_modules" not in name and re.search(r"\.attn[12]\.processor$", name)
    ]
    return sorted(names, key=lambda name: (rank[name.split(".")[0]], names.index(name)))


def convert_ip_adapter(
    state: Mapping[str, torch.Tensor], attention_layers: list[str], resampler_prefix: str, unet_prefix: str = "unet."
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original IP-Adapter keys (``image_proj.*``, ``ip_adapter.<i>.to_k_ip.weight``) -> ours."""
    converted: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, tensor in state.items():
        if key.startswith("image_proj."):
            rest = key.removeprefix("image_proj.")
            kv = _TO_KV.match(rest)
            if kv:
                # The original Perceiver attention fuses key and value projections.
                key_weight, value_weight = tensor.chunk(2, dim=0)
                converted[f"{resampler_prefix}layers.{kv[1]}.attn.to_k.weight"] = key_weight
                converted[f"{resampler_prefix}layers.{kv[1]}.attn.to_v.weight"] = value_weight
                continue
            renamed = rest
            for pattern, replacement in _RESAMPLER_RENAMES:
                renamed = pattern.sub(replacement, renamed)
            if renamed == rest and rest not in _RESAMPLER_PLAIN:
                foreign.append(key)
            else:
                converted[resampler_prefix + renamed] = tensor
        elif key.startswith("ip_adapter."):
            match = _IP_LAYER.match(key.removeprefix("ip_adapter."))
            index = int(match[1]) if match else -1
            if not match or index >= len(attention_layers) or not attention_layers[index].endswith("attn2"):
                foreign.append(key)
            else:
                converted[f"{unet_prefix}{attention_layers[index]}.processor.{match[2]}.weight"] = tensor
        else:
            foreign.append(key)
    return converted, foreign


# ---------------------------------------------------------------------- released X-Dyna checkpoints

_XDYNA_RENAMES = (
    (re.compile(r"\.attn1\.to_q_ff\."), ".attn1.processor.q_ff."),
    (re.compile(r"\.attn1\.to_out_ff\."), ".attn1.processor.out_ff."),
    (re.compile(r"\.attn2\.to_(k|v)_ip\."), r".attn2.processor.to_\1_ip."),
)


def convert_xdyna_unet(state: Mapping[str, torch.Tensor], prefix: str = "unet.") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released X-Dyna UNet (AnimateDiff-layout motion modules, Dynamics-Adapter as
    ``to_q_ff``/``to_out_ff``, IP as ``to_k_ip``/``to_v_ip``) -> our names. Every other key is a
    diffusers SD UNet name, as in our UNet."""
    converted: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, tensor in state.items():
        if ".temporal_transformer." in key:
            name = animatediff_motion_key(key)
            if name is None:
                foreign.append(key)
                continue
        else:
            name = key
            for pattern, replacement in _XDYNA_RENAMES:
                name = pattern.sub(replacement, name)
        _merge(converted, prefix + name, tensor, key, foreign)
    return converted, foreign


# ---------------------------------------------------------------------- our component files

def save_component_safetensors(model, component: str, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one component's weights (names of :meth:`XDynaModel.component_parameters`) as safetensors."""
    from datapipes.atomic import save_safetensors  # safetensors writes a 0600 temporary: normal mode restored

    params = model.component_parameters().get(component)
    if not params:
        raise WeightsMismatchError(f"component {component!r} is switched off or unknown in this model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().float().contiguous().cpu() for name, param in params}
    info = {"format": COMPONENT_FORMAT, "component": component, "flavour": model.config.flavour}
    info.update(metadata or {})
    save_safetensors(tensors, path, metadata=info)
    return path


def load_component_safetensors(model, component: str, path: str | Path) -> LoadReport:
    """Load one component written by :func:`save_component_safetensors` (or ``xdyna-export``):
    every tensor of the component must be in the file with its shape, and nothing else."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    params = model.component_parameters().get(component)
    if params is None:
        raise WeightsMismatchError(f"unknown component {component!r}")
    if not params:
        raise WeightsMismatchError(f"component {component!r} is switched off in this model config")
    file = require_file(path, f"a {component} .safetensors export", f"model.pretrained.components.{component}",
                        error=PretrainedNotFoundError)
    with safe_open(str(file), framework="pt") as handle:
        info = handle.metadata() or {}
    if info.get("component", component) != component:
        raise WeightsMismatchError(f"{file}: holds component {info['component']!r}, not {component!r}")
    return load_mapped(dict(params), load_file(str(file)), f"{component} from {file}")
