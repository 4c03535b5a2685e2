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

The mode travels in ``cross_attention_kwargs`` rather than in module state: diffusers re-runs
transformer blocks under gradient checkpointing with the same kwargs, so recomputation sees the
mode of the original pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ReferenceMode = Literal["reference", "generate", "joint"]
AttentionBackend = Literal["sdpa", "xformers"]

# CUDA attention kernels launch one grid row per (batch x head); past 65535 rows some kernels
# fail ("invalid configuration argument"). Temporal attention folds H*W into the batch, which at
# 896x512 is 7168 per clip, so it is split into chunks below this bound.
DEFAULT_MAX_ATTENTION_BATCH = 65535


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build on a CPU-only machine
        return False
    return True


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
    if backend == "xformers" and query.is_cuda:
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
    """Keys/values of the reference frame per adapted layer, from one reference pass.

    ``keys[name]``/``values[name]`` have shape ``(B_ref, N, C)``. A generation batch whose size is a
    multiple of ``B_ref`` reads them with its rows grouped contiguously per reference (sample-major),
    so one reference serves all of its frames and all of its context windows.
    """

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    def __len__(self) -> int:
        return len(self.keys)


def _check_plain_self_attention(attn: nn.Module, name: str) -> None:
    # SD1.5's attn1 has none of these; an architecture that does needs a different processor.
    for attribute in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, attribute, None) is not None:
            raise ValueError(f"{name}: Dynamics-Adapter supports plain self-attention only ({attribute} is set)")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        raise ValueError(f"{name}: Dynamics-Adapter expects no residual connection and no output rescale")


class DynamicsAdapterProcessor(nn.Module):
    """Attention processor for one spatial self-attention: frozen SD path + trainable adapter path."""

    def __init__(self, attn: nn.Module, name: str, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        super().__init__()
        _check_plain_self_attention(attn, name)
        self.layer_name = name
        self.backend = backend
        self.max_batch = max_batch
        query_dim, inner_dim = attn.to_q.in_features, attn.to_q.out_features
        out_dim = attn.to_out[0].out_features
        self.q_ff = nn.Linear(query_dim, inner_dim, bias=False)
        self.out_ff = nn.Linear(inner_dim, out_dim, bias=True)
        with torch.no_grad():
            self.q_ff.weight.copy_(attn.to_q.weight)
            nn.init.zeros_(self.out_ff.weight)
            nn.init.zeros_(self.out_ff.bias)

    # diffusers filters cross_attention_kwargs by the processor's __call__ signature, so the
    # reference arguments must be named here, not hidden behind nn.Module's *args/**kwargs.
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
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, reference_mode, reference_features, frames_per_sample)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        reference_mode: ReferenceMode | None,
        reference_features: ReferenceFeatures | None,
        frames_per_sample: int | None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer_name}: the Dynamics-Adapter wraps self-attention without a mask")
        if reference_mode is None:
            raise ValueError(
                f"{self.layer_name}: no reference_mode given; call the UNet through XDynaModel, which runs the reference pass"
            )
        rows, tokens, _ = hidden_states.shape
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        own = multi_head_attention(attn.to_q(hidden_states), key, value, attn.heads, self.backend, self.max_batch)
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
        else:
            raise ValueError(f"{self.layer_name}: unknown reference_mode {reference_mode!r}")

        num_refs = ref_key.shape[0]
        if rows % num_refs:
            raise ValueError(f"{self.layer_name}: {rows} frame rows do not group into {num_refs} references")
        # All frames of one sample share its reference: fold them into one long query sequence
        # instead of repeating the reference keys per frame.
        adapter_query = self.q_ff(hidden_states).reshape(num_refs, (rows // num_refs) * tokens, -1)
        adapter = multi_head_attention(adapter_query, ref_key, ref_value, attn.heads, self.backend, self.max_batch)
        return out + self.out_ff(adapter.reshape(rows, tokens, -1))


class ChunkedAttentionProcessor:
    """Plain (self- or cross-) attention with a selectable kernel, chunked over the batch.

    Used for temporal attention (whose folded batch is large, see ``DEFAULT_MAX_ATTENTION_BATCH``)
    and for the UNet's cross-attention, so one backend switch covers every attention.
    """

    def __init__(self, backend: AttentionBackend = "sdpa", max_batch: int = DEFAULT_MAX_ATTENTION_BATCH):
        self.backend = backend
        self.max_batch = max_batch

    # reference_* are accepted (and ignored) so diffusers does not warn on every call: the UNet
    # passes one cross_attention_kwargs dict to all of its attention layers.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference_mode=None, reference_features=None, frames_per_sample=None):
        if attention_mask is not None:
            raise ValueError("temporal attention takes no mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = multi_head_attention(
            attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads, self.backend, self.max_batch
        )
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
