"""Model construction: :func:`build_model` builds an :class:`XDynaModel` from a :class:`ModelConfig`,
reading the configured local folders, then applying the configured weight files in a fixed order.

Kept apart from the network (``xdyna_model.py``): the network's methods are what training, sampling
and export run; this module is only about putting one together (architecture, attention processors
chosen by the reference variant, initialisation, and the artifact loading on top).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import replace

import torch
from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import ConfigError
from .attention import ChunkedAttentionProcessor, ImagePromptProcessor
from .config import ModelConfig
from .flavours import Flavour, get_flavour
from .image_prompt import build_image_prompt
from .loading import (
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
from .motion import LayoutPreservingCheckpoint, install_frame_layout, set_motion_norm_groups, zero_init_motion_outputs
from .reference_variants import ReferenceVariant
from .xdyna_model import XDynaModel

log = logging.getLogger(__name__)


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


def _install_attention_processors(unet: UNetMotionModel, config: ModelConfig, variant: ReferenceVariant) -> int:
    """The variant's processor on every spatial self-attention, the image prompt's on every spatial
    cross-attention when it is on, plain chunked attention elsewhere (temporal attention included)."""
    processors = {}
    adapted = 0
    backend, max_batch = config.attention_backend, config.max_attention_batch
    for name, layer in _spatial_attention_layers(unet):
        attn = unet.get_submodule(layer)
        spatial = "motion_modules" not in name
        if spatial and name.endswith("attn1.processor") and variant.self_attention_processor is not None:
            processors[name] = variant.self_attention_processor(attn, layer, backend, max_batch)
            adapted += 1
        elif spatial and name.endswith("attn2.processor") and config.image_prompt:
            processors[name] = ImagePromptProcessor(attn, layer, config.image_prompt_scale, backend, max_batch)
        else:
            processors[name] = ChunkedAttentionProcessor(backend, max_batch, layer)
    unet.set_attn_processor(processors)
    return adapted


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
        # A variant that does not take the release keeps its own processors: their weights are
        # not required, and the file's adapter keys then find no counterpart (one clear error).
        trained = [*groups["motion_modules"]]
        if model.variant.takes_release_unet and model.variant.processor_component is not None:
            trained += groups[model.variant.processor_component]
        required = {name for name, _ in trained}
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
    variant = config.reference_variant
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
        reference_net = variant.build_reference_network(unet2d, config)

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
        _install_attention_processors(unet, config, variant)
        for controlnet in (pose_controlnet, face_controlnet):
            if controlnet is not None:
                controlnet.set_attn_processor(ChunkedAttentionProcessor(config.attention_backend, config.max_attention_batch))

    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing(LayoutPreservingCheckpoint(frame_layout))
        for network in (pose_controlnet, face_controlnet, reference_net):
            if network is not None:
                network.enable_gradient_checkpointing()
    model = XDynaModel(config, unet, vae, pose_controlnet, face_controlnet, prompt_embeds, frame_layout, image_prompt, reference_net)
    if config.activation_checkpointing is not None:  # selective, by block kind (replaces diffusers' flags)
        from .activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, config.activation_checkpointing, config.gradient_checkpointing)
    if config.compile is not None:  # torch.compile per block kind, after checkpointing (compile.py)
        from .compile import apply_compile

        apply_compile(model, config.compile)
    model.requires_grad_(False)
    if not meta:
        _load_artifacts(model, config)
    elif any(getattr(paths, name) is not None for name in ("motion_module", "ip_adapter", "xdyna_unet", "components")):
        log.info("meta device: configured weight files are not read")
    return model
