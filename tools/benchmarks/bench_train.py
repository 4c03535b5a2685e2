"""Training-framework benchmark on the tiny model (a script, not a test):

1. ``overhead``: seconds per training step of :class:`XDynaTrainingModule` under a Lightning
   Trainer with xdyna-train's callbacks (telemetry, RNG state, preemption, no checkpoint writes)
   vs a bare PyTorch loop doing the same math (same module's ``diffusion_loss``, AdamW, the same
   warm-up schedule, norm clipping) on the same in-memory batches. Interleaved rounds, medians.
   Goal: overhead <= 5 %.
2. ``zero``: per-rank optimizer-state bytes (fp32 master partition + Adam moments) under
   DeepSpeed ZeRO-2 (the CPU/gloo strategy, real DeepSpeed) on 1 vs 2 ranks. Goal: <= 0.55x.
3. ``flops``: the training FLOPs per sample the telemetry uses for MFU (torch FlopCounterMode on a
   meta copy) vs an independent hand count (conv/linear/attention shapes via hooks, backward =
   2x forward for trainable layers' weights + 1x for activations), and the MFU both give.

Run: ``python -m tools.benchmarks.bench_train --steps 20 --rounds 3`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FRAMES, HEIGHT, WIDTH, BATCH = 4, 128, 64, 1


def tiny_configs(stage: str = "stage1") -> tuple[dict, dict]:
    from omegaconf import OmegaConf

    from xdyna.train.cli import CONF_DIR

    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model.pop("defaults", None)
    stage_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "stage" / f"{stage}.yaml"))
    stage_cfg.setdefault("optim", {})["warmup_steps"] = 1  # the file names only what differs from OptimConfig
    return model, stage_cfg


def batches(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        out.append({
            "video": torch.rand(BATCH, FRAMES, 3, HEIGHT, WIDTH, generator=g) * 2 - 1,
            "reference": torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=g) * 2 - 1,
            "pose": torch.rand(BATCH, FRAMES, 3, HEIGHT, WIDTH, generator=g),
            "is_scene": torch.zeros(BATCH, dtype=torch.bool),
        })
    return out


def make_module():
    from xdyna.train.module import XDynaTrainingModule

    model, stage = tiny_configs()
    torch.manual_seed(0)
    return XDynaTrainingModule(model=model, stage=stage)


class StepClock:
    """Wall time between consecutive batch starts: everything the framework does per step."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def lightning_step_times(data: list[dict], work: Path) -> list[float]:
    import lightning as L

    from xdyna.train.scaleout import build_scaleout
    from xdyna.train.telemetry import TrainingTelemetry

    clock = StepClock()
    clock_cb = type("Clock", (L.Callback,), {"on_train_batch_start": lambda self, *a: clock.on_train_batch_start()})()
    scaleout = build_scaleout({"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": len(data),
                               "gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm", "log_every_n_steps": 5},
                              work, every_n_steps=0, keep=1, resume=False)
    # No end-of-stage checkpoint write: that is I/O, not per-step overhead.
    callbacks = [cb for cb in scaleout.callbacks if type(cb).__name__ != "StepCheckpoints"]
    trainer = L.Trainer(**scaleout.trainer_kwargs, default_root_dir=str(work), logger=False,
                        callbacks=[*callbacks, TrainingTelemetry(), clock_cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(make_module(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    starts = clock.starts + [time.perf_counter()]
    return [b - a for a, b in zip(starts, starts[1:])]


def bare_step_times(data: list[dict]) -> list[float]:
    module = make_module()
    module.train()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    params = [p for p in module.parameters() if p.requires_grad]
    times = []
    for batch in data:
        start = time.perf_counter()
        loss = module.diffusion_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def overhead(steps: int, rounds: int) -> dict:
    data = batches(steps)
    skip = 3  # warm-up steps (allocator, first-call paths) are left out of both
    lightning_runs, bare_runs = [], []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as work:
            order = [("lightning", lambda: lightning_step_times(data, Path(work))), ("bare", lambda: bare_step_times(data))]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                (lightning_runs if name == "lightning" else bare_runs).append(statistics.median(fn()[skip:]))
    light, bare = statistics.median(lightning_runs), statistics.median(bare_runs)
    return {"steps": steps, "rounds": rounds, "lightning_s_per_step": light, "bare_s_per_step": bare,
            "overhead": light / bare - 1, "per_round": {"lightning": lightning_runs, "bare": bare_runs}}


# ---------------------------------------------------------------------- ZeRO-2 optimizer state
def optimizer_state_bytes(engine) -> int:
    zero = engine.optimizer
    total = sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)
    for state in zero.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def zero_worker(ranks: int, out: Path) -> None:
    """Run under Lightning's launcher (it re-invokes this script once per extra rank)."""
    import lightning as L

    from xdyna.train.strategies import make_strategy

    class Record(L.Callback):
        def on_train_end(self, trainer, pl_module):
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
                "bytes": optimizer_state_bytes(trainer.strategy.deepspeed_engine),
                "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad)}))

    strategy = make_strategy("deepspeed_cpu", zero_stage=2, reduce_bucket_size=50_000, allgather_bucket_size=50_000)
    trainer = L.Trainer(accelerator="cpu", devices=ranks, strategy=strategy, precision="32-true", max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], use_distributed_sampler=False)
    # DeepSpeed reads the per-rank batch size from the loader's sampler: give it a batching loader.
    samples = [{k: v[0] for k, v in batch.items()} for batch in batches(2)]
    trainer.fit(make_module(), train_dataloaders=torch.utils.data.DataLoader(samples, batch_size=BATCH))


def zero_state(timeout_s: float = 900) -> dict:
    result = {}
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            env = dict(os.environ, MASTER_PORT=str(29500 + ranks))
            done = subprocess.run([sys.executable, "-m", "tools.benchmarks.bench_train", "--zero-worker", str(ranks),
                                   "--zero-out", out], env=env, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise RuntimeError(f"ZeRO-2 worker on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
            per_rank = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]
        result[f"{ranks}_ranks"] = {"bytes_per_rank": [r["bytes"] for r in per_rank],
                                    "trainable_params": per_rank[0]["trainable_params"]}
    result["ratio_2_over_1"] = max(result["2_ranks"]["bytes_per_rank"]) / result["1_ranks"]["bytes_per_rank"][0]
    return result


# ---------------------------------------------------------------------- FLOPs / MFU accounting
def flops(lightning_s_per_step: float | None) -> dict:
    from dataclasses import replace

    from xdyna.models import build_model
    from xdyna.models.info import analytic_forward_flops, training_flops

    module = make_module()
    counted = training_flops(build_meta(module), module.conditions, FRAMES, HEIGHT, WIDTH)
    # Hand count, independent of FlopCounterMode: hooks on conv/linear/attention shapes, on real tensors.
    model = build_model(replace(module.model_config, gradient_checkpointing=False))
    model.set_trainable(module.trainable_components)
    data = batches(1)[0]
    with torch.no_grad():
        latents = model.encode_video(data["video"])
        reference = model.encode_images(data["reference"])
    timesteps = torch.full((1,), 500, dtype=torch.long)
    encode = analytic_forward_flops(model, lambda: (model.encode_video(data["video"]), model.encode_images(data["reference"])))
    forward = analytic_forward_flops(model, model.denoise, latents, timesteps, reference, data["pose"], None)
    trainable_share = trainable_weight_flop_share(model, latents, timesteps, reference, data["pose"])
    # Backward: activation gradients everywhere on the path (1x forward) + weight gradients of
    # trainable layers (1x their forward share).
    hand = encode + forward + forward + int(forward * trainable_share)
    out = {"counter": counted, "hand": {"encoders": encode, "forward": forward, "trainable_weight_share": trainable_share,
                                        "training": hand},
           "counter_over_hand": counted["training"] / hand}
    if lightning_s_per_step:
        samples_per_s = BATCH / lightning_s_per_step
        # The CPU's peak is not what matters here: the two MFUs share it, so report FLOP/s.
        out["achieved_tflops_counter"] = counted["training"] * samples_per_s / 1e12
        out["achieved_tflops_hand"] = hand * samples_per_s / 1e12
    return out


def build_meta(module):
    from dataclasses import replace

    from xdyna.models import build_model

    model = build_model(replace(module.model_config, gradient_checkpointing=False), device="meta")
    model.set_trainable(module.trainable_components)
    return model


def trainable_weight_flop_share(model, latents, timesteps, reference, pose) -> float:
    """Share of the denoiser's conv/linear forward FLOPs done by layers whose weights train."""
    from torch import nn

    trainable = total = 0

    def hook(layer, inputs, output):
        nonlocal trainable, total
        if isinstance(layer, nn.Conv2d):
            flops_ = 2 * output.numel() * layer.kernel_size[0] * layer.kernel_size[1] * (layer.in_channels // layer.groups)
        else:
            flops_ = 2 * output.numel() * layer.in_features
        total += flops_
        if layer.weight.requires_grad:
            trainable += flops_

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.denoise(latents, timesteps, reference, pose, None)
    finally:
        for h in handles:
            h.remove()
    return trainable / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["overhead", "zero", "flops"], action="append")
    parser.add_argument("--zero-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--zero-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.zero_worker:
        zero_worker(args.zero_worker, args.zero_out)
        return
    parts = args.only or ["overhead", "zero", "flops"]
    report: dict = {"torch_threads": torch.get_num_threads(), "load_avg_before": os.getloadavg()[0]}
    # Each part's result is printed as soon as it is known: a failure later loses nothing.
    if "overhead" in parts:
        report["overhead"] = overhead(args.steps, args.rounds)
        print(json.dumps({"overhead": report["overhead"]}), file=sys.stderr, flush=True)
    if "zero" in parts:
        report["zero2_optimizer_state"] = zero_state()
        print(json.dumps({"zero2_optimizer_state": report["zero2_optimizer_state"]}), file=sys.stderr, flush=True)
    if "flops" in parts:
        report["flops_per_sample"] = flops(report.get("overhead", {}).get("lightning_s_per_step"))
    report["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
