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
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from ..errors import ConfigError
# The kinds, policies and their resolution are names only, defined without torch for the config checks.
from .block_kinds import CHECKPOINT_POLICIES as POLICIES  # noqa: F401
from .block_kinds import KINDS, NETWORK_KINDS, UNET_KINDS, resolve_kinds, resolve_policy  # noqa: F401
from .motion import FrameLayout

_BLOCK_TYPES = {"resnets": (ResnetBlock2D,), "attentions": (Transformer2DModel,), "motion": (AnimateDiffTransformer3D,)}
_NETWORK_BLOCKS = (ResnetBlock2D, Transformer2DModel)


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


_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type, prefix: str) -> bool:
    """Place ``mixin`` before the class of ``module`` (in place: parameter names and state dicts
    stay the same, a deep copy keeps it); False when it is there already. Also used by compile.py."""
    cls = type(module)
    if issubclass(cls, mixin):
        return False
    if (mixin, cls) not in _SUBCLASSES:
        # A module-level name so that pickling a model (torch.save of a whole module) finds it.
        name = f"{prefix}{cls.__name__}"
        subclass = type(name, (mixin, cls), {"__module__": __name__})
        globals()[name] = subclass
        _SUBCLASSES[mixin, cls] = subclass
    module.__class__ = _SUBCLASSES[mixin, cls]
    return True


def _wrap(module: nn.Module, layout: FrameLayout | None) -> bool:
    if not swap_class(module, _CheckpointedBlock, "Checkpointed"):
        return False
    module._checkpoint_layout = layout
    return True


def _blocks(network: nn.Module, types: tuple[type, ...]) -> list[nn.Module]:
    # The kinds do not nest: motion modules hold BasicTransformerBlocks, not Transformer2DModels.
    return [module for module in network.modules() if isinstance(module, types)]


def _networks(model: nn.Module) -> dict[str, nn.Module | None]:
    return {"pose_controlnet": model.pose_controlnet, "face_controlnet": model.face_controlnet,
            "reference_net": model.reference_net}


def blocks_of_kind(model: nn.Module, kind: str, key: str | None = None) -> list[nn.Module]:
    """The blocks of ``kind`` in an :class:`~xdyna.models.XDynaModel`. A network this variant
    lacks has none; with ``key`` (a list that names the kind explicitly) that is a ConfigError
    naming ``key``."""
    if kind in UNET_KINDS:
        return _blocks(model.unet, _BLOCK_TYPES[kind])
    network = _networks(model)[kind]
    if network is None:
        if key is not None:
            raise ConfigError(f"{key}: {kind!r} is not part of this model "
                              f"(model.face={model.config.face!r}, model.reference={model.config.reference!r})")
        return []
    return _blocks(network, _NETWORK_BLOCKS)


def blocks_by_kind(model: nn.Module, name: str, kinds: tuple[str, ...], policies: dict, key: str) -> dict[str, list[nn.Module]]:
    """The blocks of each of ``kinds`` (resolved by :func:`resolve_kinds` as ``name``): a policy
    name covers the networks this variant has; an explicit list must name existing ones (else a
    ConfigError naming ``key``)."""
    explicit = None if name in policies else key
    return {kind: blocks_of_kind(model, kind, explicit) for kind in kinds
            if not (kind in NETWORK_KINDS and _networks(model)[kind] is None and explicit is None)}


def count_blocks(model: nn.Module, chosen) -> dict[str, int]:
    """Blocks of each kind for which ``chosen(block)`` holds (kinds with none left out)."""
    counts = {kind: sum(bool(chosen(block)) for block in blocks_of_kind(model, kind)) for kind in KINDS}
    return {kind: count for kind, count in counts.items() if count}


def apply_activation_checkpointing(model: nn.Module, value: Any, gradient_checkpointing: bool = False) -> dict[str, int]:
    """Checkpoint the block kinds of ``value`` (see :func:`resolve_policy`) in an
    :class:`~xdyna.models.XDynaModel`; returns how many blocks of each kind were wrapped.

    Any policy other than ``diffusers`` switches diffusers' own flags off, so no block is
    checkpointed twice."""
    name, kinds = resolve_policy(value, gradient_checkpointing)
    if name != "diffusers":
        for network in (model.unet, *_networks(model).values()):
            if network is not None:
                network.disable_gradient_checkpointing()
    counts: dict[str, int] = {}
    for kind, blocks in blocks_by_kind(model, name, kinds, POLICIES, "model.activation_checkpointing").items():
        layout = model.frame_layout if kind in UNET_KINDS else None
        counts[kind] = sum(_wrap(block, layout) for block in blocks)
    return counts


def checkpointed_kinds(model: nn.Module) -> dict[str, int]:
    """Blocks currently wrapped, per kind (for reports and tests)."""
    return count_blocks(model, lambda block: isinstance(block, _CheckpointedBlock))
