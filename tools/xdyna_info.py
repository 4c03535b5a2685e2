"""``xdyna-info``: size a training job before queueing it.

    xdyna-info model=sd15 stage=stage1 data.num_frames=16 data.height=896 data.width=512 --world-size 16

Composes the same Hydra config as ``xdyna-train`` (any ``model=``/``stage=``/``data=``/``experiment=``
override), builds the model on the meta device (no weights are read, no memory is used; weight
paths may be left unset) and prints JSON: parameters per component (total and trainable), training
FLOPs per sample at the configured frames and resolution, model-state memory per GPU under DDP,
ZeRO-2 and ZeRO-3, and the predicted peak GPU memory of a training step (weights, activations at
the micro-batch, frames, resolution, precision and checkpointing policy, Adam state, a workspace
allowance; a fake-tensor run of the step, about a minute at SD1.5 size). ``--fit 80GiB 40GiB``
instead names, per checkpointing policy, the largest micro-batch and frame count that fit.
Thin over :func:`xdyna.models.info.describe_job` and :func:`xdyna.models.memory.fit`.
"""

from __future__ import annotations

import argparse
import json
import sys

from xdyna.train import stage_config  # stdlib-only: the stage defaults

MISSING = "???"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdyna-info", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=sd15 stage=stage1 data.num_frames=16")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs sharing the job (default: trainer.devices x trainer.num_nodes when numeric, else 8)")
    parser.add_argument("--precision", default=None, help="training precision (default: trainer.precision)")
    parser.add_argument("--micro-batch", type=int, default=None, help="clips per GPU per step (default: data.batch_size)")
    parser.add_argument("--engine", default=None,
                        help="ddp (float32 weights + autocast) or DeepSpeed zero2/zero3 (module in the half dtype); "
                             "default: from trainer.strategy")
    parser.add_argument("--checkpointing", default=None,
                        help="activation checkpointing policy (none, diffusers, unet, all) or comma-separated block kinds; "
                             "default: the model config's")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory prediction (a fake-tensor run of the step)")
    parser.add_argument("--fit", nargs="+", metavar="SIZE", default=None,
                        help="GPU memory sizes (80GiB 40GiB 24GiB): the largest micro-batch and frame count that fit "
                             "each, per checkpointing policy")
    return parser


def _engine(trainer) -> str:
    strategy = trainer.get("strategy") or {}
    kind = str(strategy.get("kind", "auto")) if hasattr(strategy, "get") else str(strategy)
    if kind.startswith("deepspeed"):
        return f"zero{int(strategy.get('zero_stage', 2))}" if int(strategy.get("zero_stage", 2)) in (2, 3) else "zero2"
    return "ddp"


def _checkpointing(value: str | None):
    """A policy name or one kind as given; ``resnets,motion`` as a list of kinds."""
    if value is None or "," not in value:
        return value
    return [kind.strip() for kind in value.split(",") if kind.strip()]


def _world_size(trainer) -> int:
    devices = trainer.get("devices", 1)
    nodes = trainer.get("num_nodes", 1)
    return int(devices) * int(nodes) if str(devices).isdigit() else 8


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from xdyna.train.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def model_config_for_sizing(model_cfg):
    """The model config with unset (``???``) weight paths as ``None``: nothing is read on meta."""
    from omegaconf import OmegaConf

    from xdyna.models import ModelConfig

    values = OmegaConf.to_container(model_cfg, resolve=True, throw_on_missing=False)
    pretrained = values.get("pretrained") or {}
    values["pretrained"] = {key: (None if value == MISSING else value) for key, value in pretrained.items()}
    return ModelConfig.from_mapping(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from xdyna.errors import XDynaUserError
    from xdyna.models.info import describe_job
    from xdyna.models.memory import fit, parse_bytes
    from xdyna.train.hydra_errors import describe_config_error

    try:
        cfg = compose(args.overrides)
        model_config = model_config_for_sizing(cfg.model)
        job = dict(
            trainable=list(cfg.stage.trainable),
            conditions=list(cfg.stage.get("conditions", stage_config.DEFAULT_CONDITIONS)),
            height=int(cfg.data.height),
            width=int(cfg.data.width),
            world_size=args.world_size or _world_size(cfg.trainer),
            precision=str(args.precision or cfg.trainer.get("precision", "32")),
            engine=args.engine or _engine(cfg.trainer),
        )
        if args.fit:
            targets = [parse_bytes(size) for size in args.fit]
            cache: dict = {}  # one fake run per (policy, batch, frames), shared by the targets
            report = {"fit": [fit(target, model_config, frames=int(cfg.data.num_frames), cache=cache, **job) for target in targets]}
        else:
            report = describe_job(model_config, frames=int(cfg.data.num_frames), **job,
                                  batch=args.micro_batch or int(cfg.data.get("batch_size", 1)),
                                  checkpointing=_checkpointing(args.checkpointing), memory=not args.no_memory)
    except (XDynaUserError, HydraException, OmegaConfBaseException) as error:
        # The same one line as xdyna-train for a bad override (the option or key, the choices).
        message = describe_config_error(error, args.overrides)
        if message is None:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"xdyna-info: error: {message}", file=sys.stderr)
        return 2
    report["overrides"] = list(args.overrides)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
