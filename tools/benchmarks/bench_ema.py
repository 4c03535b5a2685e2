"""Cost of the EMA of the trainable weights (xdyna/train/ema.py) per training step, tiny model.

    python -m tools.benchmarks.bench_ema --steps 24 --decay 0.999

In one process, one module, one optimizer: steps alternate EMA on / EMA off (an EMA update is
purely additive after the optimizer step, so alternating steps see the same machine load), every
step timed whole (loss, backward, clipping, AdamW, and the EMA update on "on" steps). Also timed
alone: the EMA update (median of many), and the EMA's bytes (fp32 of the trainable weights).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tools.benchmarks.bench_train import batches, make_module
from xdyna.train.ema import EMACallback, EMAConfig, ema_bytes_per_rank


def train_step(module, optimizer, params, batch) -> None:
    module.diffusion_loss(batch).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(steps: int, decay: float, warmup: int = 3, update_repeats: int = 50) -> dict:
    torch.manual_seed(0)
    module = make_module()
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in module.parameters() if p.requires_grad]
    ema = EMACallback(EMAConfig(decay=decay))
    ema.update(module)  # the first update copies; the timed ones are the recurrence
    on, off = [], []
    for index, batch in enumerate(batches(steps + warmup)):
        with_ema = index % 2 == 0
        start = time.perf_counter()
        train_step(module, optimizer, params, batch)
        if with_ema:
            ema.update(module)
        elapsed = time.perf_counter() - start
        if index >= warmup:
            (on if with_ema else off).append(elapsed)
    update_times = []
    for _ in range(update_repeats):
        start = time.perf_counter()
        ema.update(module)
        update_times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in params)
    step_on, step_off, update = statistics.median(on), statistics.median(off), statistics.median(update_times)
    return {
        "trainable_params": trainable,
        "ema_bytes_per_rank": ema_bytes_per_rank(trainable),
        "ema_bytes_per_rank_zero3_8_ranks": ema_bytes_per_rank(trainable, world_size=8, zero_stage=3),
        "step_s_ema_on_median": step_on,
        "step_s_ema_off_median": step_off,
        "steps_each": len(on),
        "ema_update_s_median": update,
        "ema_update_share_of_step": update / step_off,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="timed steps (half with the EMA)")
    parser.add_argument("--decay", type=float, default=0.999)
    args = parser.parse_args()
    print(json.dumps(measure(args.steps, args.decay), indent=2))


if __name__ == "__main__":
    main()
