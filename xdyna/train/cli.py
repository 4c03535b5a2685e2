"""``xdyna-train``: Hydra entry point for one training stage.

    xdyna-train model=tiny data=synthetic stage=stage1 trainer.max_steps=100
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def default_run_id(environ: os._Environ | dict = os.environ) -> str:
    """A run id that survives SLURM requeues (the job id does) and is unique for local runs."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    if environ.get("SLURM_JOB_ID"):
        return f"slurm-{environ['SLURM_JOB_ID']}"
    return "local-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def user_error(message: str) -> "SystemExit":
    print(f"xdyna-train: error: {message}", file=sys.stderr)
    return SystemExit(2)


def build_logger(cfg, run_dir: Path):
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind != "wandb":
        raise user_error(f"logger.kind={kind!r}; choose wandb or none")
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    # id = run id, resume="allow": a requeued job continues the same W&B run.
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.run.id,
        id=cfg.run.id,
        resume="allow",
        save_dir=str(run_dir),
        offline=cfg.logger.mode == "offline",
    )


def run_training(cfg) -> dict[str, Any]:
    """Train one stage as configured; returns where its outputs went."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from omegaconf import OmegaConf

    from .callbacks import EndOfStageCheckpoint, SampleVideoCallback
    from .datamodule import ClipDataModule
    from .module import XDynaTrainingModule

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise user_error(f"required config value(s) not set: {', '.join(missing)}")
    run_dir = Path(cfg.run.dir).resolve()
    L.seed_everything(cfg.seed, workers=True)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    stage_cfg = OmegaConf.to_container(cfg.stage, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = ClipDataModule(data_cfg)  # first: checks data paths before the model loads
    module = XDynaTrainingModule(model=model_cfg, stage=stage_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    checkpoint_dir = run_dir / "checkpoints"
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_top_k=cfg.checkpoint.keep,
        monitor="step",
        mode="max",
        save_last=True,
    )
    samples = SampleVideoCallback(
        every_n_steps=cfg.samples.every_n_steps,
        num_inference_steps=cfg.samples.num_inference_steps,
        max_samples=cfg.samples.max_samples,
        fps=cfg.samples.fps,
        seed=cfg.seed,
    )
    logger = build_logger(cfg, run_dir)
    last = checkpoint_dir / "last.ckpt"
    callbacks = [checkpoints, samples, EndOfStageCheckpoint(last)]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        # The loader splits shards by rank itself; Lightning must not wrap it in a sampler.
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    ckpt_path = str(last) if cfg.run.resume and last.exists() else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    outputs = {
        "run_dir": str(run_dir),
        "checkpoint": str(last) if last.exists() else checkpoints.best_model_path,
        "sample_video": str(samples.last_video) if samples.last_video else None,
        "wandb_dir": str(Path(logger.experiment.dir).parent) if logger else None,
        "resumed_from": ckpt_path,
    }
    if trainer.global_rank == 0:
        print("\nxdyna-train finished")
        for key, value in outputs.items():
            print(f"  {key:13s} {value}")
    return outputs


def _task(cfg) -> None:
    from ..errors import XDynaUserError

    try:
        run_training(cfg)
    except (XDynaUserError, FileNotFoundError) as error:
        if os.environ.get("XDYNA_DEBUG"):
            raise
        raise user_error(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    import hydra

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    # Set once, before Hydra, so every process of this run (DDP children inherit the
    # environment) resolves the same run directory.
    os.environ.setdefault("XDYNA_RUN_ID", default_run_id())
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(_task)()


if __name__ == "__main__":
    main()
