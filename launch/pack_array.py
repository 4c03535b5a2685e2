"""``xdyna-data pack --parts P --slurm``: the unfinished parts of a pack as one SLURM array job.

An sbatch script is rendered (``DIR/slurm/pack.sbatch``, readable, editable and resubmittable by
hand) and submitted with ``sbatch``, as ``xdyna-launch`` does for training, rather than through
submitit: a part is already a plain, resumable command (its state is its files, not a pickled
Python call), so there is nothing for submitit's pickling and result collection to add, and a
script works the same from a login node without the submitting Python process. Each task runs
the user's own ``pack`` command with ``--part $SLURM_ARRAY_TASK_ID``; ``--array`` lists only the
parts without a completion record, so resubmitting after a failure runs what is left. The last
task to finish writes the index.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from datapipes.index import build_index
from datapipes.parts import dedupe_keys, ensure_plan, finished_parts, make_plan
from xdyna.train.slurm import submit



def array_spec(parts: list[int], max_running: int | None = None) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5`` (``%N`` appended to cap the tasks running at once)."""
    ranges, first = [], parts[0]
    for current, following in zip(parts, parts[1:] + [None]):
        if following != current + 1:  # a run ends here
            ranges.append(str(first) if first == current else f"{first}-{current}")
            first = following
    return ",".join(ranges) + (f"%{max_running}" if max_running else "")


def render_pack_array(job_argv: list[str], parts: list[int], out_dir: str, cpus: int, time: str,
                      partition: str | None = None, max_running: int | None = None, gpus: int = 0,
                      setup: list[str] | tuple[str, ...] = (), python: str = sys.executable,
                      command: str = "pack") -> str:
    """``command``: the xdyna-data subcommand whose parts the tasks run (``pack`` or ``encode``)."""
    log_dir = Path(out_dir).resolve() / "slurm"
    directives = [f"--job-name=xdyna-{command}-{Path(out_dir).name}"[:80], f"--array={array_spec(parts, max_running)}",
                  "--ntasks=1", f"--cpus-per-task={cpus}", f"--time={time}", f"--chdir={os.getcwd()}",
                  f"--output={log_dir}/{command}-%A_%a.out", "--open-mode=append",
                  # A requeued task reruns its part from scratch (no record yet): safe by design.
                  "--requeue"]
    if partition:
        directives.append(f"--partition={partition}")
    if gpus:
        directives.append(f"--gpus-per-task={gpus}")
    line = " ".join(shlex.quote(word) for word in [python, "-m", "tools.xdyna_data", *job_argv])
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
             f"# Rendered by xdyna-data {command} --slurm. Each task runs one part; a finished part is skipped,",
             "# so resubmitting this script (or rerunning the command) does only what is left.",
             "set -euo pipefail", *setup,
             f'exec {line} --part "$SLURM_ARRAY_TASK_ID"']
    return "\n".join(lines) + "\n"


def submit_pack_array(args, job_argv: list[str], settings, items) -> int:
    plan = make_plan(dedupe_keys(items), settings)
    return submit_parts_array(args, job_argv, plan, cpus=args.slurm_cpus or max(1, args.workers))


def submit_parts_array(args, job_argv: list[str], plan: dict, cpus: int, command: str = "pack") -> int:
    """Submit the parts of ``plan`` (a pack's or an encode's, datapipes.parts) without a record."""
    if args.part is not None:
        raise ValueError("--slurm submits every unfinished part; it does not combine with --part")
    os.makedirs(args.out, exist_ok=True)
    ensure_plan(args.out, plan)  # refuses another pack's folder before anything is submitted
    done = set(finished_parts(args.out, plan))
    todo = [part for part in range(plan["parts"]) if part not in done]
    if not todo:
        index = build_index(args.out)
        print(f"every part of {args.out!r} is finished; index written: {index['samples']} clip(s)")
        return 0
    script = render_pack_array(job_argv, todo, args.out, cpus=cpus,
                               time=args.slurm_time, partition=args.slurm_partition,
                               max_running=args.slurm_max_running, gpus=args.slurm_gpus, setup=args.slurm_setup,
                               command=command)
    path = Path(args.out) / "slurm" / f"{command}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if args.dry_run:
        print(f"wrote {path} ({len(todo)} of {plan['parts']} part(s) to do); not submitted (--dry-run)")
        return 0
    job = submit(path)
    print(f"submitted array job {job}: {len(todo)} of {plan['parts']} part(s) ({array_spec(todo)}); "
          f"script {path}; logs {path.parent}/{command}-{job}_*.out")
    return 0
