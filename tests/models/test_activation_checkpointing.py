"""Selective activation checkpointing by block kind: same loss and gradients as the unchecked
model, fewer tensors saved for backward, one clear error for a bad policy."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import latent_inputs, perturb, tiny_model

from xdyna.errors import ConfigError
from xdyna.models.activation_checkpointing import (
    KINDS,
    apply_activation_checkpointing,
    checkpointed_kinds,
    resolve_policy,
)
from xdyna.models.memory import LiveTensorMemory

STAGE1 = ("dynamics_adapter", "motion_modules", "pose_controlnet")


def _step(model, policy, tracked: bool = False):
    """Loss, gradients of the trainable parameters, and bytes the forward leaves for backward:
    the sizes of the tensors autograd saves (its saved-tensor hooks; a checkpointed block saves
    its inputs only), or with ``tracked`` the live tensors after the forward, counted by the
    tracker the predictor uses (slow: it sees every op)."""
    if policy is not None:
        apply_activation_checkpointing(model, policy)
    params = model.set_trainable(STAGE1)
    model.train()
    noisy, reference, timesteps, pose, face = latent_inputs()
    saved_bytes = [0]

    def pack(tensor):
        saved_bytes[0] += tensor.numel() * tensor.element_size()
        return tensor

    if tracked:
        tracker = LiveTensorMemory(1, existing=[*model.parameters(), *model.buffers()])
        with tracker:
            loss = model.denoise(noisy, timesteps, reference, pose, face).square().mean()
            saved = tracker.current
            loss.backward()
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model.denoise(noisy, timesteps, reference, pose, face).square().mean()
        saved = saved_bytes[0]
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], saved


def test_each_kind_keeps_loss_and_gradients_and_saves_less():
    """Checkpointed blocks recompute in backward under the frame layout of their first call
    (cross-frame GroupNorms and motion modules read it, hence across_frames): the result must not
    change. The S-Face ControlNet is frozen and off the gradient path in stage 1 (nothing saved to
    spare), and the Dynamics-Adapter model has no ReferenceNet: both are left to the next test."""
    base = tiny_model(resnet_groupnorm="across_frames")
    perturb(base)
    loss, grads, saved = _step(copy.deepcopy(base), None)
    for policy in [["resnets"], ["attentions"], ["motion"], ["pose_controlnet"], "all"]:
        model = copy.deepcopy(base)
        checked_loss, checked_grads, checked_saved = _step(model, policy)
        assert checkpointed_kinds(model), policy
        torch.testing.assert_close(checked_loss, loss, atol=1e-6, rtol=1e-5)
        for a, b in zip(checked_grads, grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert checked_saved < saved, (policy, checked_saved, saved)


def test_predictor_tracker_sees_less_live_memory_when_everything_is_checkpointed():
    base = tiny_model(resnet_groupnorm="across_frames")
    perturb(base)
    _, _, live = _step(copy.deepcopy(base), None, tracked=True)
    _, _, checked_live = _step(copy.deepcopy(base), "all", tracked=True)
    assert checked_live < live, (checked_live, live)


def test_policy_wraps_the_named_kinds_only_and_survives_deepcopy():
    model = tiny_model()
    counts = apply_activation_checkpointing(model, ["motion", "pose_controlnet"])
    assert set(counts) == {"motion", "pose_controlnet"} and all(counts.values())
    assert checkpointed_kinds(copy.deepcopy(model)) == counts
    # diffusers' own flags are off: no block is checkpointed twice.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    full = tiny_model()
    assert set(apply_activation_checkpointing(full, "all")) == set(KINDS) - {"reference_net"}


def test_policy_errors_name_the_key():
    assert resolve_policy(None, gradient_checkpointing=True) == ("diffusers", ())
    assert resolve_policy(["motion", "resnets"]) == ("resnets+motion", ("resnets", "motion"))
    assert resolve_policy(["resnets", "attentions", "motion"]) == ("unet", ("resnets", "attentions", "motion"))
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing: unknown block kind\(s\) \['motoin'\]"):
        resolve_policy(["motoin"])
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing='most': choose a policy"):
        resolve_policy("most")
    with pytest.raises(ConfigError, match=r"'reference_net' is not part of this model"):
        apply_activation_checkpointing(tiny_model(), ["reference_net"])
