"""``torch.compile`` per block kind (``model.compile``).

The same kinds as activation checkpointing (:mod:`xdyna.models.activation_checkpointing`): the video
UNet's ``resnets``, ``attentions`` (spatial transformers with the reference path) and ``motion``
modules, and each ControlNet's / the ReferenceNet's blocks; policies ``none``, ``unet`` (resnets,
attentions, motion) and ``all``. Each chosen block, not the whole model, runs its ``forward``
through ``torch.compile``: the graphs stay small (a block, not a UNet with Python control flow
between reference pass, ControlNets and frame layouts), and a block that also checkpoints is
compiled with its checkpoint inside (torch traces the non-reentrant ``torch.utils.checkpoint`` as
one region its partitioner recomputes in backward). The block's class is swapped in place, as
activation checkpointing does (parameter names and state dicts stay the same, a deep copy keeps
it), and its ``forward`` is what is compiled (not ``nn.Module.compile``'s whole call): hooks on the
block itself (DeepSpeed's, a profiler's) run outside the graph.

Engines: plain torch / DDP and DeepSpeed ZeRO-2 (its gradient hooks run after the compiled
backward of a block, outside any graph; checked on one CPU rank: the same losses and weights as
eager after two steps, every compiled block captured). Not ZeRO-3: it gathers and releases every
submodule's partitioned parameters in forward hooks that DeepSpeed excludes from compilation
(``torch.compiler.disable``): on one CPU rank every compiled block broke at its first layer's hook
and ran eagerly (no graph captured), so compiling only costs; DeepSpeed's own route, its
DeepCompile engine pass, is marked unsupported for ZeRO-3 on torch >= 2.9 (DeepSpeed #7755).
:func:`engine_refusal` names this for the config rule.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .activation_checkpointing import blocks_by_kind, count_blocks, swap_class
# The policies, their resolution and the engine refusal are names only, defined without torch for the config checks.
from .block_kinds import COMPILE_KEY as KEY
from .block_kinds import COMPILE_POLICIES as POLICIES
from .block_kinds import engine_refusal, resolve_compile  # noqa: F401

# Compiled graphs a block may need: training and inference (grad mode is guarded), the frame
# layout's three modes (reference, generate, joint: the motion modules branch on it), and a second
# compile when a size first changes (torch then marks it dynamic). Blocks of one class share one
# code object, whose cache torch caps at 8 entries (recompile_limit) before running it eagerly.
GRAPHS_PER_BLOCK = 2 * 3 * 2


class _CompiledBlock:
    """Mixin placed before a block's class: its ``forward`` (the next class's: the block's own or
    the checkpointing mixin's) runs through ``torch.compile`` with the block's backend."""

    _compile_backend: str

    def forward(self, *args, **kwargs):
        return _compiled(super().forward.__func__, self._compile_backend)(self, *args, **kwargs)


@functools.cache
def _compiled(forward, backend: str):
    # One compiled callable per (function, backend): blocks of a class share torch's code cache anyway.
    return torch.compile(forward, backend=backend)


def compile_block(block: nn.Module, backend: str = "inductor") -> bool:
    """Compile one block in place (on its first call); False when it is compiled already. A
    checkpointed block keeps its checkpoint inside the compiled region (checkpointing applied
    after compiling puts it outside; both are equal, tests/models/test_compile.py)."""
    if not swap_class(block, _CompiledBlock, "Compiled"):
        return False
    block._compile_backend = backend
    return True


def is_compiled(block: nn.Module) -> bool:
    return isinstance(block, _CompiledBlock)


def apply_compile(model: nn.Module, value: Any, backend: str = "inductor") -> dict[str, int]:
    """Compile the blocks of the kinds ``value`` names (:func:`resolve_compile`) in an
    :class:`~xdyna.models.XDynaModel`; returns how many blocks of each kind were compiled.

    Nothing is compiled here: torch compiles a block on its first call. Either order with
    activation checkpointing works: applied first (as build_model does), the checkpoint runs
    inside the compiled region; applied after, it wraps the compiled forward."""
    name, kinds = resolve_compile(value)
    counts: dict[str, int] = {}
    for kind, blocks in blocks_by_kind(model, name, kinds, POLICIES, KEY).items():
        counts[kind] = sum(compile_block(block, backend) for block in blocks)
    _raise_recompile_limits(sum(count_blocks(model, is_compiled).values()))
    return counts


def _raise_recompile_limits(blocks: int) -> None:
    """Room in torch's compile caches for every compiled block (see GRAPHS_PER_BLOCK); past the
    limits torch would silently run the blocks eagerly. Never lowers a limit set elsewhere."""
    config = torch._dynamo.config
    needed = blocks * GRAPHS_PER_BLOCK
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)


def compiled_kinds(model: nn.Module) -> dict[str, int]:
    """Compiled blocks per kind (for reports and tests)."""
    return count_blocks(model, is_compiled)

