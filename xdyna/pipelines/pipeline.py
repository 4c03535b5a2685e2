"""``XDynaPipeline``: reference image + driving conditions -> video, diffusers-style.

    pipe = XDynaPipeline.from_pretrained("xdyna-sd15/", device="cuda", dtype=torch.float16)
    video = pipe(reference, pose, face, seed=0)         # tensors, see __call__
    pipe.save_pretrained("copy/")

A pipeline folder holds every component (``unet/``, ``vae/``, ``pose_controlnet/``, ``image_prompt/``,
``face_controlnet/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``), the scheduler
config, the non-persistent buffers (e.g. the constant empty-prompt encoding) and ``xdyna_pipeline.json`` (format and model config),
so it loads with no other weights and no text encoder. Training checkpoints (``xdyna-train``'s
``.ckpt``, trainable weights only) load with :meth:`XDynaPipeline.from_checkpoints` on top of the
frozen base weights their model config names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from datapipes.atomic import save_safetensors, write_bytes_atomic

from ..cpu_numerics import guarded
from ..errors import ConfigError
from ..diffusion import ScheduleConfig, sampling_scheduler
from ..models import ModelConfig, XDynaModel, build_model
from ..models.flavours import get_flavour
from ..checkpoint_io import (EMA_CHECKPOINT_KEY, EXPORT_MANIFEST, EXPORT_SUBDIR, WEIGHT_CHOICES, ExportError,
                             deepspeed_model_states, export_component_files, hyper_parameters, read_checkpoint,
                             read_export_manifest)
from .context import ContextOptions
from .checks import InputError, require_file
from .sampling import denoise_latents, encode_image_prompt, initial_latents, model_has_image_prompt

log = logging.getLogger(__name__)

PIPELINE_FILE = "xdyna_pipeline.json"
PIPELINE_FORMAT = "xdyna-pipeline"
PIPELINE_VERSION = 1
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Non-persistent buffers (the empty-prompt encoding, CLIP's pixel statistics and position ids, ...)
# are not in any state dict but the model needs them; they are stored here by their full names.
BUFFERS_FILE = "buffers.safetensors"
# The UNet's spatial size must halve cleanly three times in latent space (8x VAE, 3 downsamples).
SIZE_MULTIPLE = 64
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class PipelineFormatError(InputError):
    """A pipeline folder or checkpoint that does not hold what it should."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise InputError("fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return dtype


@dataclass
class Animation:
    """A generated video: ``frames uint8 (F, H, W, 3)`` (or ``(B, F, H, W, 3)`` for a batch)."""

    frames: np.ndarray
    fps: float | None
    guidance_applied: bool
    seed: int | None


def _state_dict_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}


def _describe(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" ... (+{len(keys) - 4})" if len(keys) > 4 else "")


def checkpoint_file(path: str | Path) -> Path:
    """``path`` checked as an ``xdyna-train`` checkpoint (a ``.ckpt`` file or a DeepSpeed checkpoint
    folder), before anything reads it. A pipeline or export folder is refused with the reason: it
    loads as pretrained."""
    file = Path(path).expanduser()
    if file.is_dir():
        if (file / PIPELINE_FILE).exists() or (file / EXPORT_MANIFEST).exists():
            raise InputError(f"checkpoint {str(file)!r} is a pipeline or export folder: load it as pretrained, not as a checkpoint")
        if not deepspeed_model_states(file):
            raise InputError(f"checkpoint {str(file)!r} is a folder without DeepSpeed model states "
                             "(checkpoint/*model_states.pt): give a .ckpt file or a DeepSpeed checkpoint folder")
        return file
    return require_file(file, "checkpoint")


def read_training_checkpoint(path: str | Path, weights: str = "raw") -> tuple[dict[str, torch.Tensor], dict | None, ScheduleConfig]:
    """``(model weights, model config or None, noise schedule)`` of an ``xdyna-train`` checkpoint,
    read by :func:`xdyna.checkpoint_io.read_checkpoint` (weights-only: a checkpoint never runs code
    on load). A checkpoint that records no schedule (written before schedules were configurable)
    was trained with the default one. ``weights``: "raw", "ema" (the checkpoint's EMA of the
    trainable weights, :mod:`xdyna.train.ema`) or "default" (the EMA when it has one).

    Weight names are those of :class:`XDynaModel` (the LightningModule's ``model.`` prefix is removed).
    """
    file = checkpoint_file(path)
    try:
        raw, meta = read_checkpoint(file)
    except ExportError as error:
        raise PipelineFormatError(str(error)) from None
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"weights={weights!r}: expected one of {list(WEIGHT_CHOICES)}")
    ema = (meta.get(EMA_CHECKPOINT_KEY) or {}).get("weights")
    if weights == "ema" and ema is None:
        raise PipelineFormatError(f"checkpoint {str(file)!r} holds no EMA weights (its stage kept no EMA, or it had "
                                  "not started): use the raw weights")
    chosen = ema if weights in ("ema", "default") and ema is not None else raw
    model_weights = {name.removeprefix("model."): tensor.float() for name, tensor in chosen.items()}
    hyper = hyper_parameters(meta)
    model = hyper.get("model")
    return model_weights, dict(model) if isinstance(model, Mapping) else None, _recorded_schedule(hyper.get("schedule"), file)


def _recorded_schedule(recorded: Any, source: Path) -> ScheduleConfig:
    try:
        return ScheduleConfig.from_mapping(recorded)
    except (ConfigError, TypeError) as error:
        raise PipelineFormatError(f"{str(source)!r} records an unreadable noise schedule ({error})") from None


def export_schedule(folder: str | Path) -> ScheduleConfig:
    """The noise schedule an export (or a run directory's export) was trained with; an export
    that records none (written before schedules were configurable) has the default."""
    kind, export_dir = weights_folder(folder)
    if kind != "export":
        raise PipelineFormatError(f"{str(folder)!r} is a pipeline folder, not an export: load it with from_pretrained")
    try:
        manifest = read_export_manifest(export_dir)
    except ExportError as error:
        raise PipelineFormatError(str(error)) from None
    return _recorded_schedule(manifest.get("schedule"), export_dir / EXPORT_MANIFEST)


def weights_folder(folder: str | Path) -> tuple[str, Path]:
    """What ``folder`` holds: ``("pipeline", folder)`` (written by :meth:`XDynaPipeline.save_pretrained`)
    or ``("export", export folder)`` (written by ``xdyna-export`` or at the end of a training stage;
    a run directory stands for its ``export/``). Anything else is an error saying what was expected."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise PipelineFormatError(f"pretrained pipeline {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise PipelineFormatError(
            f"pretrained pipeline {str(folder)!r} is a file, expected a folder written by save_pretrained or xdyna-export "
            "(a training .ckpt loads as a checkpoint)"
        )
    if (folder / PIPELINE_FILE).is_file():
        return "pipeline", folder
    if (folder / EXPORT_MANIFEST).is_file():
        return "export", folder
    if (folder / EXPORT_SUBDIR / EXPORT_MANIFEST).is_file():
        return "export", folder / EXPORT_SUBDIR
    if (folder / "checkpoints").is_dir():
        raise PipelineFormatError(
            f"run directory {str(folder)!r} holds no {EXPORT_SUBDIR}/{EXPORT_MANIFEST} (no stage finished with an export): "
            f"make one with xdyna-export {folder}/checkpoints/latest {folder}/{EXPORT_SUBDIR}"
        )
    raise PipelineFormatError(
        f"pretrained pipeline {str(folder)!r} lacks {PIPELINE_FILE} (save_pretrained) and {EXPORT_MANIFEST} (xdyna-export): "
        "give a pipeline folder, an export folder or a run directory"
    )


def export_model_config(folder: str | Path, config: ModelConfig | Mapping[str, Any] | None = None,
                        sd15: str | Path | None = None, weights: str = "default") -> dict[str, Any]:
    """The model config that rebuilds an export's model: ``config`` or the one the export records,
    ``sd15`` as its SD1.5 folder when given, the export's components applied after any the config
    already lists (an earlier stage's). Every file it names is checked here, before anything is
    built; the error names the config key and what to pass instead. ``weights``: which of the
    export's files ("default": the EMA when it has one, else raw; "ema"; "raw")."""
    kind, export_dir = weights_folder(folder)
    if kind != "export":
        raise PipelineFormatError(f"{str(folder)!r} is a pipeline folder, not an export: load it with from_pretrained")
    try:
        manifest = read_export_manifest(export_dir)
        own = export_component_files(export_dir, weights=weights)
    except ExportError as error:
        raise PipelineFormatError(str(error)) from None
    recorded = manifest.get("model")
    if config is None and not isinstance(recorded, Mapping):
        raise PipelineFormatError(f"{str(export_dir / EXPORT_MANIFEST)!r} is unreadable (model is {type(recorded).__name__}, "
                                  "expected a model config mapping); re-export with xdyna-export")
    if isinstance(config, ModelConfig):
        config = asdict(config)
    mapping = json.loads(json.dumps(config if config is not None else recorded))  # a deep, plain copy
    pretrained = dict(mapping.get("pretrained") or {})
    if sd15 is not None:
        sd15_folder = Path(sd15).expanduser()
        if not sd15_folder.is_dir():
            raise InputError(f"SD1.5 folder {str(sd15_folder)!r} does not exist or is not a folder (diffusers layout: unet/, vae/, ...)")
        pretrained["sd15"] = str(sd15_folder)
    pretrained["components"] = {**(pretrained.get("components") or {}), **own}
    for name, path in pretrained["components"].items():
        if not Path(path).expanduser().is_file():
            where = "this export" if name in own else f"the earlier stage the export records (model.pretrained.components.{name})"
            raise PipelineFormatError(f"{name} weights {path!r} of {where} do not exist")
    for key, path in pretrained.items():
        if key != "components" and path is not None and not Path(str(path)).expanduser().exists():
            hint = ("pass the local SD1.5 folder as sd15 (xdyna-animate --sd15 DIR)" if key == "sd15"
                    else "give a model config with local paths (xdyna-animate --model YAML)")
            raise PipelineFormatError(f"export {str(export_dir)!r} records model.pretrained.{key}={str(path)!r}, "
                                      f"which does not exist here: {hint}")
    mapping["pretrained"] = pretrained
    flavour = mapping.get("flavour", "tiny")
    if flavour != "tiny" and not (pretrained.get("sd15") or pretrained.get("xdyna_unet")):
        raise PipelineFormatError(f"export {str(export_dir)!r} ({flavour} model) records no frozen SD1.5 weights "
                                  "(model.pretrained.sd15): pass sd15 (xdyna-animate --sd15 DIR)")
    return mapping


class XDynaPipeline:
    """Inference for one :class:`XDynaModel`; see the module docstring."""

    def __init__(self, model: XDynaModel, scheduler: DDIMScheduler | None = None):
        self.model = model.eval()
        self.scheduler = scheduler if scheduler is not None else sampling_scheduler()

    # ------------------------------------------------------------------ properties
    @property
    def schedule(self) -> ScheduleConfig:
        """The noise schedule sampling runs (that of the weights' training)."""
        return ScheduleConfig.from_scheduler(self.scheduler)

    @property
    def device(self) -> torch.device:
        return self.model.prompt_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.unet.dtype

    @property
    def default_size(self) -> tuple[int, int]:
        flavour = get_flavour(self.model.config.flavour)
        return flavour.default_height, flavour.default_width

    @property
    def has_face_controlnet(self) -> bool:
        return self.model.face_controlnet is not None

    @property
    def face_landmarks_in_pose(self) -> bool:
        """A w/lmk model: it was trained on pose images carrying the face landmarks, so its pose
        input must carry them too (``prepare_driving(..., face_landmarks_in_pose=True)``)."""
        return self.model.config.face == "landmarks_in_pose"

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "XDynaPipeline":
        device = device if device is not None else self.device
        if dtype is not None:
            self.model.to(device=device, dtype=resolve_dtype(dtype, device))
        else:
            self.model.to(device=device)
        return self

    def components(self) -> dict[str, torch.nn.Module]:
        """Every sub-network of the model (UNet, VAE, ControlNets, image prompt, ReferenceNet,
        whichever this model config has), each saved in its own folder."""
        return dict(self.model.named_children())

    # ------------------------------------------------------------------ building and loading
    @classmethod
    def from_config(cls, config: ModelConfig | Mapping[str, Any], device="cpu", dtype="fp32",
                    schedule: ScheduleConfig | Mapping[str, Any] | None = None) -> "XDynaPipeline":
        """Build from a model config: base weights from its local folders, the rest initialised
        as at the start of training (random for the ``tiny`` flavour without folders).
        ``schedule``: the noise schedule to sample with (``None``: the default)."""
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_mapping(config)
        # Inference never back-propagates: recomputation would only cost time.
        config = replace(config, gradient_checkpointing=False)
        return cls(build_model(config), sampling_scheduler(ScheduleConfig.from_mapping(schedule))).to(device, dtype)

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Sequence[str | Path],
        config: ModelConfig | Mapping[str, Any] | None = None,
        device="cpu",
        dtype="fp32",
        weights: str = "default",
    ) -> "XDynaPipeline":
        """Base model from ``config`` (default: the first checkpoint's own model config), then the
        weights of every checkpoint in order (e.g. stage 1, then stage 2's S-Face ControlNet).
        Sampling uses the noise schedule the checkpoints record; they must agree on it.
        ``weights``: "default" (each checkpoint's EMA when it keeps one, else its raw weights),
        "ema" or "raw"."""
        if not checkpoints:
            raise InputError("from_checkpoints needs at least one checkpoint")
        loaded = [(Path(path), *read_training_checkpoint(path, weights)) for path in checkpoints]
        if config is None:
            config = loaded[0][2]
            if config is None:
                raise PipelineFormatError(f"checkpoint {str(loaded[0][0])!r} carries no model config: give the model config")
        schedule = loaded[0][3]
        for path, _, _, other in loaded[1:]:
            if other != schedule:
                raise PipelineFormatError(f"checkpoint {str(path)!r} was trained with another noise schedule than "
                                          f"{str(loaded[0][0])!r} ({other} vs {schedule}): one model samples with one schedule")
        pipeline = cls.from_config(config, device="cpu", dtype="fp32", schedule=schedule)
        for path, weights, _, _ in loaded:
            pipeline.load_weights(weights, source=str(path))
        return pipeline.to(device, dtype)

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        config: ModelConfig | Mapping[str, Any] | None = None,
        sd15: str | Path | None = None,
        device="cpu",
        dtype="fp32",
        weights: str = "default",
    ) -> "XDynaPipeline":
        """An ``xdyna-export`` folder (what a finished training stage writes to ``<run>/export``;
        a run directory is accepted for it): the model config it records (or ``config``), the
        frozen base weights from the folders that config names (``sd15`` replaces the SD1.5
        folder, e.g. on another machine), the exported components applied last; sampling uses the
        noise schedule the export records. ``weights``: "default" (the export's EMA when it has
        one, else the raw weights), "ema" or "raw"."""
        mapping = export_model_config(folder, config, sd15, weights)
        return cls.from_config(mapping, device=device, dtype=dtype, schedule=export_schedule(folder))

    def load_weights(self, weights: Mapping[str, torch.Tensor], source: str = "<weights>") -> list[str]:
        """Copy ``weights`` (names of :class:`XDynaModel`, any subset) into the model; every name
        must exist with the same shape. Returns the components they touched."""
        own = self.model.state_dict()
        unknown = [name for name in weights if name not in own]
        mismatched = [name for name in weights if name in own and own[name].shape != weights[name].shape]
        if unknown or mismatched:
            problems = []
            if unknown:
                problems.append(f"{len(unknown)} unknown weight(s): {_describe(unknown)}")
            if mismatched:
                problems.append(f"{len(mismatched)} shape mismatch(es): {_describe(mismatched)}")
            raise PipelineFormatError(f"{source} does not fit this model ({self.model.config.flavour}): " + "; ".join(problems))
        if not weights:
            raise PipelineFormatError(f"{source} holds no weights")
        self.model.load_state_dict(dict(weights), strict=False)
        names = set(weights)
        touched = [component for component, params in self.model.component_parameters().items() if any(n in names for n, _ in params)]
        log.info("loaded %d tensors from %s (%s)", len(weights), source, ", ".join(touched) or "frozen weights only")
        return touched

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write every component, the scheduler and the model config to ``folder``."""
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"save_pretrained: {str(folder)!r} is a file, expected a folder")
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.components().items():
            (folder / name).mkdir(exist_ok=True)
            if hasattr(module, "save_config"):  # diffusers models; the image prompt is configured by the model config
                module.save_config(folder / name)
            save_safetensors(_state_dict_of(module), folder / name / WEIGHTS_FILE)
        persistent = set(self.model.state_dict())
        extra = {name: buffer.detach().contiguous().cpu() for name, buffer in self.model.named_buffers() if name not in persistent}
        save_safetensors(extra, folder / BUFFERS_FILE)
        self.scheduler.save_pretrained(folder / "scheduler")
        config = asdict(self.model.config)
        # Base-weight folders are baked into the saved components: the copy stands alone.
        config["pretrained"] = {key: None for key in config["pretrained"]}
        manifest = {"format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "model_config": config,
                    "components": sorted(self.components())}
        write_bytes_atomic(folder / PIPELINE_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype="fp32") -> "XDynaPipeline":
        """Load a folder written by :meth:`save_pretrained`; every component must be present
        and match the recorded architecture exactly. An export folder or a run directory (see
        :func:`weights_folder`) loads with :meth:`from_export`."""
        kind, folder = weights_folder(folder)
        if kind == "export":
            return cls.from_export(folder, device=device, dtype=dtype)
        manifest_file = folder / PIPELINE_FILE
        try:
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("format") != PIPELINE_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r} is not {PIPELINE_FORMAT!r}")
            if manifest.get("version") != PIPELINE_VERSION:
                raise ValueError(f"version {manifest.get('version')!r}, this code reads {PIPELINE_VERSION}")
            config = ModelConfig.from_mapping(manifest["model_config"])
        except (ValueError, KeyError, TypeError) as error:
            raise PipelineFormatError(f"{str(manifest_file)!r} is unreadable ({error})") from None
        # The architecture comes from the config, the weights from the files: build without memory.
        model = build_model(replace(config, gradient_checkpointing=False), device="meta")
        pipeline = cls(model)
        expected = set(pipeline.components())
        if set(manifest.get("components", [])) != expected:
            raise PipelineFormatError(f"{str(manifest_file)!r} lists components {manifest.get('components')}, the model config needs {sorted(expected)}")
        for name, module in pipeline.components().items():
            weights_file = folder / name / WEIGHTS_FILE
            if not weights_file.is_file():
                raise PipelineFormatError(f"pretrained pipeline {str(folder)!r} lacks {name}/{WEIGHTS_FILE}")
            state = load_file(weights_file)
            own = module.state_dict()
            missing, unknown = set(own) - set(state), set(state) - set(own)
            mismatched = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
            if missing or unknown or mismatched:
                raise PipelineFormatError(
                    f"{str(weights_file)!r} does not match the {name} of a {config.flavour} model: "
                    f"missing {_describe(missing) or '-'}; unknown {_describe(unknown) or '-'}; shape mismatch {_describe(mismatched) or '-'}"
                )
            module.load_state_dict(state, strict=True, assign=True)
        buffers_file = folder / BUFFERS_FILE
        if not buffers_file.is_file():
            raise PipelineFormatError(f"pretrained pipeline {str(folder)!r} lacks {BUFFERS_FILE}")
        for name, tensor in load_file(buffers_file).items():
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if attribute not in module._buffers:
                raise PipelineFormatError(f"{str(buffers_file)!r}: {name} is not a buffer of a {config.flavour} model")
            module._buffers[attribute] = tensor
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise PipelineFormatError(f"pretrained pipeline {str(folder)!r} left tensors unloaded: {_describe(leftover)}")
        scheduler_folder = folder / "scheduler"
        if scheduler_folder.is_dir():
            pipeline.scheduler = DDIMScheduler.from_pretrained(scheduler_folder)
        return pipeline.to(device, dtype)

    # ------------------------------------------------------------------ generation
    def _check_inputs(self, reference: torch.Tensor, pose: torch.Tensor, face: torch.Tensor | None) -> None:
        if reference.ndim != 4 or reference.shape[1] != 3:
            raise InputError(f"reference must be (3, H, W) or (B, 3, H, W), got {tuple(reference.shape)}")
        if pose.ndim != 5 or pose.shape[2] != 3:
            raise InputError(f"pose must be (F, 3, H, W) or (B, F, 3, H, W), got {tuple(pose.shape)}")
        height, width = reference.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise InputError(f"output size {height}x{width} must be a multiple of {SIZE_MULTIPLE} in both height and width")
        if pose.shape[0] != reference.shape[0] or tuple(pose.shape[-2:]) != (height, width):
            raise InputError(f"pose {tuple(pose.shape)} does not match reference {tuple(reference.shape)} in batch or size")
        if pose.shape[1] < 1:
            raise InputError("pose has no frames")
        if float(pose.min()) < -1e-3 or float(pose.max()) > 1 + 1e-3:
            raise InputError("pose values must be in [0, 1] (rendered skeleton / 255)")
        if face is not None:
            if self.model.face_controlnet is None:
                raise InputError("face maps given but this model has no S-Face ControlNet (model.face=none)")
            if face.shape[:2] != pose.shape[:2] or face.shape[2] != 6 or face.shape[-2:] != pose.shape[-2:]:
                raise InputError(f"face maps {tuple(face.shape)} must be (F, 6, H, W) matching pose {tuple(pose.shape)}")

    @guarded  # bf16 on the CPU runs without oneDNN's broken AMX kernel (xdyna.cpu_numerics)
    @torch.no_grad()
    def __call__(
        self,
        reference: torch.Tensor,
        pose: torch.Tensor,
        face: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        context: ContextOptions | None = ContextOptions(),
        initial_latent: str = "frame_similarity",
        share_reference_features: bool = True,
        decode_chunk: int = 16,
        fps: float | None = None,
        pose_scale: float | None = None,
        face_scale: float | None = None,
        progress: bool = False,
    ) -> Animation:
        """Animate ``reference (3, H, W)`` in [-1, 1] with ``pose (F, 3, H, W)`` and optional S-Face
        ``face (F, 6, H, W)`` maps in [0, 1] (a leading batch dimension is accepted on all three).

        ``seed`` (or a ``generator``) makes the video reproducible; guidance applies to the image
        prompt and only when the model has one. ``pose_scale``/``face_scale`` override the
        ControlNet scales of the model config for this call. Returns uint8 frames decoded
        ``decode_chunk`` frames at a time.
        """
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        unbatched = reference.ndim == 3
        if unbatched:
            reference, pose = reference.unsqueeze(0), pose.unsqueeze(0)
            face = face.unsqueeze(0) if face is not None else None
        self._check_inputs(reference, pose, face)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        device, dtype = self.device, self.dtype
        reference = reference.to(device, dtype)
        pose = pose.to(device, dtype)
        face = face.to(device, dtype) if face is not None else None

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        reference_latents = self.model.encode_images(reference, sample_posterior=False)
        image_prompt = encode_image_prompt(self.model, reference)
        guided = image_prompt is not None and guidance_scale != 1.0
        if guidance_scale != 1.0 and image_prompt is None:
            log.info("guidance %.2g not applied: the model has no image prompt to guide on", guidance_scale)
        if initial_latent == "frame_similarity" and float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]) == 0.0:
            log.info("frame-similarity prior carries no signal here: this model's schedule has zero terminal SNR, so "
                     "its first timestep is pure noise (as in its training)")
        latents = initial_latents(initial_latent, reference_latents, pose.shape[1], scheduler, generator)
        config = self.model.config
        saved_scales = config.pose_conditioning_scale, config.face_conditioning_scale
        try:
            if pose_scale is not None:
                config.pose_conditioning_scale = pose_scale
            if face_scale is not None:
                config.face_conditioning_scale = face_scale
            latents = denoise_latents(
                self.model, latents, reference_latents, scheduler, pose=pose, face=face, image_prompt=image_prompt,
                guidance_scale=guidance_scale, context=context, eta=eta, generator=generator,
                share_reference_features=share_reference_features, progress=progress,
            )
        finally:
            config.pose_conditioning_scale, config.face_conditioning_scale = saved_scales
        frames = decode_to_uint8(self.model, latents, decode_chunk)
        return Animation(frames=frames[0] if unbatched else frames, fps=fps, guidance_applied=guided, seed=seed)


def decode_to_uint8(model: XDynaModel, latents: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """Latents ``(B, F, 4, h, w)`` -> ``uint8 (B, F, H, W, 3)`` on the CPU, ``chunk`` frames per
    VAE call, so a long video never sits on the device in float32 pixels."""
    if chunk < 1:
        raise InputError(f"decode chunk must be >= 1, got {chunk}")
    parts = []
    for first in range(0, latents.shape[1], chunk):
        video = model.decode_latents(latents[:, first : first + chunk].to(model.vae.dtype))
        pixels = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        parts.append(pixels.permute(0, 1, 3, 4, 2).cpu())
    return torch.cat(parts, dim=1).numpy()
