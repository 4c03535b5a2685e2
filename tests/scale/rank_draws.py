"""Run by tests/scale/test_rank_randomness.py as ``python rank_draws.py OUT_DIR``: a 2-rank DDP
(gloo, CPU) fit of the tiny model for 3 steps that records, on every rank, the objective's random
draws (VAE posterior samples, noise, timesteps) and the initial weights into ``OUT_DIR/rank<r>.pt``.

A script, not a test function: Lightning's DDP launcher starts rank 1 by re-running this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import random_batch  # noqa: E402

from xdyna.train.module import XDynaTrainingModule  # noqa: E402

STEPS = 3


class Recorder(L.Callback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.draws: list[dict] = []
        self.initial: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        draw = pl_module.draw_noise_and_timesteps
        encode = pl_module.model.encode_video

        def recording_draw(latents):
            noise, timesteps = draw(latents)
            self.draws[-1].update(noise=noise.clone(), timesteps=timesteps.clone())
            return noise, timesteps

        def recording_encode(video, *args, **kwargs):
            latents = encode(video, *args, **kwargs)
            # Same video on both ranks: the posterior sample minus its mean is the rank's draw.
            self.draws.append({"posterior": latents - encode(video, sample_posterior=False)})
            return latents

        pl_module.draw_noise_and_timesteps = recording_draw
        pl_module.model.encode_video = recording_encode

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"draws": self.draws, "initial": self.initial}, self.out_dir / f"rank{trainer.global_rank}.pt")


def main(out_dir: str) -> None:
    conf = Path(REPO / "conf")
    model = OmegaConf.to_container(OmegaConf.load(conf / "model" / "tiny.yaml"))
    stage = OmegaConf.to_container(OmegaConf.load(conf / "stage" / "stage1.yaml"))
    L.seed_everything(0)  # as xdyna-train: the same seed on every rank
    module = XDynaTrainingModule(model=model, stage=stage, seed=0)
    # Both ranks get the same clips, so that any difference in what they draw comes from their
    # random streams alone (the real loader gives them different clips).
    batches = [random_batch(batch=1, frames=2, height=64, width=32, face=False, seed=i) for i in range(STEPS)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=STEPS,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[Recorder(Path(out_dir))],
    )
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main(sys.argv[1])
