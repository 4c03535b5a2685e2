"""AnimateDiff-style motion modules that leave the reference frame out of temporal attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn


@dataclass
class FrameLayout:
    """How the frames of the current UNet call are laid out, shared by all motion modules.

    ``reference``: a reference-only pass, temporal attention is skipped; ``generate``: every frame
    is generated; ``joint``: frame 0 of each sample is the reference and is passed through unchanged
    (positions then cover the generated frames only, as in the X-Dyna release).

    Motion modules are never re-run by gradient checkpointing (diffusers checkpoints resnets and
    transformer blocks only), so reading this shared state at call time is safe.
    """

    mode: str = "generate"


class ReferenceAwareMotionModule(AnimateDiffTransformer3D):
    """An :class:`AnimateDiffTransformer3D` that honours a :class:`FrameLayout`.

    Installed by swapping the class of diffusers' modules in place, so parameter names (and with
    them every AnimateDiff checkpoint's keys) stay exactly as diffusers lays them out.
    """

    frame_layout: FrameLayout

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None, num_frames=1, cross_attention_kwargs=None):
        mode = self.frame_layout.mode
        if mode == "reference":
            return hidden_states
        if mode == "generate":
            return super().forward(hidden_states, num_frames=num_frames)
        if mode != "joint":
            raise ValueError(f"unknown frame layout mode {mode!r}")
        rows, channels, height, width = hidden_states.shape
        frames = hidden_states.reshape(rows // num_frames, num_frames, channels, height, width)
        generated = super().forward(frames[:, 1:].reshape(-1, channels, height, width), num_frames=num_frames - 1)
        generated = generated.reshape(frames.shape[0], num_frames - 1, channels, height, width)
        return torch.cat([frames[:, :1], generated], dim=1).reshape(rows, channels, height, width)


def install_frame_layout(unet: nn.Module) -> FrameLayout:
    """Make every motion module of ``unet`` reference-aware; returns the layout they share."""
    layout = FrameLayout()
    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            module.__class__ = ReferenceAwareMotionModule
            module.frame_layout = layout
            count += 1
    if count == 0:
        raise ValueError("the UNet has no motion modules")
    return layout


def zero_init_motion_outputs(unet: nn.Module) -> int:
    """Zero the output projection of every motion module (AnimateDiff's init: identity at start)."""
    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
            count += 1
    return count
