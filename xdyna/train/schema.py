"""The config schema: the dataclasses that hold every default, registered in Hydra's ConfigStore.

Each config group's files under ``conf/`` start from their group's dataclass (first entry of
their defaults list, ``- /schema/<group>@_here_``) and hold only what differs from it, so a
default lives in one place, the dataclass, and ``xdyna-train --cfg job`` still shows every value.
The composed nodes are typed by the dataclasses: a key that is no field (a typo in a file or an
override) or a value of the wrong type is refused while Hydra composes, before anything runs.

The dataclasses stay plain (xdyna/models and datapipes import no Hydra): the registration is
here, imported by :mod:`xdyna.train.cli` and so by everything that composes ``conf/`` through
its ``CONF_DIR``. Adding a group's schema: one entry in :data:`SCHEMAS` and the defaults entry in
the group's files (docs/extending.md, "A new config key").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# Each schema from a module that imports no torch, diffusers or webdataset: every CLI imports this
# one, and a bad config is answered before anything heavy is imported (tests/test_light_config.py).
from datapipes.loader_config import ClipLoaderConfig
from ..diffusion import ScheduleConfig
from ..models.config import ModelConfig
from .slurm import LauncherConfig
from .stage_config import StageConfig

# ----------------------------------------------------------------------------- the top level
# The sections of conf/train.yaml that belong to no group: xdyna-train's own settings.


@dataclass
class RunConfig:
    # Stable across SLURM requeues: xdyna-train sets XDYNA_RUN_ID from SLURM_JOB_ID when it is
    # unset (a timestamp only for local runs). Same id => same directory => resume in place.
    id: str = "${oc.env:XDYNA_RUN_ID}"
    root: str = "runs"
    dir: str = "${run.root}/${run.id}"
    resume: bool = True  # continue from ${run.dir}/checkpoints/last.ckpt when it exists
    tags: list[str] = field(default_factory=list)  # W&B run tags (conf/experiment/ names its ablation)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50  # periodic checkpoints; the last one is always written at the end of the stage
    keep: int = 3
    export_at_end: bool = True  # a finished stage also writes ${run.dir}/export (what xdyna-export writes)


@dataclass
class InitConfig:
    """Start from an earlier stage's weights, e.g. stage 2 from stage 1: ``init.from_run=<stage-1 run
    id>``. Every component in that export is loaded before training (frozen or trainable); on
    resume this run's own checkpoint then restores the trainable ones."""

    from_run: str | None = None  # a run id under ${run.root}, or a run directory: uses its export/ directory
    components_dir: str | None = None  # or any xdyna-export directory
    components: list[str] | None = None  # the subset to load, e.g. [pose_controlnet]; null = all in the export


@dataclass
class TelemetryConfig:
    # Peak dense FLOP/s of one device in the run's precision, in TFLOP/s (H100 SXM bf16: 989,
    # A100 bf16: 312): enables perf/mfu. null = MFU not reported.
    peak_tflops: float | None = None


@dataclass
class DebugConfig:
    # TEST-ONLY: after this optimizer step of a job's first attempt, wait for a preemption signal or
    # Ctrl-C (so a test's signal always finds the job mid-run); null = never.
    hold_after_step: int | None = None


@dataclass
class SamplesConfig:
    every_n_steps: int = 0  # 0: only at the end of the stage
    num_inference_steps: int = 10
    max_samples: int = 2  # clips per rank in each sample video; 0: no sample videos
    weights: str = "ema"  # ema: the stage's EMA (stage.ema) once it has started, else raw; raw: the trained weights
    fps: int = 8
    face_det: bool = False  # also log val/face_det (MTCNN from facenet-pytorch; ~0.5 s per frame on CPU)
    lpips_weights: str | None = None  # also log val/lpips: a weights manifest as for xdyna-eval (docs/metrics.md)


@dataclass
class TrainConfig:
    """conf/train.yaml. The groups are typed by their own schemas (``Any`` here: a group field typed
    by its dataclass would be rebuilt from the class when the group merges in, read-only for the
    frozen ones); their options are chosen in train.yaml's defaults list."""

    model: Any = MISSING
    data: Any = MISSING
    stage: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    launcher: Any = None  # the job's shape, added by xdyna-launch (+launcher=slurm); null for xdyna-train
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)


# Where the schemas live in the ConfigStore: ``/schema/<group>``, a group of its own, so they are
# no selectable option of the groups they describe (``model=...`` lists only the files).
SCHEMA_GROUP = "schema"
# Config group -> the dataclass that is its schema and holds its defaults. The groups without one
# (trainer, logger) pass their keys to Lightning or W&B as written.
SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": ClipLoaderConfig,
    "schedule": ScheduleConfig,
    "stage": StageConfig,
    "launcher": LauncherConfig,
}
# The primary config's schema, ``/schema/train`` (the first entry of conf/train.yaml's defaults).
TRAIN = "train"


def schema_node(schema: type) -> DictConfig:
    """The dataclass as a Hydra node: its defaults, types and keys. Frozen dataclasses (the
    schedule, the EMA settings: immutable once built and checked) would give read-only nodes that
    refuse every file and override on top; the schema is the defaults, not the values, so the
    node is made writable, the dataclass stays frozen."""
    node = OmegaConf.structured(schema)

    def unlock(container: DictConfig) -> None:
        OmegaConf.set_readonly(container, False)
        for key in container:
            child = container._get_node(key)
            if isinstance(child, DictConfig):
                unlock(child)

    unlock(node)
    return node


def register() -> None:
    """Store every schema under ``/schema/<group>`` (idempotent: a second call overwrites)."""
    store = ConfigStore.instance()
    for group, schema in {**SCHEMAS, TRAIN: TrainConfig}.items():
        store.store(group=SCHEMA_GROUP, name=group, node=schema_node(schema))


register()
