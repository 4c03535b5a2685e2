"""Selective activation checkpointing by block kind.

diffusers' ``enable_gradient_checkpointing`` is all or nothing per network and leaves the motion
modules out (they hold the temporal attention of every frame at every resolution). Here each kind of
block is chosen on its own (``model.activation_checkpointing``):

* ``resnets``: the video UNet's ResNet blocks;
* ``attentions``: the video UNet's spatial transformers (self-attention with the Dynamics-Adapter or
  ReferenceNet path, cross-attention, feed-forward), norms and projections included;
* ``motion``: the motion modules (temporal transformers);
* ``pose_controlnet``, ``face_controlnet``, ``reference_net``: the ResNets and transformers of that
  network.

Policies name common sets: ``none``; ``diffusers`` (diffusers' own flags: ResNets and transformer
blocks of every network, no motion modules; what ``gradient_checkpointing: true`` gives);
``unet`` (resnets, attentions, motion); ``all``.

A chosen block's class is swapped in place for a subclass whose ``forward`` runs under
non-reentrant ``torch.utils.checkpoint`` (parameter names and state dicts stay the same; a deep copy
keeps the swap). The recompute runs under the frame layout of the original call: the motion
modules and frame GroupNorms read the shared :class:`~xdyna.models.motion.FrameLayout`, which may
describe another UNet call by the time backward runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
import torch.utils.checkpoint
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from ..errors import ConfigError
from .motion import FrameLayout

UNET_KINDS = ("resnets", "attentions", "motion")
NETWORK_KINDS = ("pose_controlnet", "face_controlnet", "reference_net")
KINDS = (*UNET_KINDS, *NETWORK_KINDS)
POLICIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "diffusers": (),  # diffusers' own flags, set by the model build (see resolve_policy)
    "unet": UNET_KINDS,
    "all": KINDS,
}
_BLOCK_TYPES = {"resnets": (ResnetBlock2D,), "attentions": (Transformer2DModel,), "motion": (AnimateDiffTransformer3D,)}
_NETWORK_BLOCKS = (ResnetBlock2D, Transformer2DModel)


def resolve_policy(value: Any, gradient_checkpointing: bool = False) -> tuple[str, tuple[str, ...]]:
    """``(name, kinds)`` of ``model.activation_checkpointing``: a policy name, a list of kinds, or
    None (then ``gradient_checkpointing`` decides between ``diffusers`` and ``none``)."""
    key = "model.activation_checkpointing"
    if value is None:
        return ("diffusers", ()) if gradient_checkpointing else ("none", ())
    if isinstance(value, str):
        if value in POLICIES:
            return value, POLICIES[value]
        if value not in KINDS:
            raise ConfigError(f"{key}={value!r}: choose a policy {tuple(POLICIES)} or a list of block kinds {KINDS}")
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(kind, str) for kind in value):
        raise ConfigError(f"{key}={value!r}: expected a policy name {tuple(POLICIES)} or a list of block kinds {KINDS}")
    unknown = [kind for kind in value if kind not in KINDS]
    if unknown:
        raise ConfigError(f"{key}: unknown block kind(s) {unknown}; known: {KINDS} (or a policy: {tuple(POLICIES)})")
    kinds = tuple(kind for kind in KINDS if kind in value)
    names = [name for name, members in POLICIES.items() if members == kinds and name != "diffusers"]
    return (names[0] if names else "+".join(kinds)), kinds


class _CheckpointedBlock:
    """Mixin placed before a block's own class: its forward runs under non-reentrant checkpointing,
    and the recompute under the frame layout the block was first called with."""

    _checkpoint_layout: FrameLayout | None

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # as diffusers: inference never pays the recompute
            return super().forward(*args, **kwargs)
        layout = self._checkpoint_layout
        state = replace(layout) if layout is not None else None
        parent_forward = super().forward

        def run(*inner_args, **inner_kwargs):
            if state is None:
                return parent_forward(*inner_args, **inner_kwargs)
            with layout.use(state.mode, state.frames):
                return parent_forward(*inner_args, **inner_kwargs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if issubclass(cls, _CheckpointedBlock):
        return cls
    if cls not in _SUBCLASSES:
        # A module-level name so that pickling a model (torch.save of a whole module) finds it.
        name = f"Checkpointed{cls.__name__}"
        subclass = type(name, (_CheckpointedBlock, cls), {"__module__": __name__})
        globals()[name] = subclass
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]


def _wrap(module: nn.Module, layout: FrameLayout | None) -> bool:
    if isinstance(module, _CheckpointedBlock):
        return False
    module.__class__ = _checkpointed_class(type(module))
    module._checkpoint_layout = layout
    return True


def _blocks(network: nn.Module, types: tuple[type, ...]) -> Iterable[nn.Module]:
    # The kinds do not nest: motion modules hold BasicTransformerBlocks, not Transformer2DModels.
    return [module for module in network.modules() if isinstance(module, types)]


def apply_activation_checkpointing(model: nn.Module, value: Any, gradient_checkpointing: bool = False) -> dict[str, int]:
    """Checkpoint the block kinds of ``value`` (see :func:`resolve_policy`) in an
    :class:`~xdyna.models.XDynaModel`; returns how many blocks of each kind were wrapped.

    Any policy other than ``diffusers`` switches diffusers' own flags off, so no block is
    checkpointed twice."""
    name, kinds = resolve_policy(value, gradient_checkpointing)
    explicit = name not in POLICIES
    networks = {"pose_controlnet": model.pose_controlnet, "face_controlnet": model.face_controlnet,
                "reference_net": model.reference_net}
    if name != "diffusers":
        for network in (model.unet, *networks.values()):
            if network is not None:
                network.disable_gradient_checkpointing()
    counts: dict[str, int] = {}
    for kind in kinds:
        if kind in UNET_KINDS:
            blocks = _blocks(model.unet, _BLOCK_TYPES[kind])
            layout = model.frame_layout
        else:
            network = networks[kind]
            if network is None and explicit:
                raise ConfigError(f"model.activation_checkpointing: {kind!r} is not part of this model "
                                  f"(model.face={model.config.face!r}, model.reference={model.config.reference!r})")
            if network is None:  # a policy name covers the networks this variant has
                continue
            blocks = _blocks(network, _NETWORK_BLOCKS)
            layout = None
        counts[kind] = sum(_wrap(block, layout) for block in blocks)
    return counts


def checkpointed_kinds(model: nn.Module) -> dict[str, int]:
    """Blocks currently wrapped, per kind (for reports and tests)."""
    counts = dict.fromkeys(KINDS, 0)
    for kind in UNET_KINDS:
        counts[kind] = sum(isinstance(m, _CheckpointedBlock) for m in _blocks(model.unet, _BLOCK_TYPES[kind]))
    for kind, network in (("pose_controlnet", model.pose_controlnet), ("face_controlnet", model.face_controlnet),
                          ("reference_net", model.reference_net)):
        if network is not None:
            counts[kind] = sum(isinstance(m, _CheckpointedBlock) for m in _blocks(network, _NETWORK_BLOCKS))
    return {kind: count for kind, count in counts.items() if count}
