"""The noise schedule is config: the default is the release's schedule bit for bit, v-prediction
trains on diffusers' velocity, zero terminal SNR samples from pure noise, and training records the
schedule where the pipeline and xdyna-animate read it back (old checkpoints: the default)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xdyna.diffusion import ScheduleConfig, sampling_scheduler, training_scheduler, training_target
from xdyna.errors import ConfigError
from xdyna.models import ModelConfig, build_model
from xdyna.train.cli import CONF_DIR

# xdyna/diffusion.py's constants before the schedule became config, copied here on purpose: the
# default must keep producing exactly these schedulers.
OLD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)
STAGE1 = ["dynamics_adapter", "motion_modules", "pose_controlnet"]


def composed_schedule(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="train", overrides=[f"schedule={name}"]).schedule)


V_ZERO_SNR = ScheduleConfig.from_mapping(composed_schedule("v_zero_snr"))


def public(config) -> dict:
    """A scheduler config as saved (diffusers keeps which values were defaulted in "_" keys, never saved)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_default_schedule_is_the_old_constants_exactly():
    assert public(training_scheduler().config) == public(DDPMScheduler(**OLD_SCHEDULE).config)
    assert public(sampling_scheduler().config) == public(DDIMScheduler(**OLD_SCHEDULE, set_alpha_to_one=False).config)
    assert torch.equal(training_scheduler().alphas_cumprod, DDPMScheduler(**OLD_SCHEDULE).alphas_cumprod)
    # The default config file is the dataclass's defaults, and every file composes into a valid schedule.
    assert ScheduleConfig.from_mapping(composed_schedule("epsilon")) == ScheduleConfig()
    assert sorted(p.stem for p in (CONF_DIR / "schedule").glob("*.yaml")) == ["epsilon", "v_zero_snr"]


def test_zero_terminal_snr_ends_in_pure_noise_and_sampling_starts_there():
    assert V_ZERO_SNR.prediction_type == "v_prediction"
    assert training_scheduler(V_ZERO_SNR).alphas_cumprod[-1] == 0
    sampler = sampling_scheduler(V_ZERO_SNR)
    assert sampler.alphas_cumprod[-1] == 0
    sampler.set_timesteps(25)
    assert int(sampler.timesteps[0]) == 999
    default = sampling_scheduler()
    default.set_timesteps(25)
    assert int(default.timesteps[0]) == 961 and default.alphas_cumprod[-1] > 0


@pytest.mark.parametrize("bad, culprit", [
    (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), "prediction_type=v_prediction"),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), "timestep_spacing=trailing"),
    (dict(prediction_type="sample"), "schedule.prediction_type='sample'"),
    (dict(betas=[0.1]), r"unknown key\(s\) \['betas'\]"),
])
def test_bad_schedules_are_refused_naming_the_key(bad, culprit):
    with pytest.raises(ConfigError, match=culprit):
        ScheduleConfig.from_mapping(bad)


def test_v_prediction_target_is_diffusers_velocity():
    scheduler = training_scheduler(V_ZERO_SNR)
    latents, noise = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    timesteps = torch.tensor([0, 999])
    velocity = DDPMScheduler.from_config(scheduler.config).get_velocity(latents, noise, timesteps)
    assert torch.equal(training_target(scheduler, latents, noise, timesteps), velocity)
    assert torch.equal(velocity[1], -latents[1])  # zero SNR: at the last timestep v is minus the clean latent
    assert torch.equal(training_target(training_scheduler(), latents, noise, timesteps), noise)


def test_training_loss_regresses_the_schedule_target(make_batch, monkeypatch):
    """The module's loss is the MSE to the velocity under v-prediction (spied on diffusers'
    get_velocity) and to the noise under the default, and hparams record the schedule in full."""
    from tests.test_train_module import stage_config, tiny_model_config
    from xdyna.train.module import XDynaTrainingModule

    batch = make_batch(batch=1, frames=2)
    for schedule in (None, V_ZERO_SNR.to_dict()):
        module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage1"), schedule=schedule)
        assert module.hparams["schedule"] == (schedule or ScheduleConfig().to_dict())
        seen = {}
        draw, velocity = module.draw_noise_and_timesteps, module.noise_scheduler.get_velocity
        monkeypatch.setattr(module, "draw_noise_and_timesteps", lambda latents: seen.setdefault("noise", draw(latents)))
        monkeypatch.setattr(module.noise_scheduler, "get_velocity", lambda *a: seen.setdefault("velocity", velocity(*a)))
        monkeypatch.setattr(module.model, "forward", lambda noisy, *args, **kwargs: torch.zeros_like(noisy))
        loss = module.diffusion_loss(batch)
        target = seen["velocity"] if schedule else seen["noise"][0]
        assert "velocity" in seen if schedule else "velocity" not in seen
        assert torch.allclose(loss, target.float().pow(2).mean(), rtol=1e-6)


def fake_checkpoint(path, model, schedule):
    state = {f"model.{name}": param.detach().clone() for component in STAGE1
             for name, param in model.component_parameters()[component]}
    hyper = {"model": {"flavour": "tiny"}, "stage": {}}
    if schedule is not None:
        hyper["schedule"] = schedule
    torch.save({"state_dict": state, "hyper_parameters": hyper, "global_step": 1}, path)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig())


def test_v_prediction_export_samples_as_v_prediction(tmp_path, tiny_model, monkeypatch):
    from xdyna.pipelines.cli import load_pipeline
    from xdyna.pipelines.pipeline import XDynaPipeline, export_model_config
    from xdyna.train.export import export_run

    checkpoint = fake_checkpoint(tmp_path / "step=000001.ckpt", tiny_model, V_ZERO_SNR.to_dict())
    export = export_run(tmp_path / "run", checkpoint, model=tiny_model)
    assert json.loads((export / "export.json").read_text())["schedule"] == V_ZERO_SNR.to_dict()
    # The library and xdyna-animate's loading both sample with the recorded schedule.
    assert XDynaPipeline.from_export(tmp_path / "run").schedule == V_ZERO_SNR
    args = argparse.Namespace(weights_kind="export", export_config=export_model_config(export), pretrained=str(export),
                              device="cpu", dtype="fp32")
    pipeline = load_pipeline(args)
    assert pipeline.schedule == V_ZERO_SNR
    assert XDynaPipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "pipe")).schedule == V_ZERO_SNR
    # And a call runs DDIM steps that read the output as a velocity, from timestep 999.
    steps = []
    step = DDIMScheduler.step
    monkeypatch.setattr(DDIMScheduler, "step", lambda self, out, t, *a, **k: steps.append(
        (self.config.prediction_type, int(t))) or step(self, out, t, *a, **k))
    pipeline(torch.zeros(3, 64, 64), torch.zeros(2, 3, 64, 64), num_inference_steps=2, seed=0)
    assert steps == [("v_prediction", 999), ("v_prediction", 499)]


def test_checkpoints_without_a_schedule_load_as_the_default(tmp_path, tiny_model):
    from xdyna.pipelines import PipelineFormatError, XDynaPipeline
    from xdyna.pipelines.pipeline import read_training_checkpoint
    from xdyna.train.export import export_run

    old = fake_checkpoint(tmp_path / "old.ckpt", tiny_model, None)
    assert read_training_checkpoint(old)[2] == ScheduleConfig()
    assert XDynaPipeline.from_checkpoints([old]).schedule == ScheduleConfig()
    export = export_run(tmp_path / "run", old, model=tiny_model)
    manifest_file = export / "export.json"
    assert json.loads(manifest_file.read_text())["schedule"] == ScheduleConfig().to_dict()
    # An export written before schedules were recorded.
    manifest = json.loads(manifest_file.read_text())
    del manifest["schedule"]
    manifest_file.write_text(json.dumps(manifest))
    assert XDynaPipeline.from_export(export).schedule == ScheduleConfig()
    # Stacked checkpoints must agree on the schedule.
    v_pred = fake_checkpoint(tmp_path / "v.ckpt", tiny_model, V_ZERO_SNR.to_dict())
    with pytest.raises(PipelineFormatError, match="another noise schedule"):
        XDynaPipeline.from_checkpoints([old, v_pred])
