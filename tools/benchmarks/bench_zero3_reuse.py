"""ZeRO-3 step time against DeepSpeed's ``stage3_max_reuse_distance`` (a script, not a test).

DeepSpeed keeps a gathered ZeRO-3 parameter when the module trace uses it again within
``stage3_max_reuse_distance`` elements; to decide, it scans the trace onward from every module
it releases until that many elements are passed. With the default (1e9) and a model smaller than
that (the tiny model; SD1.5's trainable + frozen weights are about 1.2e9 elements, so most of a
step there too), every release scans the rest of the trace: quadratic in the number of modules.

Runs the same 2-rank tiny stage-1 training through ``xdyna-train`` (real DeepSpeed ZeRO-3 on the
CPU/gloo path) with DeepSpeed's default and with 0, one after the other in this process, and
prints one JSON object: wall seconds of each whole run (start-up included) and their ratio.

Run: ``python -m tools.benchmarks.bench_zero3_reuse --steps 2`` (a few minutes with 0; the default
takes ten times as long or more on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


# DeepSpeed's default stage3_max_reuse_distance (deepspeed.runtime.zero.config).
DEEPSPEED_DEFAULT = 1_000_000_000


def run(root: Path, shards: Path, run_id: str, steps: int, reuse_distance: int) -> float:
    overrides = ["model=tiny", "data=synthetic", "stage=stage1", "logger=none", f"data.shards={shards}",
                 "data.num_frames=4", "data.batch_size=1", f"run.root={root}", f"run.id={run_id}",
                 f"trainer.max_steps={steps}", "trainer/strategy=deepspeed_cpu_zero3", "trainer.precision=32-true",
                 "trainer.devices=2", "checkpoint.every_n_steps=1000", "checkpoint.export_at_end=false",
                 "samples.every_n_steps=0", "samples.num_inference_steps=1", "samples.max_samples=1"]
    overrides.append(f"trainer.strategy.zero3.stage3_max_reuse_distance={reuse_distance}")
    env = dict(os.environ, WANDB_MODE="disabled")
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "xdyna-train"), *overrides], cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{run_id} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = root / "shards"
        subprocess.run([str(BIN / "xdyna-data"), "synth", "--out", str(shards), "--human", "3", "--scene", "1",
                        "--frames", "12", "--height", "128", "--width", "64"], check=True, capture_output=True)
        tuned = run(root, shards, "reuse0", args.steps, 0)
        default = run(root, shards, "default", args.steps, DEEPSPEED_DEFAULT)
    print(json.dumps({"steps": args.steps, "ranks": 2, "wall_s_reuse_distance_0": round(tuned, 1),
                      "wall_s_deepspeed_default": round(default, 1), "default_over_0": round(default / tuned, 2)}))


if __name__ == "__main__":
    main()
