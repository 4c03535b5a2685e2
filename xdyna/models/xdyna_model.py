"""The X-Dyna network: frozen SD1.5 UNet + motion modules + a reference path (a variant of
reference_variants.py: Dynamics-Adapter, ReferenceNet, shared-UNet K/V concatenation or image prompt
only) + pose/S-Face ControlNets + optional IP-Adapter-plus image prompt. Built by build.py."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNetMotionModel
from torch import nn

from ..errors import ConfigError
from .attention import ReferenceFeatures
from .config import COMPONENTS, SHARED_COMPONENTS, ModelConfig  # noqa: F401 (the components: names only, in config.py)
from .image_prompt import ImagePrompt
from .loading import LoadReport
from .motion import FrameLayout
from .reference_variants import one_pass_titles, reference_variant

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
        # The reference mechanism: every variant-dependent decision below asks it.
        self.variant = reference_variant(config.reference)
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

        The variant decides: False with ``resnet_groupnorm=across_frames`` and the Dynamics-Adapter,
        whose reference frame then shares GroupNorm statistics with the clip it is denoised with
        (AnimateDiff v1 / the X-Dyna release), so only the one-pass formulation is exact;
        :meth:`denoise` runs it.
        """
        return self.variant.caches_reference(self.config)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters of every trainable component and every frozen part (disjoint, covering the model)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in (*COMPONENTS, *FROZEN_PARTS)}
        for name, param in self.unet.named_parameters(prefix="unet"):
            groups[self._unet_part(name)].append((name, param))
        groups["vae"] = list(self.vae.named_parameters(prefix="vae"))
        groups["pose_controlnet"] = list(self.pose_controlnet.named_parameters(prefix="pose_controlnet"))
        if self.face_controlnet is not None:
            groups["face_controlnet"] = list(self.face_controlnet.named_parameters(prefix="face_controlnet"))
        if self.image_prompt is not None:
            groups["image_prompt"] += list(self.image_prompt.resampler.named_parameters(prefix="image_prompt.resampler"))
            groups["image_encoder"] = list(self.image_prompt.image_encoder.named_parameters(prefix="image_prompt.image_encoder"))
        for component, named in self.variant.network_parameters(self).items():
            groups[component] += named
        return groups

    def _unet_part(self, name: str) -> str:
        """The component (or frozen part) of the UNet parameter ``name``.

        Parameters of attention processors are ours, added on top of SD: each belongs to whoever
        installed the processor (``attn1``: the reference variant, ``attn2``: the image prompt).
        One that nobody claims is an error, never filed under a guess.
        """
        if ".motion_modules." in name:
            return "motion_modules"
        if ".processor." not in name:
            return "unet"
        if ".attn1.processor." in name and self.variant.processor_component is not None:
            return self.variant.processor_component
        if ".attn2.processor." in name and self.image_prompt is not None:
            return "image_prompt"
        raise RuntimeError(f"{name}: an attention-processor parameter that no component claims (model.reference="
                           f"{self.config.reference!r} names processor_component={self.variant.processor_component!r}); "
                           "a variant whose processor has weights must name their component")

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
            component = self.variant.reference_component
            path = (f"this variant's reference path is {component!r}" if component is not None
                    else "this variant's reference path has no trainable weights")
            raise ConfigError(
                f"trainable component(s) {empty} are switched off in this model config "
                f"(reference={self.config.reference!r}, face={self.config.face!r}, image_prompt={self.config.image_prompt}); {path}"
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

    def image_prompt_kwargs(self, image_prompt: torch.Tensor | None, rows: int) -> dict:
        """``cross_attention_kwargs`` entries of the image prompt for ``rows`` samples (checked against the model)."""
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
    def text_embeddings(self, rows: int) -> torch.Tensor:
        """The (constant, empty-prompt) text embeddings for ``rows`` rows."""
        return self.prompt_embeds.expand(rows, -1, -1).to(self.unet.dtype)

    def encode_reference(
        self, reference_latents: torch.Tensor, timesteps: torch.Tensor, image_prompt: torch.Tensor | None = None
    ) -> ReferenceFeatures:
        """Run the clean reference latent ``(B, 4, h, w)`` at ``timesteps`` through the variant's
        reference pass (the shared UNet for the Dynamics-Adapter and kv_concat, the ReferenceNet for
        its ablation).

        Returns what every adapted layer needs; it stays attached to the autograd graph (the
        reference's own adapter term makes deeper reference features depend on trainable weights).
        The image-prompt variant has no spatial reference path: the result is empty.
        """
        features = ReferenceFeatures()
        if not self.variant.has_reference_pass:
            return features
        if not self.caches_reference:
            raise ConfigError("resnet_groupnorm=across_frames ties the reference to its clip: reference features cannot be "
                              "cached; call denoise(noisy, t, reference_latents, ...) instead (see caches_reference)")
        self.variant.encode_reference(self, reference_latents, timesteps, features, image_prompt)
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
                encoder_hidden_states=self.text_embeddings(rows),
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
        prompt_kwargs = self.image_prompt_kwargs(image_prompt, batch)
        if not self.caches_reference:
            if reference is not None:
                raise ConfigError("resnet_groupnorm=across_frames: reference features cannot be reused; give reference_latents")
            if reference_latents is None:
                raise ValueError("denoise needs reference_latents")
            return self.denoise_joint(noisy_latents, timesteps, reference_latents, pose, face, image_prompt)
        if reference is None and self.variant.has_reference_pass:
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
                encoder_hidden_states=self.text_embeddings(batch * frames),
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
        if not self.variant.one_pass:
            raise ConfigError(f"the one-pass formulation exists for {one_pass_titles()} only (model.reference={self.config.reference!r})")
        batch, frames = noisy_latents.shape[:2]
        if reference_latents.shape[0] != batch:
            raise ValueError("denoise_joint needs one reference latent per sample")
        prompt_kwargs = self.image_prompt_kwargs(image_prompt, batch)
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
                encoder_hidden_states=self.text_embeddings(batch * (frames + 1)),
                cross_attention_kwargs={"reference_mode": "joint", "frames_per_sample": frames + 1, **prompt_kwargs},
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        return prediction.transpose(1, 2)[:, 1:]

    def forward(self, noisy_latents, timesteps, reference_latents, pose=None, face=None, image_prompt=None):  # noqa: D401
        """Alias of :meth:`denoise` so wrappers (DDP, DeepSpeed) that call the module work."""
        return self.denoise(noisy_latents, timesteps, reference_latents, pose, face, image_prompt=image_prompt)
