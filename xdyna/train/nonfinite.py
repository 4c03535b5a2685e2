"""Where did the NaN come from: replay a forward pass and name the first module whose output went
non-finite.

A non-finite loss says nothing about its source. A learning rate too high shows up in a trained
component's output; a broken kernel (bf16 convolutions on Intel AMX CPUs, see
:mod:`xdyna.cpu_numerics`) in a frozen one; bad data in the batch itself. The replay runs under
``no_grad`` with a forward hook on every submodule, so it costs one extra forward pass, and only
when the run is about to stop anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__") or hasattr(value, "to_tuple"):  # diffusers' output classes
        yield from _tensors(tuple(getattr(value, name) for name in getattr(value, "__dataclass_fields__", {})))


def has_non_finite(value: Any) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(value))


def first_non_finite(model: nn.Module, forward: Callable[[], torch.Tensor], inputs: Mapping[str, Any] | None = None) -> str:
    """Run ``forward()`` (which must use ``model``) and describe the first non-finite value it met:
    an input of ``inputs``, the output of a submodule of ``model`` (the first to finish, which is
    the innermost one), or the result itself. Returns one phrase for an error message."""
    for key, value in (inputs or {}).items():
        if has_non_finite(value):
            return f"the batch's {key!r} already holds NaN/inf: check the data"
    found: list[str] = []

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not found and has_non_finite(output):
            found.append(f"{name} ({type(module).__name__})")

    handles = [module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            result = forward()
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return (f"first non-finite output: {found[0]} (a frozen module points at a numerics problem, e.g. CPU bf16; "
                "a trained one at the learning rate or the data)")
    if has_non_finite(result):
        return "every module's output was finite: the loss itself overflowed"
    return ("not reproduced by a replay of the same step with the same random draws: a non-deterministic source "
            "(a kernel reading uninitialised memory, a hardware fault)")
