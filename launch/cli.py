"""``xdyna-launch``: start xdyna-train jobs on a cluster.

    xdyna-launch slurm [--dry-run] [--launcher slurm] OVERRIDE...

``OVERRIDE`` are xdyna-train's Hydra overrides (``experiment=wo_fusion``,
``launcher.nodes=4``, ``launcher.partition=gpu``, ``run.id=my-run`` ...). The job shape comes
from the ``launcher`` config group (conf/launcher/); ``launcher.nodes_min=2 launcher.nodes=4``
submits an elastic job (``--nodes=2-4``) whose attempts may run on any node count of the range,
resuming on another world size when a requeue brings it back on fewer or more nodes
(docs/scale.md). Prints the job id, run directory and script.
Local single-node runs need no launcher: ``xdyna-train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf

from xdyna.errors import XDynaUserError
from xdyna.train import config_rules, slurm
from xdyna.train.hydra_errors import describe_config_error


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from xdyna.train.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def plan_slurm_launch(overrides: list[str], launcher: str = "slurm") -> slurm.LaunchPlan:
    """Compose the run's config and derive the job: run id, run directory, sbatch header."""
    # The launcher group is not in train.yaml's defaults (xdyna-train never needs it): append it.
    overrides = [o for o in overrides if not o.lstrip("+").startswith("launcher=")] + [f"+launcher={launcher}"]
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run.id=")]
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "xdyna")
    run_id = slurm.check_run_id(given[-1] if given else slurm.stable_run_id(experiment, overrides))
    os.environ["XDYNA_RUN_ID"] = run_id  # what ${run.id} resolves to in the job, too
    cfg = _compose([o for o in overrides if not o.startswith("run.id=")] + [f"run.id={run_id}"])
    launcher = slurm.LauncherConfig(**OmegaConf.to_container(cfg.launcher, resolve=True))  # typed by its schema
    spec = launcher.job_spec(f"xdyna-{run_id}")
    spec.validate()  # the job shape's own errors first: they name a launcher key
    # What the job would refuse on its node after the queue wait, and GPU nodes it would not use.
    config_rules.check(cfg, config_rules.CONFIG_RULES + config_rules.LAUNCH_RULES)
    run_root = Path(cfg.run.root).resolve()
    task_overrides = [o for o in overrides if not o.lstrip("+").startswith(("run.id=", "run.root=", "launcher"))] + [
        f"run.id={run_id}",
        f"run.root={run_root}",
        # The most nodes the job may get; each attempt trains on the nodes it got (scaleout reads them).
        f"trainer.num_nodes={spec.nodes}",
        f"trainer.devices={spec.tasks_per_node}",
    ]
    return slurm.LaunchPlan(run_id=run_id, run_dir=run_root / run_id, spec=spec, overrides=task_overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdyna-launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="backend", required=True)
    p_slurm = sub.add_parser("slurm", help="render an sbatch script from the Hydra config and submit it")
    p_slurm.add_argument("--launcher", default="slurm", help="conf/launcher/ option with the job shape (default: slurm)")
    p_slurm.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    p_slurm.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes (default: this one)")
    p_slurm.add_argument("overrides", nargs="*", help="xdyna-train Hydra overrides")
    args = parser.parse_args(argv)

    try:
        plan = plan_slurm_launch(args.overrides, args.launcher)
        script = plan.script(args.python)
        script_path = slurm.write_sbatch(script, plan.run_dir)
        if args.dry_run:
            print(script)
            job_id = "(dry run, not submitted)"
        else:
            job_id = slurm.submit(script_path)
    except (slurm.LaunchError, XDynaUserError, HydraException) as error:
        message = describe_config_error(error, args.overrides) if isinstance(error, HydraException) else None
        print(f"xdyna-launch: error: {message or error}", file=sys.stderr)
        return 2
    print(f"job_id   {job_id}")
    print(f"run_id   {plan.run_id}")
    print(f"run_dir  {plan.run_dir}")
    print(f"script   {script_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
