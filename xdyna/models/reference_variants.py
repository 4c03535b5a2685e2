"""Reference mechanisms: how the reference image enters the network (the paper's Table 4, plus ours).

Each mechanism is one :class:`ReferenceVariant` subclass, registered in :data:`VARIANTS` under its
``model.reference`` name. It owns everything that differs between mechanisms: the processor on the
denoising UNet's spatial self-attentions (``attn1``) and the component its weights belong to, the
reference pass (none, through the shared UNet, or through a network of its own), whether that
pass can be cached, the trainable component stage 1 trains for it, the components (checkpoint
files) it adds, whether the one-pass formulation (:meth:`XDynaModel.denoise_joint`) exists for it,
and its own config rules. :class:`~xdyna.models.xdyna_model.XDynaModel` and
:func:`~xdyna.models.build.build_model` ask the variant; nothing else compares ``model.reference``.

Adding a mechanism: one subclass here, its entry in :data:`VARIANTS`, and
``conf/model/reference/<name>.yaml`` (docs/extending.md walks through ``kv_concat``).

Variants are stateless singletons: every method that depends on the rest of the model config takes
it as an argument, so a model, a config check and ``xdyna-info`` all share one instance.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError

# No torch at import: the config checks (ModelConfig.validate, the config rules) read the registry's
# names, facts and rules before anything heavy is imported. The processors live in attention.py
# (torch) and are looked up when a model is built (_Processor).
if TYPE_CHECKING:  # type hints only: the model module imports this one
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    from .attention import ReferenceFeatures, XDynaAttentionProcessor
    from .config import ModelConfig
    from .xdyna_model import XDynaModel

    NamedParameters = list[tuple[str, nn.Parameter]]


class _Processor:
    """A processor class of :mod:`xdyna.models.attention`, named here and imported when a variant's
    ``self_attention_processor`` is first read (by the model build), so this registry imports no torch."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance, owner) -> type[XDynaAttentionProcessor]:
        from . import attention

        return getattr(attention, self.name)


class ReferenceVariant:
    """Base class: a variant without a spatial reference path (subclasses add one).

    Class attributes (the facts the model, the builder and the config rules ask for):

    - ``name``: the ``model.reference`` value; ``title``: how messages name the mechanism.
    - ``self_attention_processor``: the processor class installed on every spatial ``attn1`` of the
      denoising UNet, called as ``cls(attn, layer_name, backend, max_batch)``; ``None`` keeps the
      plain (chunked) attention there.
    - ``processor_component``: the component that owns that processor's parameters (``None`` when
      it has none; a parameter found there anyway is an error, never filed under a guess).
    - ``reference_component``: the component stage 1 trains for the reference path (``None`` when
      the reference path has no trainable weights).
    - ``components``: the trainable components (one checkpoint file each) that exist only in this
      variant; the shared ones (motion modules, ControlNets, image prompt) are not listed.
    - ``has_reference_pass``: whether the reference latent runs through a network before the
      generated frames (:meth:`encode_reference`).
    - ``one_pass``: whether :meth:`XDynaModel.denoise_joint` (the reference as frame 0) exists.
    - ``takes_release_unet``: whether a released X-Dyna UNet checkpoint is this variant's.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    self_attention_processor: ClassVar[type[XDynaAttentionProcessor] | None] = None
    processor_component: ClassVar[str | None] = None
    reference_component: ClassVar[str | None] = None
    components: ClassVar[tuple[str, ...]] = ()
    has_reference_pass: ClassVar[bool] = False
    one_pass: ClassVar[bool] = False
    takes_release_unet: ClassVar[bool] = False

    def validate(self, config: ModelConfig) -> None:
        """Raise a one-line :class:`ConfigError` when ``config`` does not fit this variant."""
        if config.resnet_groupnorm == "across_frames" and self.has_reference_pass and not self.one_pass:
            raise ConfigError("model.resnet_groupnorm=across_frames is an import option of the one-pass X-Dyna formulation; "
                              f"the {self.name} variant has no such formulation")

    def caches_reference(self, config: ModelConfig) -> bool:
        """Whether the features of one reference pass may serve several denoiser calls."""
        return True

    def build_reference_network(self, unet2d: UNet2DConditionModel, config: ModelConfig) -> nn.Module | None:
        """The variant's own reference network (``XDynaModel.reference_net``), built from the SD UNet."""
        return None

    def network_parameters(self, model: XDynaModel) -> dict[str, NamedParameters]:
        """Trainable parameters of the variant's own reference network, per component."""
        return {}

    def encode_reference(
        self, model: XDynaModel, latents: torch.Tensor, timesteps: torch.Tensor, features: ReferenceFeatures,
        image_prompt: torch.Tensor | None,
    ) -> None:
        """Run the reference pass, filling ``features`` (nothing to run without a reference path)."""


class SharedUNetReference(ReferenceVariant):
    """Base of the variants whose reference runs through the denoising UNet itself (shared frozen
    weights) in a pass of its own: one frame, no ControlNet residual, temporal attention skipped."""

    has_reference_pass = True

    def caches_reference(self, config: ModelConfig) -> bool:
        # ResNet statistics across frames make the reference part of its clip's statistics (the
        # one-pass formulation): a pass of its own would normalise it differently.
        return config.resnet_groupnorm != "across_frames"

    def encode_reference(self, model, latents, timesteps, features, image_prompt):
        batch = latents.shape[0]
        kwargs = {"reference_mode": "reference", "reference_features": features, **model.image_prompt_kwargs(image_prompt, batch)}
        with model.frame_layout.use("reference", 1):
            model.unet(latents.unsqueeze(2), timesteps, encoder_hidden_states=model.text_embeddings(batch), cross_attention_kwargs=kwargs)


class DynamicsAdapter(SharedUNetReference):
    """X-Dyna: residual attention on the reference's frozen K/V in every spatial self-attention;
    trainable ``q_ff``/``out_ff`` (zero-init output). The released X-Dyna UNet is this variant's."""

    name = "dynamics_adapter"
    title = "Dynamics-Adapter"
    self_attention_processor = _Processor("DynamicsAdapterProcessor")
    processor_component = "dynamics_adapter"
    reference_component = "dynamics_adapter"
    components = ("dynamics_adapter",)
    one_pass = True
    takes_release_unet = True


class KVConcat(SharedUNetReference):
    """The reference's self-attention input tokens, from a pass through the same frozen UNet, are
    concatenated to the keys/values of the generated frames' spatial self-attention (ReferenceNet
    style, without the trainable copy; the "reference-only" control of sd-webui-controlnet).

    No trainable weight: the frozen projections decide how the reference is used, and stage 1
    trains the motion modules and the pose ControlNet around it (``experiment=w_kv_concat``).
    """

    name = "kv_concat"
    title = "shared-UNet K/V concatenation"
    self_attention_processor = _Processor("SharedReferenceConcatProcessor")


class ReferenceNet(ReferenceVariant):
    """w/RefNet (AnimateAnyone): a trainable copy of the SD UNet records its self-attention inputs,
    which the denoising UNet concatenates to its keys/values."""

    name = "reference_net"
    title = "ReferenceNet"
    self_attention_processor = _Processor("ReferenceConcatProcessor")
    reference_component = "reference_net"
    components = ("reference_net",)
    has_reference_pass = True

    def build_reference_network(self, unet2d, config):
        # AnimateAnyone initialises its ReferenceNet as a copy of the SD UNet.
        from .attention import ChunkedAttentionProcessor, ReferenceRecorderProcessor

        reference_net = copy.deepcopy(unet2d)
        backend, max_batch = config.attention_backend, config.max_attention_batch
        reference_net.set_attn_processor({
            name: ReferenceRecorderProcessor(name.removesuffix(".processor"), backend, max_batch) if name.endswith("attn1.processor")
            else ChunkedAttentionProcessor(backend, max_batch, name.removesuffix(".processor"))
            for name in reference_net.attn_processors
        })
        return reference_net

    def network_parameters(self, model):
        unused = reference_net_unused_prefixes(model.reference_net)
        # Weights after the last recorded layer never influence the output: they stay frozen (and
        # out of DDP's reduction, which would otherwise wait for them).
        return {"reference_net": [(f"reference_net.{name}", param) for name, param in model.reference_net.named_parameters()
                                  if not name.startswith(unused)]}

    def encode_reference(self, model, latents, timesteps, features, image_prompt):
        # The ReferenceNet is a plain SD UNet: text cross-attention only (as in AnimateAnyone).
        kwargs = {"reference_mode": "reference", "reference_features": features}
        model.reference_net(latents.to(model.reference_net.dtype), timesteps,
                            encoder_hidden_states=model.text_embeddings(latents.shape[0]), cross_attention_kwargs=kwargs)


class ImagePromptOnly(ReferenceVariant):
    """w/IP-A: no spatial reference path; the reference enters through the image prompt only."""

    name = "ip_adapter"
    title = "image prompt"
    reference_component = "image_prompt"

    def validate(self, config):
        super().validate(config)
        if not config.image_prompt:
            raise ConfigError("model.reference=ip_adapter needs model.image_prompt=true (the image prompt is the only reference path)")


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


# The registry: model.reference name -> variant. A new variant is one class above plus one entry here.
VARIANTS: dict[str, ReferenceVariant] = {
    variant.name: variant for variant in (DynamicsAdapter(), ReferenceNet(), ImagePromptOnly(), KVConcat())
}
REFERENCE_VARIANTS = tuple(VARIANTS)


def reference_variant(name: str) -> ReferenceVariant:
    """The variant registered as ``name`` (a one-line error naming the choices otherwise)."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.reference={name!r}; choose one of {REFERENCE_VARIANTS}") from None


def one_pass_titles() -> str:
    """The variants that have the one-pass formulation, for messages."""
    return " and ".join(f"the {variant.title}" for variant in VARIANTS.values() if variant.one_pass)
