"""Checks across config groups, run before anything heavy is built.

Each rule takes the composed config and returns its violations: one line each, naming the keys
and the fix (empty when the rule holds). ``xdyna-train`` runs :data:`CONFIG_RULES` and
:data:`ENVIRONMENT_RULES`; ``xdyna-launch`` runs :data:`CONFIG_RULES` and :data:`LAUNCH_RULES`
(the login node's GPUs and files say nothing about the job's), and :func:`check` turns the first
violations into a :class:`~xdyna.errors.ConfigError` (one line, exit status 2).
"""

from __future__ import annotations

import json
import tarfile
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, is_integer, is_number

Rule = Callable[[DictConfig], "list[str]"]


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _plain(cfg: DictConfig, key: str, default=None):
    """The value at ``key`` as plain Python (containers resolved), ``default`` when absent."""
    node = _select(cfg, key, default)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _model(cfg: DictConfig):
    """The composed ``model`` as a :class:`~xdyna.models.config.ModelConfig`, or ``None`` when there
    is none or it is invalid (:func:`model_is_valid` reports why; the other rules then stay quiet)."""
    from ..models.config import ModelConfig

    if _select(cfg, "model") is None:
        return None
    try:
        return ModelConfig.from_mapping(_plain(cfg, "model"))
    except (ConfigError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- config


def shards_given(cfg: DictConfig) -> list[str]:
    """``preset=sd15`` leaves ``data.shards`` null for the user to fill (a ``???`` cannot replace
    the demo path in Hydra's merge): name the key before a job is queued or a model built."""
    if "data" in cfg and _select(cfg, "data.shards") in (None, "", []) and not _select(cfg, "data.sources"):
        return ["data.shards is not set: give the training shards, e.g. "
                "data.shards=\"'/data/human/train-{000000..000999}.tar'\""]
    return []


def face_landmarks_switch_is_one(cfg: DictConfig) -> list[str]:
    """The w/lmk ablation is one switch over two groups: the model without an S-Face ControlNet
    (``model.face=landmarks_in_pose``) and the data that draws the face landmarks into its pose
    images (``data.face_landmarks_in_pose``). Either alone trains another model than its name
    says (the first alone is wo/face), so the pair is checked rather than one derived from the
    other: a derived data key would hold only in data files that carry the interpolation, and a
    user's own data file would silently lose it."""
    face = _select(cfg, "model.face")
    drawn = bool(_select(cfg, "data.face_landmarks_in_pose", False))
    if (face == "landmarks_in_pose") == drawn:
        return []
    if drawn:
        return [f"data.face_landmarks_in_pose=true draws face landmarks into the pose, but model.face={face} is not the "
                f"w/lmk model: use experiment=w_lmk (sets model.face=landmarks_in_pose and data.face_landmarks_in_pose=true) "
                f"or set data.face_landmarks_in_pose=false"]
    return ["model.face=landmarks_in_pose (w/lmk) needs data.face_landmarks_in_pose=true, else the pose carries no face "
            "and it trains the wo/face model: use experiment=w_lmk (sets both) or add data.face_landmarks_in_pose=true"]


def keys_are_schema_fields(cfg: DictConfig) -> list[str]:
    """Every key of a node typed by a schema (xdyna/train/schema.py) is a field of its dataclass.
    Composition refuses a typo in a file or an override; ``+group.key=...`` still adds one (Hydra
    opens the node for it), and the dataclass would take it only as a TypeError at build time."""
    from dataclasses import fields, is_dataclass

    found: list[str] = []

    def walk(node: DictConfig, path: str) -> None:
        schema = OmegaConf.get_type(node)
        known = [f.name for f in fields(schema)] if is_dataclass(schema) else None
        for key in node:
            where = f"{path}.{key}" if path else str(key)
            if known is not None and key not in known:
                found.append(f"{where}: no such key; {path or 'the top level'} takes the fields of "
                             f"{schema.__module__}.{schema.__qualname__}: {', '.join(known)}")
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, where)

    walk(cfg, "")  # untyped nodes (trainer, logger, launcher) are walked through, not checked
    return found


def real_weights_given(cfg: DictConfig) -> list[str]:
    """A real-size model (``model=sd15``) starts from the user's SD1.5 folder. Its file cannot mark
    the path required with ``???``: Hydra's merge keeps the schema's ``null`` over a missing
    value, so the requirement is checked here (only the tiny flavour trains from random init)."""
    flavour = _select(cfg, "model.flavour")
    if flavour in (None, "tiny") or _select(cfg, "model.pretrained.sd15") not in (None, ""):
        return []
    return [f"required config value(s) not set: model.pretrained.sd15 (model.flavour={flavour} starts from real "
            f"weights: a local diffusers SD1.5 folder, e.g. model.pretrained.sd15=/data/weights/stable-diffusion-v1-5)"]


def model_is_valid(cfg: DictConfig) -> list[str]:
    """The model config's own checks (choices, exclusive paths, its reference variant's rules),
    before a job is queued or a model built."""
    from ..models.config import ModelConfig

    if _select(cfg, "model") is None:
        return []
    try:
        ModelConfig.from_mapping(_plain(cfg, "model"))
    except ConfigError as error:
        return [str(error)]
    return []


def data_is_valid(cfg: DictConfig) -> list[str]:
    """The data config's own checks (values, the ``data.sources`` table, aspect buckets): a typo
    inside a source, which the schema cannot type, is found before a job is queued, not on its
    node after the queue wait. Paths are not opened here (the data module does that at start)."""
    from datapipes.loader_config import ClipLoaderConfig

    if _select(cfg, "data") is None:
        return []
    try:
        ClipLoaderConfig(**_plain(cfg, "data")).validate()
    except ValueError as error:
        return [str(error)]
    return []


def stage_trains_what_the_model_has(cfg: DictConfig) -> list[str]:
    """``stage.trainable`` names components the model builds: the reference variant's own (asked
    of its class in reference_variants.py), the S-Face ControlNet with ``model.face=sface``, the
    image prompt with ``model.image_prompt=true``. Caught when the model is built, otherwise: after
    the weights are loaded, or on a cluster after the queue wait."""
    from ..models.config import COMPONENTS

    trainable = _plain(cfg, "stage.trainable")
    model = _model(cfg)
    if not isinstance(trainable, list) or model is None:
        return []
    found = []
    unknown = [name for name in trainable if name not in COMPONENTS]
    if unknown:
        found.append(f"stage.trainable: unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
    have = model.components()
    absent = [name for name in trainable if name in COMPONENTS and name not in have]
    if not absent:
        return found
    variant = model.reference_variant
    fixed = [name for name in trainable if name in have]
    # Another variant's reference component: this variant's takes its place in the suggestion.
    swapped = any(name not in ("face_controlnet", "image_prompt") for name in absent)
    if swapped and variant.reference_component in have and variant.reference_component not in fixed:
        fixed.insert(0, variant.reference_component)
    fix = f" or stage.trainable=[{', '.join(fixed)}]" if fixed else ""
    for name in absent:
        if name == "face_controlnet":
            why = f"model.face={model.face} has no S-Face ControlNet"
        elif name == "image_prompt":
            why = "model.image_prompt=false builds no image prompt"
        else:
            path = (f"its reference path trains as {variant.reference_component}" if variant.reference_component
                    else "its reference path has no trainable weights")
            why = f"model.reference={variant.name} ({variant.title}) has no {name}; {path}"
        found.append(f"stage.trainable has {name} but {why}: use a model and stage that fit "
                     f"(conf/experiment/ sets both for each ablation){fix}")
    return found


# The ControlNet each condition feeds: trained without its condition it gets no input.
CONDITION_CONTROLNETS = {"pose": "pose_controlnet", "face": "face_controlnet"}


def stage_conditions_fit_the_data(cfg: DictConfig) -> list[str]:
    """``stage.conditions`` against the model and the data: a face condition needs the S-Face
    ControlNet (``model.face=sface``) and face maps in the batches (``data.with_face=true``, and
    with ``data.sources`` a source whose clips carry them); a trained ControlNet needs its condition."""
    from datapipes.loader_config import SOURCE_KINDS, ClipLoaderConfig

    conditions = _plain(cfg, "stage.conditions")
    if not isinstance(conditions, list):
        return []
    found = []
    offered = SOURCE_KINDS["human"]["conditions"]
    unknown = [c for c in conditions if c not in offered]
    if unknown:
        found.append(f"stage.conditions: unknown {unknown}; known: {', '.join(offered)}")
    trainable = _plain(cfg, "stage.trainable") or []
    for condition, controlnet in CONDITION_CONTROLNETS.items():
        if controlnet in trainable and condition not in conditions:
            found.append(f"stage.trainable has {controlnet} but stage.conditions={conditions} has no {condition}: "
                         f"it would get no input and learn nothing; add {condition} to stage.conditions")
    if "face" not in conditions:
        return found
    model = _model(cfg)
    if model is not None and model.face != "sface":
        found.append(f"stage.conditions has face but model.face={model.face} has no S-Face ControlNet to take it: "
                     f"drop face from stage.conditions or use model/face=sface")
    if "data" not in cfg:
        return found
    if not _select(cfg, "data.with_face", False):
        found.append("stage.conditions has face but data.with_face=false: the batches carry no face maps; "
                     "add data.with_face=true")
    elif _select(cfg, "data.sources") is not None:
        try:
            sources = ClipLoaderConfig(**_plain(cfg, "data")).data_sources()
        except (TypeError, ValueError):
            return found  # the data module names a malformed source table
        if not any("face" in source.conditions for source in sources):
            found.append(f"stage.conditions has face but no source of data.sources ({', '.join(s.name for s in sources)}) "
                         f"carries face maps: give a human source conditions [pose, face]")
    return found


# ----------------------------------------------------------------------------- launch


def gpu_launcher_runs_a_gpu_job(cfg: DictConfig) -> list[str]:
    """GPU nodes around a job that would not use them (a CPU trainer, the tiny test model) are
    refused: that is the README's SLURM example before a preset picks the real model.
    ``launcher.smoke_test=true`` allows it (the tiny model on GPU nodes, to try the job itself)."""
    if not _select(cfg, "launcher.request_gpus", False) or _select(cfg, "launcher.smoke_test", False):
        return []
    wrong = []
    if str(_select(cfg, "trainer.accelerator", "")).lower() == "cpu":
        wrong.append("trainer.accelerator=cpu")
    if _select(cfg, "model.flavour") == "tiny":
        wrong.append("model.flavour=tiny")
    if not wrong:
        return []
    return [f"the launcher requests GPUs but the job has {' and '.join(wrong)}: add preset=sd15 for a "
            f"real-size GPU run (docs/scale.md), --launcher slurm_cpu for CPU nodes, or "
            f"launcher.smoke_test=true to run it on GPU nodes anyway"]


def job_has_no_unset_values(cfg: DictConfig) -> list[str]:
    """A job queued with a ``???`` value would fail on its node after the queue wait."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    return [f"required config value(s) not set: {', '.join(missing)}"] if missing else []


# ----------------------------------------------------------------------------- this machine


def accelerator_is_available(cfg: DictConfig) -> list[str]:
    """``trainer=gpu`` on a machine without one fails only after the data and model are built."""
    accelerator = str(_select(cfg, "trainer.accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda"):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use trainer=cpu here"]


# Shards peeked for their kinds: spread over the list (scene shards may follow the human ones
# in one pattern), a few samples each. Headers are read and data skipped, so this costs
# milliseconds per shard whatever the videos' size.
PEEK_SHARDS = 8
PEEK_SAMPLES_PER_SHARD = 16


def peek_kinds(urls: list[str], shards_n: int = PEEK_SHARDS, samples_n: int = PEEK_SAMPLES_PER_SHARD) -> set[str]:
    """The ``kind`` values of the first samples of up to ``shards_n`` local shards spread over
    ``urls`` (remote urls are skipped; unreadable members are left to the loader to report)."""
    from datapipes.shards import META, REMOTE_PREFIXES, split_member_name

    local = [url.removeprefix("file:") for url in urls if not url.startswith(REMOTE_PREFIXES)]
    if not local:
        return set()
    step = max(1, len(local) // shards_n)
    picked = sorted(set(local[::step][:shards_n - 1] + [local[-1]]))
    kinds: set[str] = set()
    for path in picked:
        try:
            with tarfile.open(path, mode="r:") as tar:
                seen = 0
                for info in tar:
                    if not info.isreg() or split_member_name(info.name)[1] != META:
                        continue
                    meta = json.load(tar.extractfile(info))
                    if isinstance(meta, dict) and isinstance(meta.get("kind"), str):
                        kinds.add(meta["kind"])
                    seen += 1
                    if seen >= samples_n:
                        break
        except (OSError, tarfile.TarError, ValueError):
            continue
    return kinds


def scene_clips_exist(cfg: DictConfig) -> list[str]:
    """Harmonic data fusion (``data.scene_probability`` > 0) needs scene clips; on human-only
    shards the loader would stop after thousands of draws with a traceback."""
    from datapipes.shards import expand_shard_urls

    probability = _select(cfg, "data.scene_probability")
    if not probability or not _select(cfg, "data.resample", True):
        return []
    key = "data.scene_shards" if _select(cfg, "data.scene_shards") else "data.shards"
    spec = _select(cfg, key)
    try:
        urls = expand_shard_urls(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec)
    except (FileNotFoundError, TypeError, ValueError):
        return []  # the data module reports missing or malformed shard paths by name
    kinds = peek_kinds(urls)
    if not kinds or "scene" in kinds:
        return []
    return [f"data.scene_probability={probability} asks for scene clips but the samples peeked in {key} are "
            f"all {', '.join(sorted(kinds))}: set data.scene_probability=0 (no fusion) or data.scene_shards=<scene shards>"]


def schedule_is_valid(cfg: DictConfig) -> list[str]:
    """The noise schedule (``schedule=...``) checked before a job is queued or a model built."""
    from ..diffusion import ScheduleConfig

    schedule = _select(cfg, "schedule")
    try:
        ScheduleConfig.from_mapping(OmegaConf.to_container(schedule, resolve=True) if schedule is not None else None)
    except ConfigError as error:
        return [str(error)]
    return []


def ema_is_valid(cfg: DictConfig) -> list[str]:
    """``stage.ema`` and ``samples.weights`` (xdyna/train/ema.py), checked before a model is built."""
    from .ema_config import EMAConfig, check_sample_weights

    ema = _select(cfg, "stage.ema")
    try:
        EMAConfig.from_mapping(OmegaConf.to_container(ema, resolve=True) if ema is not None else None)
        check_sample_weights(_select(cfg, "samples.weights", "ema"))
    except ConfigError as error:
        return [str(error)]
    return []


def optim_is_valid(cfg: DictConfig) -> list[str]:
    """``stage.optim`` (:class:`~xdyna.train.stage_config.OptimConfig`), checked before a model is built."""
    from .stage_config import OptimConfig

    try:
        OptimConfig.from_mapping(_plain(cfg, "stage.optim"))
    except ConfigError as error:
        return [str(error)]
    return []


def samples_are_valid(cfg: DictConfig) -> list[str]:
    """``samples`` (the sample videos of xdyna.train.callbacks.SampleVideoCallback): counts that
    make sense, checked before a model is built. ``max_samples=0`` switches the videos off."""
    minimum = {"every_n_steps": 0, "max_samples": 0, "num_inference_steps": 1}
    bad = [f"samples.{key}={value!r}: must be an integer >= {least}" for key, least in minimum.items()
           if (value := _select(cfg, f"samples.{key}", least)) is not None and not is_integer(value, least)]
    fps = _select(cfg, "samples.fps", 8)
    if not is_number(fps) or fps <= 0:
        bad.append(f"samples.fps={fps!r}: must be a number > 0")
    return bad


def compile_fits_the_engine(cfg: DictConfig) -> list[str]:
    """``model.compile`` under DeepSpeed ZeRO-3 is refused (xdyna/models/compile.py says why)."""
    from ..models.block_kinds import engine_refusal

    model = _model(cfg)
    if model is None or _select(cfg, "trainer.strategy.kind", "") not in ("deepspeed", "deepspeed_cpu"):
        return []
    line = engine_refusal(model.compile, int(_select(cfg, "trainer.strategy.zero_stage", 2)))
    return [line] if line else []


CONFIG_RULES: list[Rule] = [keys_are_schema_fields, real_weights_given, shards_given, model_is_valid, data_is_valid,
                            face_landmarks_switch_is_one, stage_trains_what_the_model_has,
                            stage_conditions_fit_the_data, schedule_is_valid, optim_is_valid, ema_is_valid,
                            samples_are_valid, compile_fits_the_engine]
LAUNCH_RULES: list[Rule] = [gpu_launcher_runs_a_gpu_job, job_has_no_unset_values]
ENVIRONMENT_RULES: list[Rule] = [accelerator_is_available, scene_clips_exist]


def violations(cfg: DictConfig, rules: list[Rule]) -> list[str]:
    return [line for rule in rules for line in rule(cfg)]


def check(cfg: DictConfig, rules: list[Rule]) -> None:
    """Raise :class:`ConfigError` with every violation of ``rules``, joined on one line."""
    found = violations(cfg, rules)
    if found:
        raise ConfigError("; ".join(found))
