"""AnimateDiff-style motion modules that leave the reference frame out of temporal attention, and
GroupNorms whose statistics span one frame or all frames of a sample."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn


@dataclass
class FrameLayout:
    """How the frames of the current UNet call are laid out, shared by all motion modules and
    frame GroupNorms.

    ``mode``: ``reference`` (a reference-only pass, temporal attention is skipped), ``generate``
    (every frame is generated) or ``joint`` (frame 0 of each sample is the reference and is passed
    through unchanged; positions then cover the generated frames only, as in the X-Dyna release).
    ``frames``: frames per sample in the batch rows of this call (the reference included in joint
    mode), which cross-frame GroupNorms need to regroup ``(B*F, C, H, W)`` rows.

    Modules read this shared state at call time. Gradient checkpointing re-runs ResNets and
    transformer blocks during backward, when the state may describe another call: the UNet is
    given :func:`layout_preserving_checkpoint`, which restores the state of the original call.
    """

    mode: str = "generate"
    frames: int = 1

    @contextlib.contextmanager
    def use(self, mode: str, frames: int) -> Iterator[None]:
        previous = (self.mode, self.frames)
        self.mode, self.frames = mode, frames
        try:
            yield
        finally:
            self.mode, self.frames = previous


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


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover one frame (``across_frames=False``) or all frames of a sample.

    Inputs are per-frame rows ``(B*F, C, H, W)`` (ResNets; ``F`` from the frame layout) or
    ``(B, C, F, H, W)`` (diffusers' motion modules). AnimateDiff v1, and with it the X-Dyna release,
    applies ``nn.GroupNorm`` to 5-D video tensors in its ResNets (statistics over all frames, the
    reference frame included) but normalises motion-module inputs per frame; diffusers does the
    opposite. Swapping the class in place keeps parameter names.
    """

    frame_layout: FrameLayout
    across_frames: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            if self.across_frames:
                return super().forward(x)
            batch, channels, frames = x.shape[:3]
            rows = x.transpose(1, 2).reshape(batch * frames, channels, *x.shape[3:])
            return super().forward(rows).reshape(batch, frames, channels, *x.shape[3:]).transpose(1, 2)
        frames = self.frame_layout.frames
        if not self.across_frames or frames <= 1:
            return super().forward(x)
        rows, channels = x.shape[:2]
        if rows % frames:
            raise ValueError(f"{rows} rows do not group into samples of {frames} frames")
        video = x.reshape(rows // frames, frames, channels, *x.shape[2:]).transpose(1, 2)
        return super().forward(video).transpose(1, 2).reshape(x.shape)


def install_frame_layout(unet: nn.Module, resnet_across_frames: bool = False, motion_across_frames: bool = True) -> FrameLayout:
    """Make every motion module and UNet GroupNorm of ``unet`` frame-aware; returns the shared layout.

    The UNet's GroupNorms outside the transformers (ResNets and ``conv_norm_out``) follow
    ``resnet_across_frames``; the motion modules' input norm follows ``motion_across_frames``; the
    spatial transformers' norms work per frame in every implementation and stay as they are.
    """
    layout = FrameLayout()
    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            module.__class__ = ReferenceAwareMotionModule
            module.frame_layout = layout
            _make_frame_norm(module.norm, layout, motion_across_frames)
            count += 1
    if count == 0:
        raise ValueError("the UNet has no motion modules")
    for name, module in unet.named_modules():
        if type(module) is nn.GroupNorm and (".resnets." in name or name == "conv_norm_out"):
            _make_frame_norm(module, layout, resnet_across_frames)
    return layout


def _make_frame_norm(norm: nn.GroupNorm, layout: FrameLayout, across_frames: bool) -> None:
    norm.__class__ = FrameGroupNorm
    norm.frame_layout = layout
    norm.across_frames = across_frames


class LayoutPreservingCheckpoint:
    """A ``gradient_checkpointing_func`` for diffusers that re-runs a block under the frame layout
    of its original call (non-reentrant torch checkpointing, as diffusers uses by default).

    An object rather than a closure so that ``copy.deepcopy`` of a model rebinds it to the copy's
    layout.
    """

    def __init__(self, layout: FrameLayout):
        self.layout = layout

    def __call__(self, module: nn.Module, *args):
        state = replace(self.layout)
        layout = self.layout

        def run(*inputs):
            with layout.use(state.mode, state.frames):
                return module(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def set_motion_norm_groups(unet: nn.Module, groups: int) -> int:
    """Give every motion module's input GroupNorm ``groups`` groups; returns how many it changed.

    diffusers' ``UNetMotionModel.from_unet2d`` (0.42) builds the motion modules with the ResNets'
    group count and ignores the MotionAdapter's ``motion_norm_num_groups``; the weights (one per
    channel) do not depend on the count, only the statistics do.
    """
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, AnimateDiffTransformer3D):
            if module.norm.num_channels % groups:
                raise ValueError(f"{name}.norm: {module.norm.num_channels} channels do not split into {groups} groups")
            module.norm.num_groups = groups
            count += 1
    return count


def zero_init_motion_outputs(unet: nn.Module) -> int:
    """Zero the output projection of every motion module (AnimateDiff's init: identity at start)."""
    count = 0
    for module in unet.modules():
        if isinstance(module, AnimateDiffTransformer3D):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
            count += 1
    return count
