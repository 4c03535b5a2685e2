"""The X-Dyna network: frozen SD1.5 UNet + motion modules + a reference path (Dynamics-Adapter,
ReferenceNet or image prompt only) + pose/S-Face ControlNets + optional IP-Adapter-plus image prompt."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import ConfigError
from .attention import (
    ChunkedAttentionProcessor,
    DynamicsAdapterProcessor,
    ImagePromptProcessor,
    ReferenceConcatProcessor,
    ReferenceFeatures,
    ReferenceRecorderProcessor,
)
from .config import ModelConfig
from .flavours import Flavour, get_flavour
from .image_prompt import ImagePrompt, build_image_prompt
from .loading import (
    LoadReport,
    convert_animatediff_motion,
    convert_ip_adapter,
    convert_xdyna_unet,
    load_component_safetensors,
    load_mapped,
    module_tensors,
    ordered_attention_layers,
    read_state_dict,
    require_folder,
)
from .motion import FrameLayout, install_frame_layout, LayoutPreservingCheckpoint, set_motion_norm_groups, zero_init_motion_outputs

log = logging.getLogger(__name__)

# Trainable components; set_trainable takes these names, exports write one file per component.
COMPONENTS = ("dynamics_adapter", "motion_modules", "pose_controlnet", "face_controlnet", "image_prompt", "reference_net")
# Frozen parts, reported by xdyna-info beside the components.
FROZEN_PARTS = ("unet", "vae", "image_encoder")


class XDynaModel(nn.Module):
    """Pure ``nn.Module``; training, inference and export all go through these methods."""

    def __init__(
        self,
        config: ModelConfig,
        unet: UNetMotionModel,
        vae: AutoencoderKL,
        pose_controlnet: ControlNetModel,
        face_controlnet: ControlNetModel | None,
        prompt_embeds: torch.Tensor,
        frame_layout: FrameLayout,
        image_prompt: ImagePrompt | None = None,
        reference_net: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.pose_controlnet = pose_controlnet
        self.face_controlnet = face_controlnet
        self.image_prompt = image_prompt
        self.reference_net = reference_net
        # The text prompt is empty in X-Dyna: its CLIP encoding is a constant, computed once at
        # build time (not persistent: it is a function of the frozen text encoder, not a weight).
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.frame_layout = frame_layout
        self.load_reports: list[LoadReport] = []

    # ------------------------------------------------------------------ parameters
    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def caches_reference(self) -> bool:
        """Whether reference features from :meth:`encode_reference` can be reused across calls.

        False with ``resnet_groupnorm=across_frames`` and the Dynamics-Adapter: the reference frame
        then shares GroupNorm statistics with the clip it is denoised with (AnimateDiff v1 / the
        X-Dyna release), so only the one-pass formulation is exact; :meth:`denoise` runs it.
        """
        return not (self.config.reference == "dynamics_adapter" and self.config.resnet_groupnorm == "across_frames")

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of every trainable component and every frozen part (disjoint, covering the model)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in (*COMPONENTS, *FROZEN_PARTS)}
        for name, param in self.unet.named_parameters(prefix="unet"):
            if ".motion_modules." in name:
                groups["motion_modules"].append((name, param))
            elif ".attn1.processor." in name:
                groups["dynamics_adapter"].append((name, param))
            elif ".attn2.processor." in name:
                groups["image_prompt"].append((name, param))
            else:
                groups["unet"].append((name, param))
        groups["vae"] = list(self.vae.named_parameters(prefix="vae"))
        groups["pose_controlnet"] = list(self.pose_controlnet.named_parameters(prefix="pose_controlnet"))
        if self.face_controlnet is not None:
            groups["face_controlnet"] = list(self.face_controlnet.named_parameters(prefix="face_controlnet"))
        if self.image_prompt is not None:
            groups["image_prompt"] += list(self.image_prompt.resampler.named_parameters(prefix="image_prompt.resampler"))
            groups["image_encoder"] = list(self.image_prompt.image_encoder.named_parameters(prefix="image_prompt.image_encoder"))
        if self.reference_net is not None:
            unused = reference_net_unused_prefixes(self.reference_net)
            for name, param in self.reference_net.named_parameters():
                # Weights after the last recorded layer never influence the output: they stay
                # frozen (and out of DDP's reduction, which would otherwise wait for them).
                if not name.startswith(unused):
                    groups["reference_net"].append((f"reference_net.{name}", param))
        return groups

    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of each trainable component (empty list when the component is off)."""
        groups = self.parameter_groups()
        return {name: groups[name] for name in COMPONENTS}

    def set_trainable(self, components: list[str] | tuple[str, ...]) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze ``components``; returns the trainable parameters."""
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"unknown trainable component(s) {unknown}; known: {list(COMPONENTS)}")
        groups = self.component_parameters()
        empty = [name for name in components if not groups[name]]
        if empty:
            raise ConfigError(
                f"trainable component(s) {empty} are switched off in this model config "
                f"(reference={self.config.reference!r}, face={self.config.face!r}, image_prompt={self.config.image_prompt}); "
                f"this variant's reference path is {self.config.reference_component!r}"
            )
        self.requires_grad_(False)
        trainable = []
        for name in components:
            for _, param in groups[name]:
                param.requires_grad_(True)
                trainable.append(param)
        return trainable

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> scaled latents ``(N, 4, H/8, W/8)``.

        Training samples the VAE posterior (as SD training does) from ``generator`` (the global one
        when None); inference takes its mode.
        """
        latents = []
        for chunk in images.split(self.config.vae_chunk_size):
            posterior = self.vae.encode(chunk.to(self.vae.dtype)).latent_dist
            latents.append(posterior.sample(generator=generator) if sample_posterior else posterior.mode())
        return torch.cat(latents) * self.vae_scale

    def encode_video(self, video: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, F, 3, H, W)`` -> ``(B, F, 4, h, w)``."""
        batch, frames = video.shape[:2]
        return self.encode_images(video.flatten(0, 1), sample_posterior, generator).unflatten(0, (batch, frames))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, 4, h, w)`` -> ``(B, F, 3, H, W)`` in [-1, 1]."""
        batch, frames = latents.shape[:2]
        flat = latents.flatten(0, 1) / self.vae_scale
        images = [self.vae.decode(chunk.to(self.vae.dtype)).sample for chunk in flat.split(self.config.vae_chunk_size)]
        return torch.cat(images).clamp(-1, 1).unflatten(0, (batch, frames))

    # ------------------------------------------------------------------ image prompt
    def _require_image_prompt(self) -> ImagePrompt:
        if self.image_prompt is None:
            raise ConfigError("this model has no image prompt (model.image_prompt=false)")
        return self.image_prompt

    def encode_image_prompt(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-prompt tokens of the reference ``images (B, 3, H, W)`` in [-1, 1] and of the blank
        image (the unconditional branch of classifier-free guidance), each ``(B, 16, D)``."""
        prompt = self._require_image_prompt()
        conditional = prompt(images)
        return conditional, prompt.blank(images.shape[0], conditional)

    def encode_image_prompt_for_training(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens with image-prompt dropout: each sample's image is replaced by the blank one with
        probability ``config.image_prompt_dropout`` (so guidance has an unconditional branch to use)."""
        prompt = self._require_image_prompt()
        source = generator.device if generator is not None else images.device
        drop = torch.rand(images.shape[0], generator=generator, device=source) < self.config.image_prompt_dropout
        return prompt(images, drop=drop.to(images.device))

    def _prompt_kwargs(self, image_prompt: torch.Tensor | None, rows: int) -> dict:
        if self.image_prompt is None:
            if image_prompt is not None:
                raise ConfigError("image_prompt given, but this model has no image prompt (model.image_prompt=false)")
            return {}
        if image_prompt is None:
            raise ValueError("this model has an image prompt: pass image_prompt= (from encode_image_prompt)")
        if rows % image_prompt.shape[0]:
            raise ValueError(f"image_prompt has {image_prompt.shape[0]} rows, which do not group {rows} samples")
        return {"image_prompt": image_prompt}

    # ------------------------------------------------------------------ denoiser
    def _text(self, rows: int) -> torch.Tensor:
        return self.prompt_embeds.expand(rows, -1, -1).to(self.unet.dtype)

    def encode_reference(
        self, reference_latents: torch.Tensor, timesteps: torch.Tensor, image_prompt: torch.Tensor | None = None
    ) -> ReferenceFeatures:
        """Run the clean reference latent ``(B, 4, h, w)`` at ``timesteps`` through the reference
        path (the shared UNet for the Dynamics-Adapter, the ReferenceNet for its ablation).

        Returns what every adapted layer needs; it stays attached to the autograd graph (the
        reference's own adapter term makes deeper reference features depend on trainable weights).
        The image-prompt variant has no spatial reference path: the result is empty.
        """
        features = ReferenceFeatures()
        batch = reference_latents.shape[0]
        if self.config.reference == "ip_adapter":
            return features
        kwargs = {"reference_mode": "reference", "reference_features": features}
        if self.config.reference == "reference_net":
            # The ReferenceNet is a plain SD UNet: text cross-attention only (as in AnimateAnyone).
            self.reference_net(reference_latents.to(self.reference_net.dtype), timesteps,
                               encoder_hidden_states=self._text(batch), cross_attention_kwargs=kwargs)
            return features
        if not self.caches_reference:
            raise ConfigError("resnet_groupnorm=across_frames ties the reference to its clip: reference features cannot be "
                              "cached; call denoise(noisy, t, reference_latents, ...) instead (see caches_reference)")
        kwargs.update(self._prompt_kwargs(image_prompt, batch))
        with self.frame_layout.use("reference", 1):
            self.unet(reference_latents.unsqueeze(2), timesteps, encoder_hidden_states=self._text(batch), cross_attention_kwargs=kwargs)
        return features

    def control_residuals(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        pose: torch.Tensor | None,
        face: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """Sum of the pose and S-Face ControlNet residuals for the generated frames, per frame."""
        batch, frames = noisy_latents.shape[:2]
        rows = batch * frames
        sample = noisy_latents.flatten(0, 1)
        frame_timesteps = timesteps.repeat_interleave(frames)
        if face is not None and self.face_controlnet is None:
            raise ConfigError(f"face maps given, but model.face={self.config.face!r} has no S-Face ControlNet")
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        controls = (
            (self.pose_controlnet, pose, self.config.pose_conditioning_scale),
            (self.face_controlnet, face, self.config.face_conditioning_scale),
        )
        for controlnet, condition, scale in controls:
            if controlnet is None or condition is None:
                continue
            net_down, net_mid = controlnet(
                sample,
                frame_timesteps,
                encoder_hidden_states=self._text(rows),
                controlnet_cond=condition.flatten(0, 1).to(sample.dtype),
                conditioning_scale=scale,
                return_dict=False,
            )
            if down is None:
                down, mid = list(net_down), net_mid
            else:
                down = [a + b for a, b in zip(down, net_down)]
                mid = mid + net_mid
        return down, mid

    def denoise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
        pose: torch.Tensor | None = None,
        face: torch.Tensor | None = None,
        reference: ReferenceFeatures | None = None,
        image_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of ``noisy_latents (B, F, 4, h, w)`` at ``timesteps (B,)``.

        Give either ``reference_latents`` (the reference pass runs here) or ``reference`` features
        computed once per denoising step by :meth:`encode_reference` and shared by several calls.
        ``image_prompt (B', 16, D)``: tokens for groups of ``B / B'`` consecutive samples (required
        exactly when the model has an image prompt).
        """
        batch, frames = noisy_latents.shape[:2]
        prompt_kwargs = self._prompt_kwargs(image_prompt, batch)
        if not self.caches_reference:
            if reference is not None:
                raise ConfigError("resnet_groupnorm=across_frames: reference features cannot be reused; give reference_latents")
            if reference_latents is None:
                raise ValueError("denoise needs reference_latents")
            return self.denoise_joint(noisy_latents, timesteps, reference_latents, pose, face, image_prompt)
        if reference is None and self.config.reference != "ip_adapter":
            if reference_latents is None:
                raise ValueError("denoise needs reference_latents or precomputed reference features")
            # The image prompt of the reference pass: one row per reference sample.
            reference_prompt = image_prompt
            if image_prompt is not None and image_prompt.shape[0] != reference_latents.shape[0]:
                reference_prompt = image_prompt.repeat_interleave(reference_latents.shape[0] // image_prompt.shape[0], dim=0)
            reference = self.encode_reference(reference_latents, timesteps[:: batch // reference_latents.shape[0]], reference_prompt)
        down, mid = self.control_residuals(noisy_latents, timesteps, pose, face)
        with self.frame_layout.use("generate", frames):
            prediction = self.unet(
                noisy_latents.transpose(1, 2),
                timesteps,
                encoder_hidden_states=self._text(batch * frames),
                cross_attention_kwargs={"reference_mode": "generate", "reference_features": reference, **prompt_kwargs},
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        return prediction.transpose(1, 2)

    def denoise_joint(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        reference_latents: torch.Tensor,
        pose: torch.Tensor | None = None,
        face: torch.Tensor | None = None,
        image_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The one-pass formulation of the X-Dyna release: the clean reference is frame 0 of the
        clip (zero ControlNet residual, skipped by temporal attention), its prediction discarded.

        Equal to :meth:`denoise` with per-frame ResNet statistics; kept as the executable definition
        the cached path is tested against, and the exact path for ``resnet_groupnorm=across_frames``.
        """
        if self.config.reference != "dynamics_adapter":
            raise ConfigError(f"the one-pass formulation exists for the Dynamics-Adapter only (model.reference={self.config.reference!r})")
        batch, frames = noisy_latents.shape[:2]
        if reference_latents.shape[0] != batch:
            raise ValueError("denoise_joint needs one reference latent per sample")
        prompt_kwargs = self._prompt_kwargs(image_prompt, batch)
        down, mid = self.control_residuals(noisy_latents, timesteps, pose, face)

        def with_reference_row(residual: torch.Tensor) -> torch.Tensor:
            per_frame = residual.unflatten(0, (batch, frames))
            zero = torch.zeros_like(per_frame[:, :1])
            return torch.cat([zero, per_frame], dim=1).flatten(0, 1)

        if down is not None:
            down = [with_reference_row(residual) for residual in down]
            mid = with_reference_row(mid)
        sample = torch.cat([reference_latents.unsqueeze(1).to(noisy_latents.dtype), noisy_latents], dim=1)
        with self.frame_layout.use("joint", frames + 1):
            prediction = self.unet(
                sample.transpose(1, 2),
                timesteps,
                encoder_hidden_states=self._text(batch * (frames + 1)),
                cross_attention_kwargs={"reference_mode": "joint", "frames_per_sample": frames + 1, **prompt_kwargs},
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        return prediction.transpose(1, 2)[:, 1:]

    def forward(self, noisy_latents, timesteps, reference_latents, pose=None, face=None, image_prompt=None):  # noqa: D401
        """Alias of :meth:`denoise` so wrappers (DDP, DeepSpeed) that call the module work."""
        return self.denoise(noisy_latents, timesteps, reference_latents, pose, face, image_prompt=image_prompt)


# ---------------------------------------------------------------------- building

def reference_net_unused_prefixes(reference_net: UNet2DConditionModel) -> tuple[str, ...]:
    """Parameter-name prefixes of the ReferenceNet that come after its last recorded layer.

    The last self-attention input it records is that of the last transformer block of the last up
    block; that block's attention, feed-forward, the transformer's output projection and the UNet's
    output head only feed the (unused) noise prediction of the reference.
    """
    last_up = len(reference_net.up_blocks) - 1
    attentions = reference_net.up_blocks[last_up].attentions
    last_attention = f"up_blocks.{last_up}.attentions.{len(attentions) - 1}"
    last_block = f"{last_attention}.transformer_blocks.{len(attentions[-1].transformer_blocks) - 1}"
    return (
        *(f"{last_block}.{part}." for part in ("attn1", "norm2", "attn2", "norm3", "ff")),
        f"{last_attention}.proj_out.",
        "conv_norm_out.",
        "conv_out.",
    )


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _encode_empty_prompt(text_encoder: CLIPTextModel, flavour: Flavour, tokenizer_folder=None) -> torch.Tensor:
    if tokenizer_folder is not None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    else:
        ids = torch.full((1, flavour.prompt_length), flavour.eos_token_id, dtype=torch.long)
        ids[0, 0] = flavour.bos_token_id
    if ids.device.type != text_encoder.device.type:
        ids = ids.to(text_encoder.device)
    if text_encoder.device.type == "meta":
        return torch.zeros(1, ids.shape[1], text_encoder.config.hidden_size, device="meta")
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state.float()


def _load_controlnet(path: str | None, key: str, unet2d: UNet2DConditionModel, channels: int, flavour: Flavour, meta: bool) -> ControlNetModel:
    if path is not None and not meta:
        folder = require_folder(path, "a diffusers-format ControlNet folder", key, ("config.json",))
        controlnet = ControlNetModel.from_pretrained(folder, local_files_only=True)
        if controlnet.config.conditioning_channels != channels:
            raise ConfigError(
                f"{key}: {str(folder)!r} takes {controlnet.config.conditioning_channels}-channel conditions, expected {channels}"
            )
        return controlnet
    # X-Dyna initialises ControlNets from the UNet when no ControlNet weights are given.
    return ControlNetModel.from_unet(
        unet2d, conditioning_channels=channels, conditioning_embedding_out_channels=flavour.controlnet_embedding_channels
    )


def _spatial_attention_layers(unet: nn.Module) -> Iterator[tuple[str, str]]:
    """``(processor name, layer name)`` of every attention processor of ``unet``."""
    for name in unet.attn_processors:
        yield name, name.removesuffix(".processor")


def _install_attention_processors(unet: UNetMotionModel, config: ModelConfig) -> int:
    processors = {}
    adapted = 0
    backend, max_batch = config.attention_backend, config.max_attention_batch
    for name, layer in _spatial_attention_layers(unet):
        attn = unet.get_submodule(layer)
        if "motion_modules" not in name and name.endswith("attn1.processor") and config.reference != "ip_adapter":
            processor_type = DynamicsAdapterProcessor if config.reference == "dynamics_adapter" else ReferenceConcatProcessor
            processors[name] = processor_type(attn, layer, backend, max_batch)
            adapted += 1
        elif "motion_modules" not in name and name.endswith("attn2.processor") and config.image_prompt:
            processors[name] = ImagePromptProcessor(attn, layer, config.image_prompt_scale, backend, max_batch)
        else:
            processors[name] = ChunkedAttentionProcessor(backend, max_batch, layer)
    unet.set_attn_processor(processors)
    return adapted


def _install_reference_net_processors(reference_net: UNet2DConditionModel, config: ModelConfig) -> None:
    backend, max_batch = config.attention_backend, config.max_attention_batch
    processors = {}
    for name, layer in _spatial_attention_layers(reference_net):
        if name.endswith("attn1.processor"):
            processors[name] = ReferenceRecorderProcessor(layer, backend, max_batch)
        else:
            processors[name] = ChunkedAttentionProcessor(backend, max_batch, layer)
    reference_net.set_attn_processor(processors)


def _load_artifacts(model: XDynaModel, config: ModelConfig) -> None:
    """Apply the configured single-file artifacts on top of the built model, in a fixed order:
    AnimateDiff motion module, IP-Adapter, released X-Dyna checkpoints, our component exports."""
    paths = config.pretrained
    unet_tensors = module_tensors(model.unet, "unet.")
    motion_names = {name for name in unet_tensors if ".motion_modules." in name}
    reports = model.load_reports

    if paths.motion_module is not None:
        key = "model.pretrained.motion_module"
        converted, foreign = convert_animatediff_motion(read_state_dict(paths.motion_module, "an AnimateDiff motion-module file", key))
        # The sinusoidal tables are fixed buffers; files without them still load.
        required = {name for name in motion_names if not name.endswith(".pos_embed.pe")}
        reports.append(load_mapped({n: unet_tensors[n] for n in motion_names}, converted, f"{key}={paths.motion_module}", foreign, required))

    if paths.ip_adapter is not None:
        key = "model.pretrained.ip_adapter"
        state = read_state_dict(paths.ip_adapter, "an IP-Adapter-plus file", key)
        converted, foreign = convert_ip_adapter(state, ordered_attention_layers(model.unet), "image_prompt.resampler.")
        targets = {n: t for n, t in unet_tensors.items() if ".attn2.processor." in n}
        targets.update(module_tensors(model.image_prompt.resampler, "image_prompt.resampler."))
        reports.append(load_mapped(targets, converted, f"{key}={paths.ip_adapter}", foreign))

    if paths.xdyna_unet is not None:
        key = "model.pretrained.xdyna_unet"
        converted, foreign = convert_xdyna_unet(read_state_dict(paths.xdyna_unet, "a released X-Dyna UNet checkpoint", key))
        groups = model.component_parameters()
        # The parts X-Dyna trained must be there; SD/IP weights may be (they override the folders).
        required = {name for name, _ in groups["dynamics_adapter"] + groups["motion_modules"]}
        required |= {name for name in motion_names if name.endswith(".pos_embed.pe")} & set(converted)
        reports.append(load_mapped(unet_tensors, converted, f"{key}={paths.xdyna_unet}", foreign, required))
        differences = config.release_groupnorm_differences()
        if differences:
            # Auto modes would have been the release's: these were set explicitly. One warning.
            warnings.warn(f"{key}: {', '.join(differences)} set explicitly, so this model's outputs differ from the "
                          "X-Dyna release's (leave both modes at auto to reproduce it)", UserWarning, stacklevel=3)

    for key, path, module, prefix in (
        ("model.pretrained.xdyna_pose_controlnet", paths.xdyna_pose_controlnet, model.pose_controlnet, "pose_controlnet."),
        ("model.pretrained.xdyna_face_controlnet", paths.xdyna_face_controlnet, model.face_controlnet, "face_controlnet."),
    ):
        if path is not None:
            state = read_state_dict(path, "a released X-Dyna ControlNet checkpoint", key)
            converted = {prefix + name: tensor for name, tensor in state.items()}
            reports.append(load_mapped(module_tensors(module, prefix), converted, f"{key}={path}"))

    for component, path in (paths.components or {}).items():
        reports.append(load_component_safetensors(model, component, path))

    for report in reports:
        log.info("%s", report.summary())


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> XDynaModel:
    """Build the model of ``config``: weights from the configured local folders and files, the rest
    initialised as X-Dyna does (ControlNets from the UNet, zero-init adapter, image-prompt values
    and motion outputs, so a fresh model equals the base SD UNet frame by frame).

    ``device="meta"`` builds the architecture without weights or memory (for sizing jobs); no
    folder or file is read then.
    """
    config.validate()
    flavour = get_flavour(config.flavour)
    paths = config.pretrained
    meta = torch.device(device).type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(config.init_seed)
        tokenizer_folder = None
        if paths.sd15 is not None and not meta:
            sd15 = require_folder(
                paths.sd15, "a diffusers-format Stable Diffusion 1.5 folder", "model.pretrained.sd15",
                ("unet", "vae", "text_encoder"),
            )
            unet2d = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(sd15 / "text_encoder", local_files_only=True)
            tokenizer_folder = sd15 / "tokenizer" if (sd15 / "tokenizer").is_dir() else None
        else:
            unet2d = UNet2DConditionModel(**flavour.unet)
            vae = AutoencoderKL(**flavour.vae)
            text_encoder = CLIPTextModel(CLIPTextConfig(**flavour.text_encoder))
        if paths.vae is not None and not meta:
            folder = require_folder(paths.vae, "a diffusers AutoencoderKL folder", "model.pretrained.vae", ("config.json",))
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        prompt_embeds = _encode_empty_prompt(text_encoder, flavour, tokenizer_folder)
        del text_encoder

        pose_controlnet = _load_controlnet(paths.pose_controlnet, "model.pretrained.pose_controlnet", unet2d, 3, flavour, meta)
        face_controlnet = None
        if config.face == "sface":
            face_controlnet = _load_controlnet(paths.face_controlnet, "model.pretrained.face_controlnet", unet2d, 6, flavour, meta)
        # AnimateAnyone initialises its ReferenceNet as a copy of the SD UNet.
        reference_net = copy.deepcopy(unet2d) if config.reference == "reference_net" else None

        image_prompt = None
        if config.image_prompt:
            if paths.sd15 is not None and paths.image_encoder is None and not meta:
                # A random CLIP encoder beside real SD weights would silently feed noise tokens.
                raise ConfigError("model.pretrained.image_encoder: a CLIP ViT-H/14 vision folder is needed with real SD1.5 "
                                  "weights and model.image_prompt=true (or set model.image_prompt=false)")
            encoder_folder = None
            if paths.image_encoder is not None and not meta:
                encoder_folder = require_folder(paths.image_encoder, "a CLIP vision model folder (ViT-H/14)",
                                                "model.pretrained.image_encoder", ("config.json",))
            image_prompt = build_image_prompt(flavour.image_encoder, flavour.image_prompt, encoder_folder, config.image_prompt_resize)

        if paths.motion_adapter is not None and not meta:
            folder = require_folder(paths.motion_adapter, "a diffusers MotionAdapter folder", "model.pretrained.motion_adapter", ("config.json",))
            motion_adapter = MotionAdapter.from_pretrained(folder, local_files_only=True)
        else:
            motion_adapter = MotionAdapter(**flavour.motion_adapter)
        with _quiet_diffusers():  # from_unet2d warns about float32 modules it does not have
            unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter)
        if paths.motion_adapter is None:
            zero_init_motion_outputs(unet)
        # The motion modules' group count is the adapter's (or the configured one), not the
        # ResNets' that from_unet2d gives them; recorded in the config so that a pipeline folder
        # (which keeps no adapter folder) rebuilds the same statistics.
        motion_norm_groups = config.motion_norm_groups or int(motion_adapter.config["motion_norm_num_groups"])
        try:
            set_motion_norm_groups(unet, motion_norm_groups)
        except ValueError as error:
            raise ConfigError(f"model.motion_norm_groups={motion_norm_groups}: {error}") from None
        config = replace(config, motion_norm_groups=motion_norm_groups)
        del unet2d, motion_adapter

        frame_layout = install_frame_layout(
            unet,
            resnet_across_frames=config.resnet_groupnorm == "across_frames",
            motion_across_frames=config.motion_groupnorm == "across_frames",
        )
        _install_attention_processors(unet, config)
        for controlnet in (pose_controlnet, face_controlnet):
            if controlnet is not None:
                controlnet.set_attn_processor(ChunkedAttentionProcessor(config.attention_backend, config.max_attention_batch))
        if reference_net is not None:
            _install_reference_net_processors(reference_net, config)

    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing(LayoutPreservingCheckpoint(frame_layout))
        for network in (pose_controlnet, face_controlnet, reference_net):
            if network is not None:
                network.enable_gradient_checkpointing()
    model = XDynaModel(config, unet, vae, pose_controlnet, face_controlnet, prompt_embeds, frame_layout, image_prompt, reference_net)
    model.requires_grad_(False)
    if not meta:
        _load_artifacts(model, config)
    elif any(getattr(paths, name) is not None for name in ("motion_module", "ip_adapter", "xdyna_unet", "components")):
        log.info("meta device: configured weight files are not read")
    return model
