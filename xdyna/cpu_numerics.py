"""bf16 on CPU without oneDNN's broken AMX convolution kernel.

torch 2.14.1 bundles oneDNN 3.12, whose AMX kernel ``brg_conv_fwd:avx10_1_512_amx`` computes some
bf16 strided convolutions wrongly on Intel CPUs with AMX-BF16 (seen: 3x3, stride 2, 64 channels,
output width 1, batch >= 16, the tiny model's downsampler at the demo's shapes): it reads
uninitialised memory, so rows of the output are garbage on every call and NaN at random. AMD CPUs
never pick that kernel, so a run can pass on one CI machine and diverge on the next. Upstream:
pytorch/pytorch#169688 (PR #188426), oneDNN #5494.

Every CPU bf16 path of this project (training with a bf16 precision on ``accelerator=cpu``,
``xdyna-animate --device cpu --dtype bf16``) therefore runs with oneDNN switched off: the
convolutions fall back to ATen's own kernels, which are correct (and slower). float32 on CPU keeps
oneDNN: its fp32 kernels are not affected. The guard is applied whatever the CPU, so that a run's
numbers do not depend on the machine it lands on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)
_warned = False

REASON = ("oneDNN's AMX bf16 convolution kernel computes wrong results on Intel AMX CPUs "
          "(pytorch/pytorch#169688): CPU bf16 runs with oneDNN off")


def is_cpu_bf16(device: str | torch.device, dtype_or_precision: str | torch.dtype) -> bool:
    """Whether ``device`` is the CPU and the dtype (``torch.bfloat16``, ``"bf16"``) or Lightning
    precision (``"bf16-mixed"``, ``"bf16-true"``) computes in bf16."""
    if torch.device(device).type != "cpu":
        return False
    if isinstance(dtype_or_precision, torch.dtype):
        return dtype_or_precision == torch.bfloat16
    return str(dtype_or_precision).lower().startswith(("bf16", "bfloat16", "torch.bfloat16"))


def disable_onednn_for_cpu_bf16(device: str | torch.device, dtype_or_precision: str | torch.dtype) -> bool:
    """Switch oneDNN off for the rest of this process when it will compute bf16 on the CPU.

    For training processes (every rank calls it; spawned ranks inherit nothing). Returns whether it
    switched it off; says so once in the log.
    """
    if not is_cpu_bf16(device, dtype_or_precision) or not torch.backends.mkldnn.enabled:
        return False
    torch.backends.mkldnn.enabled = False
    log.warning("%s (torch.backends.mkldnn.enabled=False in this process)", REASON)
    return True


@contextlib.contextmanager
def cpu_bf16_guard(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """oneDNN off inside the block when it computes bf16 on the CPU (inference: scoped, restored)."""
    if not is_cpu_bf16(device, dtype):
        yield
        return
    global _warned
    if not _warned:
        _warned = True
        log.warning(REASON)
    previous = torch.backends.mkldnn.enabled
    # Only the ``enabled`` switch: torch.backends.mkldnn.flags() also resets oneDNN's TF32 setting
    # and warns about Intel GPUs on every call.
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def guarded(method: Callable) -> Callable:
    """Run a method of an object with ``device`` and ``dtype`` attributes (a pipeline) under
    :func:`cpu_bf16_guard`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with cpu_bf16_guard(self.device, self.dtype):
            return method(self, *args, **kwargs)

    return wrapper
