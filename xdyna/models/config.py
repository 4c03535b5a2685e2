"""Model configuration: what the `model` config group of Hydra maps onto."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..errors import ConfigError
# Both are names and rules only (no torch): the config checks of xdyna-train and xdyna-launch
# validate a model config before anything heavy is imported.
from .block_kinds import resolve_compile, resolve_policy
from .reference_variants import VARIANTS, ReferenceVariant, reference_variant

# How the reference image enters the network (the paper's Table 4, plus kv_concat): one class per
# variant in reference_variants.py, which holds every rule that depends on it.
# How the face expression enters: the 6-channel S-Face ControlNet, landmarks drawn into the pose
# skeleton (no face network; the data draws them), or not at all.
FACE_VARIANTS = ("sface", "landmarks_in_pose", "none")
ATTENTION_BACKENDS = ("sdpa", "xformers")
# GroupNorm statistics: computed per frame, or across the frames of a sample (AnimateDiff v1 and
# the X-Dyna release normalise the UNet's ResNets over all frames; diffusers' motion modules
# normalise over all frames while the original AnimateDiff code normalises them per frame).
GROUPNORM_STATISTICS = ("per_frame", "across_frames")
# ``auto`` (the default of both modes) resolves in ModelConfig, the one place that decides: the
# release's modes when a released X-Dyna UNet is loaded into the Dynamics-Adapter model (its
# checkpoints reproduce the release only with them, and no other variant can take that file),
# else ours, whose per-frame ResNet statistics let the reference features be computed once per
# denoising step and shared by every context window.
AUTO = "auto"
RELEASE_GROUPNORM = {"resnet_groupnorm": "across_frames", "motion_groupnorm": "per_frame"}
DEFAULT_GROUPNORM = {"resnet_groupnorm": "per_frame", "motion_groupnorm": "across_frames"}
# How the reference becomes the image encoder's square input: ``center_crop`` is what the X-Dyna
# release feeds it (CLIPImageProcessor() with its defaults: shortest side to the encoder's size,
# PIL bicubic, centre crop); ``squash`` resizes the whole image to the square (keeps the top and
# bottom of a portrait reference, distorts it).
IMAGE_PROMPT_RESIZE = ("center_crop", "squash")
# Trainable components; set_trainable takes these names, exports write one file per component:
# those of the reference variants (reference_variants.py), then those every variant shares.
# Here, not in xdyna_model.py (which re-exports them), so the config rules name them without torch.
SHARED_COMPONENTS = ("motion_modules", "pose_controlnet", "face_controlnet", "image_prompt")
COMPONENTS = (*dict.fromkeys(name for variant in VARIANTS.values() for name in variant.components), *SHARED_COMPONENTS)


@dataclass
class PretrainedPaths:
    """Local folders/files of real weights. ``None`` means random init (tiny flavour, tests).

    Nothing is ever downloaded: every path is given by the user, and a missing one is an error.
    Later entries are applied after earlier ones (the X-Dyna checkpoints and our own component
    files override what the base folders gave).
    """

    sd15: str | None = None  # diffusers-format SD1.5 folder: unet/, vae/, text_encoder/, tokenizer/
    vae: str | None = None  # diffusers AutoencoderKL folder replacing sd15/vae (e.g. sd-vae-ft-mse)
    motion_adapter: str | None = None  # diffusers MotionAdapter folder
    motion_module: str | None = None  # original AnimateDiff motion-module file (mm_sd_v15.ckpt, .safetensors)
    pose_controlnet: str | None = None  # diffusers ControlNet folder (e.g. SD1.5 openpose)
    face_controlnet: str | None = None  # diffusers ControlNet folder (6-channel S-Face)
    image_encoder: str | None = None  # diffusers/transformers CLIPVisionModelWithProjection folder (ViT-H/14)
    ip_adapter: str | None = None  # original IP-Adapter-plus file (ip-adapter-plus_sd15.bin / .safetensors)
    xdyna_unet: str | None = None  # released X-Dyna UNet pickle (SD UNet + motion + adapter [+ IP])
    xdyna_pose_controlnet: str | None = None  # released X-Dyna pose ControlNet pickle
    xdyna_face_controlnet: str | None = None  # released X-Dyna S-Face ControlNet pickle
    components: dict[str, str] | None = None  # {component: our exported .safetensors}, applied last


@dataclass
class ModelConfig:
    flavour: str = "tiny"
    pretrained: PretrainedPaths = field(default_factory=PretrainedPaths)
    reference: str = "dynamics_adapter"
    face: str = "sface"
    image_prompt: bool = False  # IP-Adapter-plus tokens in every cross-attention (X-Dyna: on)
    image_prompt_scale: float = 1.0
    image_prompt_dropout: float = 0.05  # P(blank image prompt) per training sample, for CFG
    image_prompt_resize: str = "center_crop"  # see IMAGE_PROMPT_RESIZE
    resnet_groupnorm: str = AUTO  # auto, per_frame or across_frames (AnimateDiff v1 / X-Dyna release)
    motion_groupnorm: str = AUTO  # auto, across_frames (diffusers' layout) or per_frame (original AnimateDiff)
    # Groups of the motion modules' GroupNorm; None: the MotionAdapter folder's
    # motion_norm_num_groups, else the flavour's (32 at sd15, as AnimateDiff and the release).
    motion_norm_groups: int | None = None
    attention_backend: str = "sdpa"
    max_attention_batch: int = 65535
    gradient_checkpointing: bool = False
    # Which blocks recompute their activations in backward (activation_checkpointing.py): a policy
    # (none, diffusers, unet, all) or a list of block kinds; null: gradient_checkpointing decides.
    activation_checkpointing: Any = None
    # Which blocks run under torch.compile (compile.py): none, unet, all or a list of block kinds (null: none).
    compile: Any = None
    pose_conditioning_scale: float = 1.0
    face_conditioning_scale: float = 1.0
    vae_chunk_size: int = 16  # frames per VAE encode/decode call, bounds activation memory
    init_seed: int = 0  # seeds random init of every module not loaded from a file

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        values = dict(values)
        # A Hydra defaults list is composition metadata (present when a model file is read with
        # OmegaConf.load instead of composed), not a model setting.
        values.pop("defaults", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        pretrained = values.pop("pretrained", None) or {}
        pretrained_known = {f.name for f in fields(PretrainedPaths)}
        unknown = sorted(set(pretrained) - pretrained_known)
        if unknown:
            raise ConfigError(f"model.pretrained: unknown key(s) {unknown}; known: {sorted(pretrained_known)}")
        config = cls(pretrained=PretrainedPaths(**pretrained), **values)
        config.validate()
        return config

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, Mapping):
            self.pretrained = PretrainedPaths(**self.pretrained)
        self.resolve_groupnorm()

    @property
    def loads_release_unet(self) -> bool:
        """Whether a released X-Dyna UNet is loaded into the model it was made for."""
        # Looked up leniently: this runs on construction, before validate() names a bad variant.
        variant = VARIANTS.get(self.reference) if isinstance(self.reference, str) else None
        return self.pretrained.xdyna_unet is not None and variant is not None and variant.takes_release_unet

    def resolve_groupnorm(self) -> None:
        """Replace ``auto`` GroupNorm modes by concrete ones (see ``AUTO``); concrete modes, set by
        the user or resolved before, stay as they are. Runs on construction, so ``asdict`` (what
        exports and pipeline folders record) always holds the modes the model was built with."""
        modes = RELEASE_GROUPNORM if self.loads_release_unet else DEFAULT_GROUPNORM
        for key, mode in modes.items():
            if getattr(self, key) in (AUTO, None):  # null reads as auto
                setattr(self, key, mode)

    def groupnorm_modes(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in RELEASE_GROUPNORM}

    def release_groupnorm_differences(self) -> list[str]:
        """``key=ours (release: theirs)`` for each GroupNorm mode that keeps a loaded released
        X-Dyna UNet from reproducing the release (empty when none is loaded, or the modes agree)."""
        if not self.loads_release_unet:
            return []
        return [f"model.{key}={getattr(self, key)} (release: {mode})" for key, mode in RELEASE_GROUPNORM.items()
                if getattr(self, key) != mode]

    @property
    def reference_variant(self) -> ReferenceVariant:
        """The registered variant of ``reference`` (a one-line ConfigError for an unknown name)."""
        return reference_variant(self.reference)

    @property
    def reference_component(self) -> str | None:
        """The trainable component that carries the reference image in this variant (None: the
        variant's reference path has no trainable weights)."""
        return self.reference_variant.reference_component

    def components(self) -> tuple[str, ...]:
        """The trainable components a model of this config has (xdyna_model.COMPONENTS order): its
        reference variant's own, and the shared ones it does not switch off. What the config rules
        check a stage's trainable set against before any model is built."""
        switched = {"face_controlnet": self.face == "sface", "image_prompt": bool(self.image_prompt)}
        own = self.reference_variant.components
        return tuple(name for name in COMPONENTS
                     if name in own or (name in SHARED_COMPONENTS and switched.get(name, True)))

    def validate(self) -> None:
        self.resolve_groupnorm()  # a mode set to auto after construction
        resolve_policy(self.activation_checkpointing, self.gradient_checkpointing)  # one line naming a bad kind
        resolve_compile(self.compile)

        def choose(key: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ConfigError(f"model.{key}={value!r}; choose one of {options}")

        variant = self.reference_variant
        choose("face", self.face, FACE_VARIANTS)
        choose("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        choose("resnet_groupnorm", self.resnet_groupnorm, (AUTO, *GROUPNORM_STATISTICS))
        choose("motion_groupnorm", self.motion_groupnorm, (AUTO, *GROUPNORM_STATISTICS))
        choose("image_prompt_resize", self.image_prompt_resize, IMAGE_PROMPT_RESIZE)
        if self.motion_norm_groups is not None and (isinstance(self.motion_norm_groups, bool) or not isinstance(self.motion_norm_groups, int)
                                                    or self.motion_norm_groups < 1):
            raise ConfigError(f"model.motion_norm_groups={self.motion_norm_groups!r}; expected a positive integer or null")
        if not 0.0 <= self.image_prompt_dropout < 1.0:
            raise ConfigError(f"model.image_prompt_dropout={self.image_prompt_dropout}; expected a probability in [0, 1)")
        paths = self.pretrained
        if paths.motion_adapter is not None and paths.motion_module is not None:
            raise ConfigError("model.pretrained: give motion_adapter (diffusers folder) or motion_module (original file), not both")
        if paths.ip_adapter is not None and not self.image_prompt:
            raise ConfigError("model.pretrained.ip_adapter is set but model.image_prompt=false")
        if paths.xdyna_face_controlnet is not None and self.face != "sface":
            raise ConfigError(f"model.pretrained.xdyna_face_controlnet is set but model.face={self.face!r} has no S-Face ControlNet")
        variant.validate(self)
