"""Memory that is cheap to save and often forgotten, each measured on the tiny model (the SD1.5
figures are in docs/performance.md, "Cheap memory"): frozen weights hold no gradient and no
optimizer state, the empty-prompt text embedding is computed once at build time (the text encoder
is not kept), the VAE encode runs chunked under no_grad (its peak grows with the chunk, not with
the clip)."""

from __future__ import annotations

import pytest
import torch
import transformers

from xdyna.models import ModelConfig
from xdyna.models.memory import vae_encode_memory

STAGES = {"stage1": ["dynamics_adapter", "motion_modules", "pose_controlnet"], "stage2": ["face_controlnet"]}


def _module(stage: str, **model):
    from xdyna.train.module import XDynaTrainingModule

    return XDynaTrainingModule(model={"flavour": "tiny", **model},
                               stage={"trainable": STAGES[stage], "conditions": ["pose", "face"] if stage == "stage2" else ["pose"],
                                      "optim": {"lr": 1e-3, "warmup_steps": 1}})


@pytest.fixture
def text_encoder_calls(monkeypatch):
    """Counts forward calls of every CLIP text encoder (the class's forward, so any instance)."""
    calls = [0]
    forward = transformers.CLIPTextModel.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPTextModel, "forward", counted)
    return calls


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_frozen_weights_hold_no_gradient_and_no_optimizer_state(stage, make_batch):
    """After two optimizer steps, every frozen parameter (VAE, the SD UNet, the other stage's
    networks) has ``.grad is None`` and no Adam state; the optimizer holds the trainable ones only.
    Measured: the bytes this spares (a float32 gradient and two Adam moments per frozen weight)."""
    module = _module(stage)
    optimizer = module.configure_optimizers()["optimizer"]
    for seed in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        module.diffusion_loss(make_batch(batch=1, frames=2, height=64, width=64, seed=seed)).backward()
        optimizer.step()
    named = dict(module.named_parameters())
    frozen = {name for name, p in named.items() if not p.requires_grad}
    trainable = set(named) - frozen
    assert any(name.startswith("model.vae.") for name in frozen)
    assert [name for name in frozen if named[name].grad is not None] == []
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(named[name]) for name in trainable}
    assert {id(p) for p in optimizer.state} <= held and len(optimizer.state) == len(held)
    frozen_count = sum(named[name].numel() for name in frozen)
    spared = frozen_count * (4 + 8)  # float32 gradient + Adam's exp_avg and exp_avg_sq
    print(f"{stage}: {frozen_count} frozen parameters, {spared} bytes of gradient + Adam state spared")
    assert spared > 0


def test_empty_prompt_is_encoded_once_at_build_and_never_in_training(text_encoder_calls, make_batch):
    """X-Dyna's text prompt is empty: its CLIP encoding is a constant. The text encoder runs once,
    when the model is built, and is not kept (no CLIPTextModel in the module, its weights freed);
    training steps reuse ``model.prompt_embeds``."""
    module = _module("stage1")
    assert text_encoder_calls[0] == 1
    assert not any(isinstance(m, transformers.CLIPTextModel) for m in module.modules())
    embeds = module.model.prompt_embeds
    assert embeds.shape[0] == 1 and "prompt_embeds" not in module.model.state_dict()  # a constant, not a weight
    optimizer = module.configure_optimizers()["optimizer"]
    for seed in range(2):
        module.diffusion_loss(make_batch(batch=1, frames=2, height=64, width=64, seed=seed)).backward()
        optimizer.step()
    assert text_encoder_calls[0] == 1
    print(f"prompt_embeds: {embeds.numel() * embeds.element_size()} bytes kept")


def test_vae_encode_is_chunked_under_no_grad_and_its_peak_follows_the_chunk():
    """``encode_video`` on the real tiny VAE, its parameters requiring grad: no autograd graph (the
    latents carry no grad_fn; after the encode only the latents are alive), and the peak above the
    input grows with ``vae_chunk_size``, linearly, not with the clip: 8 frames at chunk 2 peak as 4
    frames at chunk 2 (plus their larger latents). The fake-tensor run (what sizes SD1.5) counts
    the same bytes as the real one."""
    frames, size = 4, 64
    peaks = {}
    for chunk in (1, 2, 4):
        real = vae_encode_memory(ModelConfig(vae_chunk_size=chunk), frames, size, size, fake=False, block=1)
        assert not real["has_graph"]
        assert real["alive_after_bytes"] == real["latents_bytes"]
        assert vae_encode_memory(ModelConfig(vae_chunk_size=chunk), frames, size, size, fake=True, block=1) == real
        peaks[chunk] = real["peak_bytes"]
    print("tiny VAE encode peak bytes by chunk:", peaks)
    assert peaks[1] < peaks[2] < peaks[4]
    # Linear in the chunk (within 5 %: the latents of finished chunks are alive too).
    assert peaks[4] / peaks[1] == pytest.approx(4, rel=0.05) and peaks[2] / peaks[1] == pytest.approx(2, rel=0.05)
    longer = vae_encode_memory(ModelConfig(vae_chunk_size=2), 2 * frames, size, size, fake=False, block=1)
    assert longer["peak_bytes"] - peaks[2] <= longer["latents_bytes"]
