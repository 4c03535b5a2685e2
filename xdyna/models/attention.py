"""Attention kernels and the attention processors X-Dyna installs in the UNet.

The Dynamics-Adapter (X-Dyna, arXiv 2501.10021) lives in every spatial self-attention (``attn1``)
of the UNet's transformer blocks:

    out = to_out(softmax(q(x) k(x)^T) v(x))                  # frozen SD path, own frame only
        + out_ff(softmax(q_ff(x) k(r)^T) v(r))                # adapter path, r = reference tokens

``k``/``v`` are the frozen projections; ``q_ff`` (copied from ``to_q``) and ``out_ff`` (zero-init)
are the only trainable weights, so training starts exactly at the base model.

The reference tokens ``r`` at a layer depend only on the reference frame (spatial layers work per
frame, the reference gets no ControlNet residual and skips temporal attention). That is why the
reference can run through the UNet once, in its own "reference" pass that stores ``k(r)``/``v(r)``
per layer in a :class:`ReferenceFeatures` bank, and every generated frame (every context window at
inference) reads them back. ``joint`` mode is the one-pass formulation (reference as frame 0 of the
same batch); tests prove both agree.

The mode (and the image-prompt tokens) travel in ``cross_attention_kwargs`` rather than in module state: diffusers re-runs
transformer blocks under gradient checkpointing with the same kwargs, so recomputation sees the
mode of the original pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

ReferenceMode = Literal["reference", "generate", "joint"]
AttentionBackend = Literal["sdpa", "xformers"]

# CUDA attention kernels launch one grid row per (batch x head); past 65535 rows some kernels
# fail ("invalid configuration argument"). Temporal attention folds H*W into the batch, which at
# 896x512 is 7168 per clip, so it is split into chunks below this bound.
DEFAULT_MAX_ATTENTION_BATCH = 65535


@functools.lru_cache(maxsize=None)
def xformers_unusable_reason() -> str | None:
    """Why xformers' memory-efficient attention cannot run here, or None when it can.

    Importing is not enough: a wheel built for another torch/CUDA imports fine and only fails
    at the first call (seen on an H100 with torch 2.11+cu130 and the PyPI xformers 0.0.35 wheel,
    built for torch 2.10+cu128), so one tiny attention is actually run.
    """
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    try:
        import xformers.ops

        probe = torch.zeros(1, 8, 1, 8, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(probe, probe, probe)
    except Exception as error:  # ImportError, or a build without kernels for this torch/GPU
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return None


def check_attention_backend(backend: str) -> None:
    """Fail at build time, naming the reason, rather than mid-step or by silent fallback."""
    if backend == "xformers":
        reason = xformers_unusable_reason()
        if reason is not None:
            raise ConfigError(f"model.attention_backend=xformers cannot run here ({reason}); use sdpa")
    elif backend != "sdpa":
        raise ConfigError(f"model.attention_backend={backend!r}; choose sdpa or xformers")


def multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    backend: AttentionBackend = "sdpa",
    max_batch: int = DEFAULT_MAX_ATTENTION_BATCH,
) -> torch.Tensor:
    """Softmax attention on ``(B, L, C)`` tensors split into ``heads`` heads; returns ``(B, Lq, C)``.

    Work is chunked over ``B`` so that ``chunk * heads`` never exceeds ``max_batch``.
    """
    batch, q_len, channels = query.shape
    head_dim = channels // heads
    chunk = max(1, max_batch // heads)
    if batch > chunk:
        return torch.cat(
            [
                multi_head_attention(query[i : i + chunk], key[i : i + chunk], value[i : i + chunk], heads, backend, max_batch)
                for i in range(0, batch, chunk)
            ]
        )
    if backend == "xformers":
        import xformers.ops

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], heads, head_dim)

        out = xformers.ops.memory_efficient_attention(split(query), split(key), split(value))
        return out.reshape(batch, q_len, channels)

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split_heads(query), split_heads(key), split_heads(value))
    return out.transpose(1, 2).reshape(batch, q_len, channels)


@dataclass
class ReferenceFeatures:
    """What one reference pass leaves for the generated frames, per adapted layer.

    Dynamics-Adapter: ``keys[name]``/``values[name]`` are the frozen ``to_k``/``to_v`` of the
    reference tokens, ``(B_ref, N, C)``. ReferenceNet: ``tokens[name]`` are the reference net's
    self-attention inputs, projected later by the generating UNet's own ``to_k``/``to_v`` (as in
    AnimateAnyone); ``kv_concat`` records the same inputs from the shared UNet's reference pass.
    A generation batch whose size is a multiple of ``B_ref`` reads them with its rows grouped
    contiguously per reference (sample-major), so one reference serves all of its frames and all of
    its context windows.
    """

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter((self.keys or self.tokens).values())).shape[0]

    def __len__(self) -> int:
        return len(self.keys) + len(self.tokens)


def _check_plain_self_attention(attn: nn.Module, name: str) -> None:
    # SD1.5's attn1 has none of these; an architecture that does needs a different processor.
    for attribute in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, attribute, None) is not None:
            raise ValueError(f"{name}: reference processors support plain self-attention only ({attribute} is set)")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        raise ValueError(f"{name}: reference processors expect no residual connection and no output rescale")


def _rows_per_reference(rows: int, references: int, what: str) -> int:
    if references == 0 or rows % references:
        raise ValueError(f"{what}: {rows} frame rows do not group into {references} reference(s)")
    return rows // references


def _repeat_per_row(per_sample: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """``(B, N, C)`` -> ``(rows, N, C)``, each sample's entry repeated for its contiguous rows."""
    repeats = _rows_per_reference(rows, per_sample.shape[0], what)
    return per_sample if repeats == 1 else per_sample.repeat_interleave(repeats, dim=0)


class XDynaAttentionProcessor(nn.Module):
    """Base of every processor X-Dyna installs.

    diffusers passes one ``cross_attention_kwargs`` dict to all attention layers of a UNet and
    filters it by each processor's ``__call__`` signature (warning about the rest), so every
    processor names all X-Dyna arguments here and receives them in :meth:`attend`.
    """

    def __init__(self, name: str, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        super().__init__()
        check_attention_backend(backend)
        self.layer_name = name
        self.backend = backend
        self.max_batch = max_batch

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference_mode: ReferenceMode | None = None,
        reference_features: ReferenceFeatures | None = None,
        frames_per_sample: int | None = None,
        image_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(f"{self.layer_name}: X-Dyna attention takes no mask")
        # Under DeepSpeed bf16 there is no autocast: fp32 buffers that diffusers adds on the way
        # (e.g. the motion modules' sinusoidal positions) would promote activations to fp32 and
        # meet bf16 weights. Match the projections' dtype here, once for every attention.
        weight_dtype = attn.to_q.weight.dtype
        hidden_states = hidden_states.to(weight_dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(weight_dtype)
        return super().__call__(attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        return multi_head_attention(query, key, value, heads, self.backend, self.max_batch)

    def forward(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        return self.attend(attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt)

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        """Plain (self- or cross-) attention; subclasses add the reference or image-prompt path."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = self.attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class ChunkedAttentionProcessor(XDynaAttentionProcessor):
    """Plain attention with a selectable kernel, chunked over the batch.

    Used for temporal attention (whose folded batch is large, see ``DEFAULT_MAX_ATTENTION_BATCH``),
    the ReferenceNet's cross-attention and, without an image prompt, the UNet's cross-attention, so
    one backend switch covers every attention.
    """

    def __init__(self, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH, name: str = ""):
        super().__init__(name, backend, max_batch)


class DynamicsAdapterProcessor(XDynaAttentionProcessor):
    """One spatial self-attention with X-Dyna's Dynamics-Adapter: frozen SD path + trainable adapter path.

    Modes (``reference_mode``): ``reference`` records the reference frame's K/V (and gives the
    reference its own adapter term, attending to itself); ``generate`` reads recorded K/V;
    ``joint`` takes them from frame 0 of each sample of the same batch (the one-pass formulation).
    """

    def __init__(self, attn: nn.Module, name: str, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        super().__init__(name, backend, max_batch)
        _check_plain_self_attention(attn, name)
        query_dim, inner_dim = attn.to_q.in_features, attn.to_q.out_features
        out_dim = attn.to_out[0].out_features
        self.q_ff = nn.Linear(query_dim, inner_dim, bias=False)
        self.out_ff = nn.Linear(inner_dim, out_dim, bias=True)
        with torch.no_grad():
            self.q_ff.weight.copy_(attn.to_q.weight)
            nn.init.zeros_(self.out_ff.weight)
            nn.init.zeros_(self.out_ff.bias)

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.layer_name}: the Dynamics-Adapter wraps self-attention")
        rows, tokens, _ = hidden_states.shape
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        own = self.attention(attn.to_q(hidden_states), key, value, attn.heads)
        out = attn.to_out[1](attn.to_out[0](own))

        if reference_mode == "reference":
            ref_key, ref_value = key, value
            if reference_features is not None:
                reference_features.keys[self.layer_name] = key
                reference_features.values[self.layer_name] = value
        elif reference_mode == "generate":
            if reference_features is None or self.layer_name not in reference_features.keys:
                raise ValueError(f"{self.layer_name}: generate mode needs reference features from a reference pass")
            ref_key = reference_features.keys[self.layer_name]
            ref_value = reference_features.values[self.layer_name]
        elif reference_mode == "joint":
            if not frames_per_sample:
                raise ValueError(f"{self.layer_name}: joint mode needs frames_per_sample")
            # Frame 0 of every sample is its reference.
            ref_key = key.reshape(-1, frames_per_sample, tokens, key.shape[-1])[:, 0]
            ref_value = value.reshape(-1, frames_per_sample, tokens, value.shape[-1])[:, 0]
        elif reference_mode is None:
            raise ValueError(
                f"{self.layer_name}: no reference_mode given; call the UNet through XDynaModel, which runs the reference pass"
            )
        else:
            raise ValueError(f"{self.layer_name}: unknown reference_mode {reference_mode!r}")

        num_refs = ref_key.shape[0]
        per_reference = _rows_per_reference(rows, num_refs, self.layer_name)
        # All frames of one sample share its reference: fold them into one long query sequence
        # instead of repeating the reference keys per frame.
        adapter_query = self.q_ff(hidden_states).reshape(num_refs, per_reference * tokens, -1)
        adapter = self.attention(adapter_query, ref_key, ref_value, attn.heads)
        return out + self.out_ff(adapter.reshape(rows, tokens, -1))


def _record_reference_tokens(
    processor: XDynaAttentionProcessor, attn: nn.Module, hidden_states: torch.Tensor, reference_features: ReferenceFeatures
) -> torch.Tensor:
    """Store a self-attention's input tokens of the reference, then attend as the plain layer does."""
    reference_features.tokens[processor.layer_name] = hidden_states
    return XDynaAttentionProcessor.attend(processor, attn, hidden_states, None, "reference", reference_features, None, None)


class ReferenceRecorderProcessor(XDynaAttentionProcessor):
    """Self-attention of the ReferenceNet: runs unchanged and records its input tokens.

    AnimateAnyone's ReferenceNet hands the *input* of each self-attention (after its LayerNorm) to
    the denoising UNet, which projects it with its own ``to_k``/``to_v``.
    """

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        if reference_mode != "reference" or reference_features is None:
            raise ValueError(f"{self.layer_name}: the ReferenceNet runs in reference mode with a features bank only")
        return _record_reference_tokens(self, attn, hidden_states, reference_features)


class ReferenceConcatProcessor(XDynaAttentionProcessor):
    """Self-attention of the denoising UNet in the ReferenceNet variant: keys/values of the frame's
    own tokens concatenated with those of the recorded reference tokens (one softmax over both)."""

    def __init__(self, attn: nn.Module, name: str, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        super().__init__(name, backend, max_batch)
        _check_plain_self_attention(attn, name)

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        if reference_mode != "generate":
            raise ValueError(f"{self.layer_name}: the ReferenceNet variant has generate mode only (got {reference_mode!r})")
        if reference_features is None or self.layer_name not in reference_features.tokens:
            raise ValueError(f"{self.layer_name}: generate mode needs ReferenceNet tokens from a reference pass")
        rows = hidden_states.shape[0]
        reference = _repeat_per_row(reference_features.tokens[self.layer_name], rows, self.layer_name)
        context = torch.cat([hidden_states, reference], dim=1)
        out = self.attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        return attn.to_out[1](attn.to_out[0](out))


class SharedReferenceConcatProcessor(ReferenceConcatProcessor):
    """Self-attention of the ``kv_concat`` variant: ReferenceNet-style K/V concatenation, but the
    reference runs through this same frozen UNet (no copy, no trainable weight).

    ``reference`` mode records the layer's input tokens and attends as the plain layer does (the
    recorder of the ReferenceNet, so both variants record the same thing); ``generate`` mode is
    :class:`ReferenceConcatProcessor`'s. A frame equal to its reference therefore gets exactly the
    plain UNet's output (its keys appear twice, which leaves the softmax average unchanged).
    """

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        if reference_mode == "reference":
            if reference_features is None:
                raise ValueError(f"{self.layer_name}: the reference pass needs a features bank")
            return _record_reference_tokens(self, attn, hidden_states, reference_features)
        return super().attend(attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt)


class ImagePromptProcessor(XDynaAttentionProcessor):
    """Cross-attention with IP-Adapter's decoupled image path:

        out = to_out(attn(q, k(text), v(text)) + scale * attn(q, k_ip(image), v_ip(image)))

    ``image_prompt`` ``(B, N, D)`` holds one row of image tokens per sample; the frames of a sample
    are its contiguous rows. A fresh path copies ``to_k`` into ``to_k_ip`` (IP-Adapter's init) and
    zero-initialises ``to_v_ip`` so that, like every other X-Dyna addition, it starts as identity.
    """

    def __init__(self, attn: nn.Module, name: str, scale: float = 1.0, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        super().__init__(name, backend, max_batch)
        self.scale = scale
        context_dim, inner_dim = attn.to_k.in_features, attn.to_k.out_features
        self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(attn.to_k.weight)
            nn.init.zeros_(self.to_v_ip.weight)

    def attend(self, attn, hidden_states, encoder_hidden_states, reference_mode, reference_features, frames_per_sample, image_prompt):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer_name}: the image prompt rides on cross-attention")
        if image_prompt is None:
            raise ValueError(
                f"{self.layer_name}: this model has an image prompt; pass image_prompt= (XDynaModel.encode_image_prompt)"
            )
        query = attn.to_q(hidden_states)
        text = self.attention(query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads)
        image = _repeat_per_row(image_prompt.to(hidden_states.dtype), hidden_states.shape[0], self.layer_name)
        picture = self.attention(query, self.to_k_ip(image), self.to_v_ip(image), attn.heads)
        return attn.to_out[1](attn.to_out[0](text + self.scale * picture))
