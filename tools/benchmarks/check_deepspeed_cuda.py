"""GPU check: our LightningModule under Lightning's stock DeepSpeed ZeRO strategy on CUDA.

    python -m tools.benchmarks.check_deepspeed_cuda --flavour sd15 --stage 2 --steps 6 \
        --frames 16 --height 896 --width 512 --out /tmp/ds

Random weights and random batches (no data files). Trains stage 1, saves a DeepSpeed checkpoint
(a directory with frozen parameters excluded), and prints step time, peak memory and the bytes of
optimizer state this rank holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
import yaml
from torch.utils.data import DataLoader, Dataset

from xdyna.train.module import XDynaTrainingModule

CONF = Path(__file__).resolve().parents[2] / "conf"


class RandomClips(Dataset):
    def __init__(self, n, frames, height, width):
        self.n, self.frames, self.height, self.width = n, frames, height, width

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        f, h, w = self.frames, self.height, self.width
        return {
            "video": torch.rand(f, 3, h, w, generator=g) * 2 - 1,
            "reference": torch.rand(3, h, w, generator=g) * 2 - 1,
            "pose": torch.rand(f, 3, h, w, generator=g),
        }


class StepTimer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, *args):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def optimizer_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    # DeepSpeed ZeRO keeps fp32 master partitions on the wrapped optimizer.
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(optimizer, name, []) or []:
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", default="tiny")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--out", default="/tmp/xdyna_ds_check")
    args = p.parse_args(argv)

    # ModelConfig's defaults are the tiny.yaml values; only what differs is given.
    model_cfg = dict(flavour=args.flavour, gradient_checkpointing=args.flavour != "tiny", attention_backend=args.backend)
    stage_cfg = yaml.safe_load((CONF / "stage" / "stage1.yaml").read_text())
    module = XDynaTrainingModule(model=model_cfg, stage=stage_cfg)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.steps,
        strategy=DeepSpeedStrategy(stage=args.stage, exclude_frozen_parameters=True),
        default_root_dir=args.out, logger=False, enable_checkpointing=False, callbacks=[timer],
        gradient_clip_val=1.0, enable_progress_bar=False,
    )
    data = DataLoader(RandomClips(args.steps, args.frames, args.height, args.width), batch_size=1)
    trainer.fit(module, data)
    ckpt = Path(args.out) / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    files = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file())
    result = dict(
        flavour=args.flavour, zero_stage=args.stage, frames=args.frames, size=[args.height, args.width],
        trainable_params=trainable, step_seconds=[round(t, 3) for t in timer.times],
        median_step_seconds=round(sorted(timer.times[1:] or timer.times)[len(timer.times[1:] or timer.times) // 2], 3),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        optimizer_state_gib=round(optimizer_state_bytes(trainer.optimizers[0]) / 2**30, 3),
        checkpoint_files=files, final_loss=float(trainer.callback_metrics.get("train/loss", float("nan"))),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
