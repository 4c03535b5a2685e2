"""The block kinds and policies of ``model.activation_checkpointing`` and ``model.compile``, and
their resolution: names only, no torch.

The config checks (``xdyna.models.config.ModelConfig.validate``, the config rules of
``xdyna-train`` and ``xdyna-launch``) resolve these settings before anything heavy is imported;
:mod:`xdyna.models.activation_checkpointing` and :mod:`xdyna.models.compile`, which apply them to
a model, re-export what is defined here.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

UNET_KINDS = ("resnets", "attentions", "motion")
NETWORK_KINDS = ("pose_controlnet", "face_controlnet", "reference_net")
KINDS = (*UNET_KINDS, *NETWORK_KINDS)
CHECKPOINT_POLICIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "diffusers": (),  # diffusers' own flags, set by the model build (see resolve_policy)
    "unet": UNET_KINDS,
    "all": KINDS,
}
COMPILE_KEY = "model.compile"
COMPILE_POLICIES: dict[str, tuple[str, ...]] = {"none": (), "unet": UNET_KINDS, "all": KINDS}


def resolve_kinds(value: Any, key: str, policies: dict[str, tuple[str, ...]]) -> tuple[str, tuple[str, ...]]:
    """``(name, kinds)`` of a per-block-kind setting (``key`` names it in errors): a policy name of
    ``policies``, one kind or a list of kinds (named after the policy with the same kinds, else
    ``kind+kind``). Shared by ``model.activation_checkpointing`` and ``model.compile``."""
    if isinstance(value, str):
        if value in policies:
            return value, policies[value]
        if value not in KINDS:
            raise ConfigError(f"{key}={value!r}: choose a policy {tuple(policies)} or a list of block kinds {KINDS}")
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(kind, str) for kind in value):
        raise ConfigError(f"{key}={value!r}: expected a policy name {tuple(policies)} or a list of block kinds {KINDS}")
    unknown = [kind for kind in value if kind not in KINDS]
    if unknown:
        raise ConfigError(f"{key}: unknown block kind(s) {unknown}; known: {KINDS} (or a policy: {tuple(policies)})")
    kinds = tuple(kind for kind in KINDS if kind in value)
    names = [name for name, members in policies.items() if members == kinds and name != "diffusers"]
    return (names[0] if names else "+".join(kinds)), kinds


def resolve_policy(value: Any, gradient_checkpointing: bool = False) -> tuple[str, tuple[str, ...]]:
    """``(name, kinds)`` of ``model.activation_checkpointing``: a policy name, a list of kinds, or
    None (then ``gradient_checkpointing`` decides between ``diffusers`` and ``none``)."""
    if value is None:
        return ("diffusers", ()) if gradient_checkpointing else ("none", ())
    return resolve_kinds(value, "model.activation_checkpointing", CHECKPOINT_POLICIES)


def resolve_compile(value: Any) -> tuple[str, tuple[str, ...]]:
    """``(name, kinds)`` of ``model.compile``: null or a policy name, one kind or a list of kinds."""
    return ("none", ()) if value is None else resolve_kinds(value, COMPILE_KEY, COMPILE_POLICIES)


def engine_refusal(value: Any, zero_stage: int | None) -> str | None:
    """Why ``model.compile=value`` cannot run under DeepSpeed ZeRO ``zero_stage`` (None: not
    DeepSpeed), or None when it can. One line, for the config rule (xdyna/models/compile.py says
    why ZeRO-3 is refused)."""
    name, kinds = resolve_compile(value)
    if not kinds or zero_stage != 3:
        return None
    return (f"{COMPILE_KEY}={name} does not work with DeepSpeed ZeRO-3 (its per-layer parameter gather hooks are "
            f"excluded from torch.compile: every compiled block breaks at its first layer and runs eagerly): use "
            f"trainer/strategy=deepspeed_zero2 or ddp, or set {COMPILE_KEY}=none")
