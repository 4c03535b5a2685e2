"""The LightningModule's objective, trainable sets and checkpoint filtering, in-process."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from xdyna.train.cli import CONF_DIR
from xdyna.train.module import CheckpointMismatchError, XDynaTrainingModule


def stage_config(name: str, **optim) -> dict:
    stage = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "stage" / f"{name}.yaml"))
    stage.setdefault("optim", {}).update(optim)  # the file names only what differs from OptimConfig
    return stage


def tiny_model_config(**overrides) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    config.update(overrides)
    return config


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_one_step_changes_exactly_the_stage_parameters(stage, make_batch):
    module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config(stage, lr=1e-3, warmup_steps=1))
    optimizer = module.configure_optimizers()["optimizer"]
    # Leave the zero-init state (where zero output layers block the gradient to everything behind
    # them), as any step after the first does.
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.manual_seed(0)
    loss = module.diffusion_loss(make_batch(frames=3))
    loss.backward()
    optimizer.step()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    groups = module.model.component_parameters()
    stage_names = {f"model.{n}" for c in module.trainable_components for n, _ in groups[c]}
    assert trainable == stage_names
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == stage_names
    # The optimizer holds the stage's parameters and nothing else.
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in module.named_parameters() if n in stage_names}


def test_overfit_one_fixed_batch_lowers_the_loss(make_batch):
    module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage1", lr=2e-3, warmup_steps=1, weight_decay=0.0))
    optimizer = module.configure_optimizers()["optimizer"]
    batch = make_batch(batch=1, frames=2)
    losses = []
    start = module.objective_rng_state()
    for _ in range(25):
        module.load_objective_rng_state(start)  # same VAE sample, noise and timestep every step: one fixed problem
        loss = module.diffusion_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_keeps_only_trainable_weights_and_rejects_foreign_ones():
    module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage2"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == module.trainable_state_keys()
    assert all(k.startswith("model.face_controlnet.") for k in kept)
    module.on_load_checkpoint(checkpoint)  # its own checkpoint loads

    foreign = dict(checkpoint["state_dict"], **{"model.someone_else.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="1 key\(s\) with no counterpart"):
        module.on_load_checkpoint({"state_dict": foreign})
    key = next(iter(kept))
    wrong = dict(checkpoint["state_dict"], **{key: torch.zeros(1, 2, 3)})
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        module.on_load_checkpoint({"state_dict": wrong})
    partial = dict(list(checkpoint["state_dict"].items())[1:])
    with pytest.raises(CheckpointMismatchError, match="required key\\(s\\) missing"):
        module.on_load_checkpoint({"state_dict": partial})


def test_uint8_batches_mean_the_same_as_float_batches():
    from xdyna.train.batches import to_float_batch

    raw = {
        "video": torch.tensor([0, 255, 51], dtype=torch.uint8),
        "reference": torch.tensor([255], dtype=torch.uint8),
        "pose": torch.tensor([0, 255], dtype=torch.uint8),
        "face": torch.tensor([51], dtype=torch.uint8),
        "is_scene": torch.tensor([True]),
    }
    out = to_float_batch(raw)
    torch.testing.assert_close(out["video"], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    torch.testing.assert_close(out["reference"], torch.tensor([1.0]))
    torch.testing.assert_close(out["pose"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out["face"], torch.tensor([0.2]))
    assert out["is_scene"] is raw["is_scene"]
    floats = {"video": torch.tensor([0.5])}
    assert to_float_batch(floats)["video"] is floats["video"]  # float batches pass through untouched


@pytest.mark.parametrize(
    "model_overrides, trainable",
    [
        ({"image_prompt": True}, ["dynamics_adapter", "motion_modules", "pose_controlnet"]),
        ({"reference": "ip_adapter", "image_prompt": True}, ["image_prompt", "motion_modules", "pose_controlnet"]),
    ],
    ids=["xdyna-with-image-prompt", "w_ipa"],
)
def test_image_prompt_models_train_and_sample(model_overrides, trainable, make_batch):
    from xdyna.pipelines import sample_clip

    stage = stage_config("stage1", lr=1e-3, warmup_steps=1)
    stage["trainable"] = trainable
    module = XDynaTrainingModule(model=tiny_model_config(**model_overrides), stage=stage)
    batch = make_batch(batch=1, frames=2, face=False)
    loss = module.diffusion_loss(batch)
    loss.backward()
    groups = module.model.component_parameters()
    assert all(p.grad is not None for name in trainable for _, p in groups[name])
    video = sample_clip(module.model, batch["reference"], batch["pose"], num_inference_steps=2)
    assert video.shape == batch["video"].shape and torch.isfinite(video).all()


def test_non_finite_loss_names_the_first_module_that_went_non_finite(make_batch):
    from xdyna.train.module import NonFiniteLossError

    module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage1"))
    batch = make_batch(batch=1, frames=2, face=False)
    culprit_name = "unet.down_blocks.0.resnets.0.conv1"
    culprit = module.model.get_submodule(culprit_name)
    calls = []

    def poison(m, args, output):
        calls.append(1)
        return output * float("nan")

    handle = culprit.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"first non-finite output: " + culprit_name.replace(".", r"\.") + r" \(Conv2d\)"):
        module.training_step(batch, 0)
    handle.remove()

    # Only the first pass goes wrong (the step ran the module as often as its replay did): the
    # replay says the source is not deterministic.
    per_pass = len(calls) // 2
    seen = []

    def poison_first_pass(m, args, output):
        seen.append(1)
        return output * float("nan") if len(seen) <= per_pass else None

    handle = culprit.register_forward_hook(poison_first_pass)
    with pytest.raises(NonFiniteLossError, match="not reproduced by a replay"):
        module.training_step(batch, 0)
    handle.remove()

    bad = dict(batch, pose=batch["pose"].clone())
    bad["pose"][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="the batch's 'pose' already holds NaN/inf"):
        module.training_step(bad, 0)
