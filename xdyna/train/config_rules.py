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

from ..errors import ConfigError

Rule = Callable[[DictConfig], "list[str]"]


def _select(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


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


CONFIG_RULES: list[Rule] = [shards_given, face_landmarks_switch_is_one, schedule_is_valid, ema_is_valid]
LAUNCH_RULES: list[Rule] = [gpu_launcher_runs_a_gpu_job, job_has_no_unset_values]
ENVIRONMENT_RULES: list[Rule] = [accelerator_is_available, scene_clips_exist]


def violations(cfg: DictConfig, rules: list[Rule]) -> list[str]:
    return [line for rule in rules for line in rule(cfg)]


def check(cfg: DictConfig, rules: list[Rule]) -> None:
    """Raise :class:`ConfigError` with every violation of ``rules``, joined on one line."""
    found = violations(cfg, rules)
    if found:
        raise ConfigError("; ".join(found))
