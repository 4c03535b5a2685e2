"""The X-Dyna network: frozen SD1.5 UNet + Dynamics-Adapter + motion modules + ControlNets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import ConfigError
from .attention import ChunkedAttentionProcessor, DynamicsAdapterProcessor, ReferenceFeatures
from .config import ModelConfig
from .flavours import Flavour, get_flavour
from .loading import require_folder
from .motion import FrameLayout, install_frame_layout, zero_init_motion_outputs

COMPONENTS = ("dynamics_adapter", "motion_modules", "pose_controlnet", "face_controlnet")


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
    ):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        self.pose_controlnet = pose_controlnet
        self.face_controlnet = face_controlnet
        # The text prompt is empty in X-Dyna: its CLIP encoding is a constant, computed once at
        # build time (not persistent: it is a function of the frozen text encoder, not a weight).
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.frame_layout = frame_layout

    # ------------------------------------------------------------------ parameters
    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of each trainable component (empty list when the component is off)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in COMPONENTS}
        for name, param in self.unet.named_parameters(prefix="unet"):
            if ".attn1.processor." in name and "motion_modules" not in name:
                groups["dynamics_adapter"].append((name, param))
            elif "motion_modules" in name:
                groups["motion_modules"].append((name, param))
        groups["pose_controlnet"] = list(self.pose_controlnet.named_parameters(prefix="pose_controlnet"))
        if self.face_controlnet is not None:
            groups["face_controlnet"] = list(self.face_controlnet.named_parameters(prefix="face_controlnet"))
        return groups

    def set_trainable(self, components: list[str] | tuple[str, ...]) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze ``components``; returns the trainable parameters."""
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"unknown trainable component(s) {unknown}; known: {list(COMPONENTS)}")
        groups = self.component_parameters()
        empty = [name for name in components if not groups[name]]
        if empty:
            raise ConfigError(f"trainable component(s) {empty} are switched off in this model config")
        self.requires_grad_(False)
        trainable = []
        for name in components:
            for _, param in groups[name]:
                param.requires_grad_(True)
                trainable.append(param)
        return trainable

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> scaled latents ``(N, 4, H/8, W/8)``.

        Training samples the VAE posterior (as SD training does); inference takes its mode.
        """
        latents = []
        for chunk in images.split(self.config.vae_chunk_size):
            posterior = self.vae.encode(chunk.to(self.vae.dtype)).latent_dist
            latents.append(posterior.sample() if sample_posterior else posterior.mode())
        return torch.cat(latents) * self.vae_scale

    def encode_video(self, video: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
        """``(B, F, 3, H, W)`` -> ``(B, F, 4, h, w)``."""
        batch, frames = video.shape[:2]
        return self.encode_images(video.flatten(0, 1), sample_posterior).unflatten(0, (batch, frames))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, 4, h, w)`` -> ``(B, F, 3, H, W)`` in [-1, 1]."""
        batch, frames = latents.shape[:2]
        flat = latents.flatten(0, 1) / self.vae_scale
        images = [self.vae.decode(chunk.to(self.vae.dtype)).sample for chunk in flat.split(self.config.vae_chunk_size)]
        return torch.cat(images).clamp(-1, 1).unflatten(0, (batch, frames))

    # ------------------------------------------------------------------ denoiser
    def _text(self, rows: int) -> torch.Tensor:
        return self.prompt_embeds.expand(rows, -1, -1).to(self.unet.dtype)

    @contextlib.contextmanager
    def _layout(self, mode: str) -> Iterator[None]:
        previous = self.frame_layout.mode
        self.frame_layout.mode = mode
        try:
            yield
        finally:
            self.frame_layout.mode = previous

    def encode_reference(self, reference_latents: torch.Tensor, timesteps: torch.Tensor) -> ReferenceFeatures:
        """Run the clean reference latent ``(B, 4, h, w)`` through the UNet at ``timesteps``.

        Returns the keys/values every adapted layer needs; they stay attached to the autograd graph
        (the reference's own adapter term makes deeper reference features depend on trainable weights).
        """
        features = ReferenceFeatures()
        with self._layout("reference"):
            self.unet(
                reference_latents.unsqueeze(2),
                timesteps,
                encoder_hidden_states=self._text(reference_latents.shape[0]),
                cross_attention_kwargs={"reference_mode": "reference", "reference_features": features},
            )
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
    ) -> torch.Tensor:
        """Predict the noise of ``noisy_latents (B, F, 4, h, w)`` at ``timesteps (B,)``.

        Give either ``reference_latents`` (the reference pass runs here) or ``reference`` features
        computed once per denoising step by :meth:`encode_reference` and shared by several calls.
        """
        if reference is None:
            if reference_latents is None:
                raise ValueError("denoise needs reference_latents or precomputed reference features")
            reference = self.encode_reference(reference_latents, timesteps)
        batch, frames = noisy_latents.shape[:2]
        down, mid = self.control_residuals(noisy_latents, timesteps, pose, face)
        with self._layout("generate"):
            prediction = self.unet(
                noisy_latents.transpose(1, 2),
                timesteps,
                encoder_hidden_states=self._text(batch * frames),
                cross_attention_kwargs={"reference_mode": "generate", "reference_features": reference},
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
    ) -> torch.Tensor:
        """The one-pass formulation of the X-Dyna release: the clean reference is frame 0 of the
        clip (zero ControlNet residual, skipped by temporal attention), its prediction discarded.

        Equal to :meth:`denoise`; kept as the executable definition the cached path is tested against.
        """
        batch, frames = noisy_latents.shape[:2]
        down, mid = self.control_residuals(noisy_latents, timesteps, pose, face)

        def with_reference_row(residual: torch.Tensor) -> torch.Tensor:
            per_frame = residual.unflatten(0, (batch, frames))
            zero = torch.zeros_like(per_frame[:, :1])
            return torch.cat([zero, per_frame], dim=1).flatten(0, 1)

        if down is not None:
            down = [with_reference_row(residual) for residual in down]
            mid = with_reference_row(mid)
        sample = torch.cat([reference_latents.unsqueeze(1), noisy_latents], dim=1)
        with self._layout("joint"):
            prediction = self.unet(
                sample.transpose(1, 2),
                timesteps,
                encoder_hidden_states=self._text(batch * (frames + 1)),
                cross_attention_kwargs={"reference_mode": "joint", "frames_per_sample": frames + 1},
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        return prediction.transpose(1, 2)[:, 1:]

    def forward(self, noisy_latents, timesteps, reference_latents, pose=None, face=None):  # noqa: D401
        """Alias of :meth:`denoise` so wrappers (DDP, DeepSpeed) that call the module work."""
        return self.denoise(noisy_latents, timesteps, reference_latents, pose, face)


# ---------------------------------------------------------------------- building

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


def _load_controlnet(path: str | None, key: str, unet2d: UNet2DConditionModel, channels: int, flavour: Flavour) -> ControlNetModel:
    if path is not None:
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


def _install_attention_processors(unet: UNetMotionModel, config: ModelConfig) -> int:
    processors = {}
    adapted = 0
    for name in unet.attn_processors:
        layer = name.removesuffix(".processor")
        if "motion_modules" not in name and name.endswith("attn1.processor"):
            processors[name] = DynamicsAdapterProcessor(
                unet.get_submodule(layer), layer, config.attention_backend, config.max_attention_batch
            )
            adapted += 1
        else:
            processors[name] = ChunkedAttentionProcessor(config.attention_backend, config.max_attention_batch)
    unet.set_attn_processor(processors)
    return adapted


def build_model(config: ModelConfig, device: str | torch.device = "cpu") -> XDynaModel:
    """Build the model of ``config``: weights from the configured local folders, the rest
    initialised as X-Dyna does (ControlNets from the UNet, zero-init adapter and motion outputs).

    ``device="meta"`` builds the architecture without weights or memory (for sizing jobs).
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
        prompt_embeds = _encode_empty_prompt(text_encoder, flavour, tokenizer_folder)
        del text_encoder

        pose_controlnet = _load_controlnet(paths.pose_controlnet, "model.pretrained.pose_controlnet", unet2d, 3, flavour)
        face_controlnet = None
        if config.face == "sface":
            face_controlnet = _load_controlnet(paths.face_controlnet, "model.pretrained.face_controlnet", unet2d, 6, flavour)

        if paths.motion_adapter is not None and not meta:
            folder = require_folder(paths.motion_adapter, "a diffusers MotionAdapter folder", "model.pretrained.motion_adapter", ("config.json",))
            motion_adapter = MotionAdapter.from_pretrained(folder, local_files_only=True)
        else:
            motion_adapter = MotionAdapter(**flavour.motion_adapter)
        unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter)
        if paths.motion_adapter is None:
            zero_init_motion_outputs(unet)
        del unet2d, motion_adapter

    frame_layout = install_frame_layout(unet)
    with torch.device(device):
        _install_attention_processors(unet, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        pose_controlnet.enable_gradient_checkpointing()
        if face_controlnet is not None:
            face_controlnet.enable_gradient_checkpointing()
    model = XDynaModel(config, unet, vae, pose_controlnet, face_controlnet, prompt_embeds, frame_layout)
    model.requires_grad_(False)
    return model
