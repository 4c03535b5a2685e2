"""The noise schedule, shared by training (DDPM) and sampling (DDIM), as one config.

The default, :class:`ScheduleConfig` ``()``, is X-Dyna's release: 1000 steps with *linear* betas
0.00085 -> 0.012 (not SD's scaled_linear), steps_offset 1, clip_sample off, epsilon prediction.
Other schedules are config (``conf/schedule/``): v-prediction, and zero terminal SNR (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), which needs v-prediction
and DDIM's "trailing" timestep spacing so that sampling starts at the last timestep (pure noise).
diffusers implements all of it (``rescale_betas_zero_snr``, ``timestep_spacing``,
``get_velocity``); this module only names the choice and checks it.

Training records the schedule in its checkpoints' hyper-parameters and in its exports; the
pipeline reads it back from there (a checkpoint or export that records none is the default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError

# torch and diffusers are imported by the functions that use them: the config checks of
# xdyna-train and xdyna-launch validate a ScheduleConfig before anything heavy is imported.
if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    """One noise schedule (the ``schedule`` config group); defaults: X-Dyna's release."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "linear"
    # What the network predicts, hence the loss target: the noise (epsilon) or the velocity
    # v = sqrt(a) * noise - sqrt(1 - a) * x0 (v_prediction).
    prediction_type: str = "epsilon"
    # Rescale the betas so the last timestep has zero signal (the model then learns to start from
    # pure noise, as sampling does). Needs v_prediction and timestep_spacing=trailing.
    rescale_betas_zero_snr: bool = False
    # Where DDIM's inference timesteps fall; "trailing" starts at the last one (999).
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    def __post_init__(self) -> None:
        for key, value, choices in (("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                    ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                    ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)):
            if value not in choices:
                raise ConfigError(f"schedule.{key}={value!r}; choose one of {list(choices)}")
        if int(self.num_train_timesteps) < 2:
            raise ConfigError(f"schedule.num_train_timesteps={self.num_train_timesteps}; must be >= 2")
        if not 0 < float(self.beta_start) < float(self.beta_end) < 1:
            raise ConfigError(f"schedule.beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < start < end < 1")
        if self.rescale_betas_zero_snr:
            # At zero SNR the last timestep's input is pure noise: epsilon prediction there is the
            # identity and says nothing about the image, and a sampler that never visits the last
            # timestep (leading/linspace spacing) never starts from what the model learned.
            if self.prediction_type != "v_prediction":
                raise ConfigError("schedule.rescale_betas_zero_snr=true needs schedule.prediction_type=v_prediction "
                                  f"(got {self.prediction_type!r}: epsilon is undefined at zero SNR)")
            if self.timestep_spacing != "trailing":
                raise ConfigError("schedule.rescale_betas_zero_snr=true needs schedule.timestep_spacing=trailing "
                                  f"(got {self.timestep_spacing!r}: sampling must start at the last timestep)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "ScheduleConfig":
        """A schedule from its config mapping; ``None`` (a checkpoint, export or config that
        records none, i.e. written before schedules were configurable) is the default."""
        if mapping is None:
            return cls()
        if isinstance(mapping, ScheduleConfig):
            return mapping
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ConfigError(f"schedule: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(mapping))

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler | DDPMScheduler) -> "ScheduleConfig":
        """The schedule a diffusers scheduler (e.g. a saved pipeline's ``scheduler/``) runs."""
        return cls(**{f.name: scheduler.config[f.name] for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_kwargs(self) -> dict[str, Any]:
        # clip_sample is off for latents (they are not bounded like pixels).
        return {**asdict(self), "clip_sample": False}


def training_scheduler(schedule: ScheduleConfig | None = None) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(schedule or ScheduleConfig()).scheduler_kwargs())


def sampling_scheduler(schedule: ScheduleConfig | None = None) -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(schedule or ScheduleConfig()).scheduler_kwargs(), set_alpha_to_one=False)


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """One timestep per sample, shared by all its frames and its reference."""
    import torch

    return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``latents (B, F, C, h, w)`` noised at per-sample ``timesteps (B,)``."""
    import torch

    alphas = scheduler.alphas_cumprod.to(latents.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    signal = alphas.sqrt().reshape(shape)
    sigma = (1 - alphas).sqrt().reshape(shape)
    return (signal * latents.float() + sigma * noise.float()).to(latents.dtype)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict for ``latents`` noised with ``noise`` at ``timesteps``,
    float32: the noise (epsilon) or diffusers' velocity (v_prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents.float(), noise.float(), timesteps)
    raise ConfigError(f"schedule.prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}")
