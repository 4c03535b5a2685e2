"""``samples.max_samples=0`` switches the training sample videos off (no fixed batch is kept, nothing
is rendered on any rank, at the end of the stage or every n steps); bad ``samples.*`` values are
refused before a model is built."""

from __future__ import annotations

import lightning as L
import pytest
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from tests.test_train_module import stage_config, tiny_model_config
from xdyna.train.callbacks import SampleVideoCallback
from xdyna.train.config_rules import samples_are_valid
from xdyna.train.module import XDynaTrainingModule


def test_max_samples_zero_renders_nothing(make_batch, tmp_path):
    # (Rendering with max_samples >= 1, every n steps and at the end, is what the CLI tests check.)
    batch = make_batch(batch=1, frames=2, face=False)
    samples = SampleVideoCallback(every_n_steps=1, num_inference_steps=1, max_samples=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[samples],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage1")),
                train_dataloaders=DataLoader([batch], batch_size=None))
    assert not (tmp_path / "samples").exists() and samples.last_video is None and samples.fixed_batch is None


def test_bad_sample_settings_are_refused_naming_the_key():
    cfg = OmegaConf.create({"samples": {"every_n_steps": -1, "max_samples": 1.5, "num_inference_steps": 0, "fps": 0}})
    assert samples_are_valid(cfg) == [
        "samples.every_n_steps=-1: must be an integer >= 0", "samples.max_samples=1.5: must be an integer >= 0",
        "samples.num_inference_steps=0: must be an integer >= 1", "samples.fps=0: must be a number > 0"]
    assert samples_are_valid(OmegaConf.create({"samples": {"max_samples": 0, "every_n_steps": 0}})) == []
