"""Check ``model.compile`` under DeepSpeed ZeRO-2/3 on the CPU (one rank, gloo, float32).

    python -m tools.benchmarks.check_compile_deepspeed --stage 2 [--backend aot_eager|inductor]

The tiny model with ``activation_checkpointing: unet``; one block of each UNet kind compiled
(xdyna.models.compile.compile_block), two AdamW steps through a DeepSpeed engine, against the same
steps with the blocks eager. Prints one JSON line: both runs' losses, the largest weight
difference after the steps, the graphs torch captured and its graph breaks (ZeRO-3's parameter
hooks). A script, not a test: DeepSpeed's set-up and the compiles take a minute or more on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(2, 3), default=2)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor: slow on 2 cores)")
    args = parser.parse_args(argv)
    for key, value in (("DS_ACCELERATOR", "cpu"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29570 + args.stage)),
                       ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    import deepspeed
    import torch
    from torch._dynamo.utils import counters

    from xdyna.models import ModelConfig, build_model
    from xdyna.models.activation_checkpointing import UNET_KINDS, blocks_of_kind
    from xdyna.models.compile import compile_block

    deepspeed.init_distributed(dist_backend="gloo")
    base = build_model(ModelConfig(resnet_groupnorm="across_frames", activation_checkpointing="unet"))
    trainable = ("dynamics_adapter", "motion_modules", "pose_controlnet")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero init, so gradients reach every trainable weight
        for _, params in base.component_parameters().items():
            for _, p in params:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)

    def run(compiled: bool):
        model = copy.deepcopy(base)
        if compiled:
            for kind in UNET_KINDS:
                compile_block(blocks_of_kind(model, kind)[0], backend=args.backend)
        params = model.set_trainable(trainable)
        model.train()
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": args.stage}, "gradient_clipping": 1.0,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        losses = []
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            noisy, reference = torch.randn(1, 2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
            pose = torch.rand(1, 2, 3, 64, 64, generator=g)
            loss = engine(noisy, torch.tensor([500]), reference, pose).square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if args.stage == 3:  # partitioned: gather to compare
            with deepspeed.zero.GatheredParameters(params):
                return losses, [p.detach().clone() for p in params]
        return losses, [p.detach().clone() for p in params]

    eager_losses, eager_weights = run(False)
    counters.clear()
    losses, weights = run(True)
    print(json.dumps({
        "zero_stage": args.stage, "backend": args.backend, "eager_losses": eager_losses, "compiled_losses": losses,
        "max_weight_difference": max((a - b).abs().max().item() for a, b in zip(eager_weights, weights)),
        "graphs_captured": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": [reason.splitlines()[0] for reason in counters["graph_break"]],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
