"""Agreement between ranks: one all-reduce of one flag.

Preemption, the test-only hold and the non-finite-loss stop all need every rank to act on the same
step; each asks :func:`any_rank` once per step (one scalar, one host sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is set on any rank (this rank's alone without a process group). A collective:
    every rank must call it at the same point. ``device``: the strategy's root device (NCCL
    reduces only CUDA tensors)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
