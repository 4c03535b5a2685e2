"""LightningModule for X-Dyna's denoising objective."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from ..errors import ConfigError, XDynaUserError
from ..diffusion import ScheduleConfig, add_noise, sample_timesteps, training_scheduler, training_target
from ..latents import sample_cached
from .batches import to_float_batch
from .collectives import any_rank
from .nonfinite import first_non_finite
from .rank_rng import rank_generator
from .stage_config import DEFAULT_CONDITIONS, OptimConfig  # the stage's defaults, one place (its schema)
from ..models.loading import mismatch_problems
from ..models import ModelConfig, XDynaModel, build_model

CONDITIONS = ("pose", "face")


class CheckpointMismatchError(XDynaUserError, RuntimeError):
    """A checkpoint does not belong to this model/stage."""


class NonFiniteLossError(XDynaUserError, FloatingPointError):
    """The loss became NaN or infinite: the run stops instead of training on garbage."""


class XDynaTrainingModule(L.LightningModule):
    """MSE between the network's prediction and the schedule's target (the noise for epsilon
    prediction, the velocity for v-prediction) on the generated frames; only the stage's
    components train.

    ``schedule``: the ``schedule`` config group (:class:`xdyna.diffusion.ScheduleConfig`; ``None``
    is the default). The hyper-parameters, hence every checkpoint, record it in full, so the
    export and the pipeline sample with the schedule the model was trained on.

    Checkpoints hold the trainable weights only (the frozen SD1.5 weights are rebuilt from their
    folders), so ``strict_loading`` is off and :meth:`on_load_checkpoint` checks keys itself.
    """

    def __init__(self, model: Mapping[str, Any], stage: Mapping[str, Any], seed: int = 0,
                 schedule: Mapping[str, Any] | None = None):
        super().__init__()
        self.schedule = ScheduleConfig.from_mapping(schedule)
        self.save_hyperparameters()
        # Recorded resolved, not as given: a checkpoint of a run configured with defaults says so.
        self.hparams["schedule"] = self.schedule.to_dict()
        # Seeds this rank's objective stream (see :mod:`xdyna.train.rank_rng`); the generator is
        # made on first use, once the rank and device are known.
        self.seed = int(seed)
        self._objective_generator: torch.Generator | None = None
        self.model_config = ModelConfig.from_mapping(model)
        self.trainable_components = list(stage["trainable"])
        self.conditions = list(stage.get("conditions", DEFAULT_CONDITIONS))
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown:
            raise ConfigError(f"stage.conditions: unknown {unknown}; known: {list(CONDITIONS)}")
        if "face" in self.conditions and self.model_config.face == "none":
            raise ConfigError("stage.conditions includes face but model.face=none has no S-Face ControlNet")

        self.optim = OptimConfig.from_mapping(stage.get("optim"))
        self.model: XDynaModel = build_model(self.model_config)
        self.model.set_trainable(self.trainable_components)
        self.noise_scheduler = training_scheduler(self.schedule)
        self.strict_loading = False

    # ------------------------------------------------------------------ objective
    def objective_generator(self) -> torch.Generator:
        """This rank's generator for every random draw of the objective: seeded from (seed, global
        rank), so ranks draw different noise and timesteps while model init stays identical."""
        device = self.device if self.device.type != "cpu" else torch.device("cpu")  # cpu:<local rank> on the DeepSpeed CPU path
        if self._objective_generator is None or self._objective_generator.device != device:
            self._objective_generator = rank_generator(self.seed, self.global_rank, device)
        return self._objective_generator

    def objective_rng_state(self) -> torch.Tensor:
        return self.objective_generator().get_state()

    def load_objective_rng_state(self, state: torch.Tensor) -> None:
        self.objective_generator().set_state(state)

    def draw_noise_and_timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like ``latents (B, F, C, h, w)`` and one timestep per sample, from this rank's stream."""
        generator = self.objective_generator()
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
        timesteps = sample_timesteps(latents.shape[0], self.noise_scheduler, generator=generator, device=generator.device)
        return noise.to(latents.device), timesteps.to(latents.device)

    def diffusion_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        batch = to_float_batch(batch)
        generator = self.objective_generator()
        if "video_latents" in batch:
            # Cached by `xdyna-data encode` (data.latents=true): the VAE encode is skipped and the
            # posterior sampled from the cached mean/std with the same draws it would make.
            latents = sample_cached(self.model, batch["video_latents"], generator)
            reference_latents = sample_cached(self.model, batch["reference_latents"], generator)
        else:
            latents = self.model.encode_video(batch["video"], generator=generator)
            reference_latents = self.model.encode_images(batch["reference"], generator=generator)
        noise, timesteps = self.draw_noise_and_timesteps(latents)
        noisy = add_noise(self.noise_scheduler, latents, noise, timesteps)
        pose = batch["pose"] if "pose" in self.conditions else None
        face = None
        if "face" in self.conditions:
            if "face" not in batch:
                raise ConfigError("stage.conditions includes face but the data gives no face maps (set data.with_face=true)")
            face = batch["face"]
        # X-Dyna's image prompt (IP-Adapter-plus tokens of the reference), dropped at random per
        # sample so the unconditional branch of classifier-free guidance is trained too.
        image_prompt = None
        if self.model.image_prompt is not None:
            image_prompt = self.model.encode_image_prompt_for_training(batch["reference"], generator=generator)
        prediction = self.model(noisy, timesteps, reference_latents, pose, face, image_prompt=image_prompt)
        # The clean reference is not part of the prediction: the loss covers generated frames only.
        return F.mse_loss(prediction.float(), training_target(self.noise_scheduler, latents, noise, timesteps))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        # Kept so that a non-finite loss can be replayed with the same draws to find its source.
        rng_state = self.objective_rng_state()
        loss = self.diffusion_loss(batch)
        self.check_finite(loss, batch, rng_state)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["reference"].shape[0])  # video is absent from latents
        return loss

    def check_finite(self, loss: torch.Tensor, batch: Mapping[str, Any], rng_state: torch.Tensor | None = None) -> None:
        """Stop on a NaN/inf loss, on every rank at once: ranks agree through one all-reduce, so
        none is left waiting in the backward's collectives for a rank that has raised. (One
        scalar and one host sync per step: negligible beside a diffusion training step.)

        Before stopping, every rank replays the step's forward pass with the same random draws and
        names the first module whose output went non-finite (all ranks replay, so that the
        collectives of a sharded model stay matched)."""
        if not any_rank(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            return
        keys = list(batch.get("__key__", []))[:4]
        if rng_state is not None:
            self.load_objective_rng_state(rng_state)
        source = first_non_finite(self.model, lambda: self.diffusion_loss(batch), inputs=to_float_batch(batch))
        where = f"rank {self.global_rank}, samples {keys}"
        if not torch.isfinite(loss.detach()).all():
            message = f"non-finite loss ({loss.item()}) at step {self.global_step} ({where}); {source}"
        else:
            message = f"non-finite loss on another rank at step {self.global_step}; this rank ({where}): {source}"
        raise NonFiniteLossError(message + "; resume continues from the last checkpoint")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optim = self.optim
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
        warmup = max(1, optim.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def trainable_state_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        state = checkpoint.get("state_dict")
        if state is not None:  # DeepSpeed keeps weights in its own files and passes no state_dict
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
        checkpoint["xdyna"] = {"trainable_components": self.trainable_components, "flavour": self.model_config.flavour}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is None:
            return
        problems = mismatch_problems(self.state_dict(), state, required=self.trainable_state_keys())
        if problems:
            raise CheckpointMismatchError("checkpoint does not match this model/stage: " + "; ".join(problems))
