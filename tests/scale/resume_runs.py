"""The tiny 2-rank runs that several scale tests read (tests/scale/test_resume.py,
test_elastic_resume.py), each trained once per session through xdyna-train: per strategy case,
one never-stopped run (a checkpoint after every step) and one resumed from its first checkpoint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xdyna.train import checkpointing

from .tiny_run import BIN, clean_env, tiny_overrides

# A checkpoint after every step; the resumed run starts from step 1's (optimizer moments, RNG and
# loader positions all past their initial values) and trains step 2. Two steps keep the
# ZeRO-3 runs (tens of CPU seconds per step here) affordable.
MAX_STEPS = 2
RESUME_STEP = 1
# DDP and ZeRO-3 round the gradient reduction and its clipping norm differently, which AdamW's
# first steps amplify (an update is about lr * g / |g|) to ~2e-7 here; a shard put in the wrong
# place, or one a step old, is off by a weight's size or a step's update (>= 2.5e-4).
CROSS_STRATEGY_ATOL = 1e-5
# Only a guard against a hung run: a loaded 2-core machine can take many minutes per run.
RUN_TIMEOUT_S = 1800
# Case -> (strategy config, what else makes it the setting to test).
CASES = {
    # The GPU default with loader workers, as real runs have them: resume must restore every
    # worker's position (byte offsets, pending buckets, generators), not only the main process's.
    "zero2-2workers": ("deepspeed_cpu_zero2", ["data.num_workers=2", "stage.ema.decay=0.5"]),  # + an EMA, checked in test_resume
    "zero3": ("deepspeed_cpu_zero3", []),
    # process_group_backend=null: Lightning picks gloo on CPU.
    "ddp": ("ddp", []),
}


def train(root: Path, run_id: str, shards: Path, case: str) -> Path:
    """A 2-rank tiny run of MAX_STEPS steps; returns its checkpoint directory."""
    strategy, overrides = CASES[case]
    done = subprocess.run(
        [str(BIN / "xdyna-train"), *tiny_overrides(shards, root, run_id, MAX_STEPS, every_n_steps=1, strategy=strategy),
         "trainer.devices=2", *overrides],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{run_id}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return root / run_id / "checkpoints"


class Runs:
    """Module-wide store of the tiny runs, trained on first use: per case, one never-stopped
    run (a checkpoint after every step) and one that starts from a copy of its first checkpoint
    alone, as a run preempted after that step would."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.shards = root, shards
        self._done: dict[tuple[str, str], Path] = {}

    def _run(self, kind: str, case: str) -> Path:
        key = (kind, case)
        if key not in self._done:
            run_id = f"{kind}-{case}"
            if kind == "resumed":
                first = self.straight(case) / checkpointing.checkpoint_name(RESUME_STEP)
                target = self.root / run_id / "checkpoints" / first.name
                target.parent.mkdir(parents=True)
                (shutil.copytree if first.is_dir() else shutil.copy2)(first, target)
            self._done[key] = train(self.root, run_id, self.shards, case)
        return self._done[key]

    def straight(self, case: str) -> Path:
        return self._run("straight", case)

    def resumed(self, case: str) -> Path:
        return self._run("resumed", case)


# The pytest-xdist group of each case's runs (make test: -n 2 --dist loadgroup). Runs are trained
# lazily per case, so tests of different groups may run on different workers without training a
# case twice, as long as every test reading a case is in that case's group. test_zero3_export
# compares ZeRO-3 with DDP, so those two share a group.
RUN_GROUPS = {"zero2-2workers": "runs_zero2", "zero3": "runs_zero3_ddp", "ddp": "runs_zero3_ddp"}


def reads_runs(*cases: str):
    """Mark a test that reads the shared runs of ``cases`` (one group; tests/conftest.py refuses a
    test that uses the ``runs`` fixture without this mark)."""
    (group,) = {RUN_GROUPS[case] for case in cases}
    return pytest.mark.xdist_group(group)

