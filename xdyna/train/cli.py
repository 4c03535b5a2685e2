"""``xdyna-train``: Hydra entry point for one training stage.

    xdyna-train model=tiny data=synthetic stage=stage1 trainer.max_steps=100
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from ..cli_common import debug_requested
# Registers the dataclasses the conf/ files name as their schema (``/schema/<group>``): every
# composition of CONF_DIR (this CLI, xdyna-launch, xdyna-info, tests) imports this module first.
from . import schema  # noqa: F401

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def default_run_id(environ: os._Environ | dict = os.environ) -> str:
    """A run id that survives SLURM requeues (the job id does) and is unique for local runs."""
    from .slurm import slurm_job_id

    job_id = slurm_job_id(environ)
    return f"slurm-{job_id}" if job_id else "local-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def sweep_job_run_id(sweep_run_id: str, job_num: int) -> str:
    """The run id of job ``job_num`` of a ``-m`` sweep: ``<sweep run id>_<job num>``.

    Every job of a sweep sees the same ``XDYNA_RUN_ID`` (the sweeping process's), so without the
    job number they would share one run directory, checkpoints and W&B run. Hydra numbers jobs
    in the order the sweep expands, and a requeued submitit job keeps its pickled config and its
    environment, so the id is stable across requeues; rerunning the same sweep command with
    ``run.id=<sweep run id>`` resumes every job in place.
    """
    return f"{sweep_run_id}_{job_num}"


def user_error(message: str) -> "SystemExit":
    print(f"xdyna-train: error: {message}", file=sys.stderr)
    return SystemExit(2)


def build_logger(cfg, run_dir: Path, resume_step: int = 0):
    """``resume_step``: the optimizer step of the checkpoint the run resumes from (0: none)."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from .csv_history import HistoryCSVLogger

        # ${run.dir}/metrics/metrics.csv; a resumed run keeps the rows of the steps it resumes from.
        return HistoryCSVLogger(save_dir=str(run_dir), name="metrics", version="", keep_before_step=resume_step)
    if kind != "wandb":
        raise user_error(f"logger.kind={kind!r}; choose wandb, csv or none")
    from lightning.pytorch.loggers import WandbLogger
    from omegaconf import OmegaConf

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
        tags=list(OmegaConf.select(cfg, "run.tags", default=None) or []) or None,
    )


def describe_init(init_files: dict[str, str]) -> str | None:
    """``"a, b from <dir>"`` for the run summary (``None`` when nothing was loaded)."""
    if not init_files:
        return None
    folders = sorted({str(Path(path).parent) for path in init_files.values()})
    return f"{', '.join(sorted(init_files))} from {', '.join(folders)}"


def _face_detector():
    """facenet-pytorch's MTCNN (weights ship in its wheel) for the samples' Face-Det metric."""
    from ..metrics.face import FaceDetector

    try:
        return FaceDetector()
    except ImportError as error:
        raise user_error(f"samples.face_det=true needs facenet-pytorch ({error}); pip install --no-deps facenet-pytorch") from None


def _lpips_net(manifest_path: str):
    """LPIPS-VGG from a local weights manifest (xdyna-eval's format: VGG16 trunk + LPIPS heads)."""
    from ..metrics.lpips import build_lpips
    from ..metrics.weights import WeightsManifest

    return build_lpips(WeightsManifest.load(manifest_path))


def run_training(cfg, preemption_signals=None) -> dict[str, Any]:
    """Train one stage as configured; returns where its outputs went.

    ``preemption_signals``: an installed :class:`~xdyna.train.signals.PreemptionSignals` (the
    CLI installs one first thing); without one, one is installed here. Either way it stays
    installed through the end-of-stage export and is restored on return."""
    from .signals import PreemptionSignals

    if preemption_signals is None:
        preemption_signals = PreemptionSignals()
        preemption_signals.install()
    try:
        return _run_training(cfg, preemption_signals)
    finally:
        preemption_signals.restore()


def check_config(cfg) -> None:
    """Every check that needs no model or data loader: unset values, cross-group rules, this
    machine's accelerator, the data's clip kinds. Runs before the heavy imports, in seconds."""
    from omegaconf import OmegaConf

    from . import config_rules

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise user_error(f"required config value(s) not set: {', '.join(missing)}")
    config_rules.check(cfg, config_rules.CONFIG_RULES + config_rules.ENVIRONMENT_RULES)


def _run_training(cfg, preemption_signals) -> dict[str, Any]:
    check_config(cfg)

    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from omegaconf import OmegaConf

    from .callbacks import HoldForSignal, SampleVideoCallback, StepProgressBar
    from .checkpoint_callbacks import ProvenanceCheckpoint
    from .checkpointing import list_complete_checkpoints, newest_complete_checkpoint
    from .scaleout import build_scaleout
    from .datamodule import ClipDataModule
    from ..checkpoint_io import EXPORT_SUBDIR, checkpoint_refusal, deepspeed_globals, weights_only_loading
    from .export import export_run, init_component_files
    from .module import XDynaTrainingModule
    from .ema import EMACallback, EMAConfig
    from .telemetry import TrainingTelemetry

    run_dir = Path(cfg.run.dir).resolve()
    L.seed_everything(cfg.seed, workers=True)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # init.from_run / init.components_dir: an earlier stage's export becomes model.pretrained.components
    # (so the module's hyperparameters record it and a rebuilt model loads it too); components
    # named explicitly in model.pretrained.components take precedence.
    init_cfg = OmegaConf.to_container(cfg.init, resolve=True) if "init" in cfg else {}
    init_files = init_component_files(init_cfg, Path(cfg.run.root))
    if init_files:
        pretrained = model_cfg.setdefault("pretrained", {})
        pretrained["components"] = {**init_files, **(pretrained.get("components") or {})}
    # GroupNorm modes left at auto are resolved here, so the hyperparameters (and the export's
    # manifest) record the modes this model uses, even for a rebuild without the released UNet.
    from ..models import ModelConfig

    model_cfg.update(ModelConfig.from_mapping(model_cfg).groupnorm_modes())
    stage_cfg = OmegaConf.to_container(cfg.stage, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = ClipDataModule(data_cfg)  # first: checks data paths before the model loads
    # Strategy, atomic step checkpoints, preemption (the one owner of requeue) and resume point.
    scaleout = build_scaleout(
        OmegaConf.to_container(cfg.trainer, resolve=True),
        run_dir,
        every_n_steps=cfg.checkpoint.every_n_steps,
        keep=cfg.checkpoint.keep,
        resume=cfg.run.resume,
        preemption_signals=preemption_signals,
    )
    # A config without a schedule group (composed before there was one) trains the default.
    schedule_node = OmegaConf.select(cfg, "schedule")
    schedule_cfg = OmegaConf.to_container(schedule_node, resolve=True) if schedule_node is not None else None
    module = XDynaTrainingModule(model=model_cfg, stage=stage_cfg, seed=cfg.seed, schedule=schedule_cfg)
    if data_cfg.get("latents"):  # cached latents must come from this model's VAE (before precision casts it)
        from datapipes.loader import ClipLoaderConfig, latents_records
        from ..latents import check_cached_vae

        check_cached_vae(module.model.vae, latents_records(ClipLoaderConfig(**data_cfg)))
    run_dir.mkdir(parents=True, exist_ok=True)
    samples = SampleVideoCallback(
        every_n_steps=cfg.samples.every_n_steps,
        num_inference_steps=cfg.samples.num_inference_steps,
        max_samples=cfg.samples.max_samples,
        fps=cfg.samples.fps,
        seed=cfg.seed,
        weights=OmegaConf.select(cfg, "samples.weights", default="ema"),
        face_detector=_face_detector() if OmegaConf.select(cfg, "samples.face_det", default=False) else None,
        lpips_net=_lpips_net(lpips_weights) if (lpips_weights := OmegaConf.select(cfg, "samples.lpips_weights")) else None,
        stopped_early=lambda: scaleout.preemption.preempted,
    )
    resume_step = next((entry.step for entry in list_complete_checkpoints(scaleout.checkpoint_dir)
                        if entry.path == scaleout.resume_from), 0)
    logger = build_logger(cfg, run_dir, resume_step)
    telemetry = TrainingTelemetry(peak_tflops=OmegaConf.select(cfg, "telemetry.peak_tflops", default=None))
    # Every checkpoint, the export and the W&B run record where they came from (xdyna.provenance).
    provenance = ProvenanceCheckpoint(OmegaConf.to_container(cfg, resolve=True), data_cfg, model_cfg.get("pretrained"))
    callbacks = [*scaleout.callbacks, provenance, samples, telemetry, StepProgressBar()]
    ema_config = EMAConfig.from_mapping(stage_cfg.get("ema"))  # stage.ema.decay=null: no EMA
    if ema_config.enabled:  # first: a step's checkpoint and sample video must see that step's EMA
        callbacks.insert(0, EMACallback(ema_config))
    hold_after_step = OmegaConf.select(cfg, "debug.hold_after_step", default=None)
    if hold_after_step is not None:
        callbacks.append(HoldForSignal(hold_after_step, preemption_signals))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        **scaleout.trainer_kwargs,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        # StepCheckpoints replaces ModelCheckpoint (atomic, step-named, newest-complete resume).
        enable_checkpointing=False,
        # The loader splits shards by rank itself; Lightning must not wrap it in a sampler.
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    ckpt_path = str(scaleout.resume_from) if scaleout.resume_from else None
    # A resume reads its checkpoint weights-only like every other checkpoint read (DeepSpeed's
    # shard reader included, whose own torch.load asks for full unpickling).
    try:
        with weights_only_loading(deepspeed_globals()) if ckpt_path else contextlib.nullcontext():
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    except pickle.UnpicklingError as error:
        raise checkpoint_refusal(ckpt_path, error) from None

    newest = newest_complete_checkpoint(scaleout.checkpoint_dir)
    export_dir = None
    if not scaleout.preemption.preempted and newest is not None and OmegaConf.select(cfg, "checkpoint.export_at_end", default=False):
        # What the next stage starts from (init.from_run=<this run id>); rank 0 reads the shards
        # every rank committed before fit() returned.
        export_dir = run_dir / EXPORT_SUBDIR
        if trainer.global_rank == 0:
            export_run(run_dir, newest, model=module.model)
    outputs = {
        "run_dir": str(run_dir),
        "checkpoint": str(newest) if newest else None,
        "export": str(export_dir) if export_dir else None,
        "init_from": describe_init(init_files),
        "sample_video": str(samples.last_video) if samples.last_video else None,
        "wandb_dir": str(Path(logger.experiment.dir).parent) if logger and cfg.logger.kind == "wandb" else None,
        "metrics_csv": str(Path(logger.log_dir) / "metrics.csv") if logger and cfg.logger.kind == "csv" else None,
        "resumed_from": ckpt_path,
        "preempted_at": scaleout.preemption.preempted_at_step,
        "requeued": scaleout.preemption.requeued,
    }
    stopped_early = scaleout.preemption.preempted
    if stopped_early and not scaleout.preemption.requeued:
        # Nothing restarts this run by itself (a Ctrl-C, a signal outside SLURM): say how to.
        outputs["resume_with"] = f"the same command with run.id={cfg.run.id}"
    if trainer.global_rank == 0:
        state = "interrupted" if stopped_early and preemption_signals.interrupted else "preempted" if stopped_early else "finished"
        print(f"\nxdyna-train {state}")
        for key, value in outputs.items():
            print(f"  {key:13s} {value}")
    return outputs


def _task(cfg) -> None:
    from .signals import PreemptionSignals

    # First, before the heavy imports: from here on a preemption signal only sets a flag that
    # training acts on at its next step end (no default action killing the job, no submitit
    # handler requeueing it behind our back).
    preemption_signals = PreemptionSignals(interrupt=True)  # Ctrl-C saves the finished step too
    preemption_signals.install()

    from ..errors import XDynaUserError

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep_job:
        cfg.run.id = sweep_job_run_id(cfg.run.id, hydra_cfg.job.num)
    try:
        outputs = run_training(cfg, preemption_signals)
    except (XDynaUserError, FileNotFoundError) as error:
        if debug_requested():
            raise
        raise user_error(str(error)) from None
    if outputs["preempted_at"] is not None and preemption_signals.interrupted:
        raise SystemExit(130)  # the shell's status for a Ctrl-C: scripts (make demo) stop here too
    if sweep_job and outputs["requeued"]:
        # submitit pickles whatever a job function returns as the job's result, and the sweeping
        # process takes a result as "job finished". A requeued job has not finished: leave
        # without one (SystemExit passes through Hydra and submitit), so the sweeping process
        # waits for the restarted job's result.
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    import hydra

    from .hydra_errors import describe_config_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        # In the environment, so DDP children and sweep jobs (which inherit it) report alike.
        os.environ["XDYNA_DEBUG"] = "1"
    sys.argv = [sys.argv[0], *argv]
    # Set once, before Hydra, so every process of this run (DDP children inherit the
    # environment) resolves the same run directory.
    os.environ.setdefault("XDYNA_RUN_ID", default_run_id())
    # Hydra composes the config before _task runs and, by default, reports a bad override itself
    # (several lines, exit status 1). HYDRA_FULL_ERROR makes it raise instead, so the errors reach
    # the one-line translation below; anything that is not a config error keeps its traceback.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(_task)()
    except Exception as error:
        message = None if debug_requested() else describe_config_error(error, [a for a in argv if not a.startswith("-")])
        if message is None:
            raise
        raise user_error(message) from None
    except KeyboardInterrupt:
        # A Ctrl-C outside the training steps (loading, building, exporting): no step to save
        # there, and no traceback either.
        if debug_requested():
            raise
        print("xdyna-train: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
