"""EMA of the trainable weights (xdyna/train/ema.py): the recurrence, the schedule, checkpoints and
resume, the export's EMA files and the pipeline's choice between EMA and raw weights."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from xdyna.errors import ConfigError
from xdyna.train.ema import EMACallback, EMAConfig, ema_bytes_per_rank, sampling_weights

DECAY = 0.75


class Toy(L.LightningModule):
    """A trainable layer beside a frozen one, as X-Dyna's adapters sit beside the frozen UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return (self.head(self.frozen(batch)) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.5)


class History(L.Callback):
    """The trainable parameters after every optimizer step (runs after the EMA's own hook)."""

    def __init__(self):
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def data(steps: int):
    # One sample repeated: a resumed run replays the same batches (this toy loader keeps no position).
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.DataLoader(torch.randn(1, 3, generator=generator).repeat(steps, 1), batch_size=1)


def fit(steps: int, callbacks, ckpt_path=None, root=None, module=None):
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    module = module or Toy()
    trainer.fit(module, data(8), ckpt_path=ckpt_path)
    return trainer, module


def hand_ema(history: dict[int, dict[str, torch.Tensor]], config: EMAConfig) -> dict[str, torch.Tensor]:
    ema = None
    for step in sorted(history):
        if step >= config.start_step and (step - config.start_step) % config.every_n_steps == 0:
            weights = history[step]
            ema = dict(weights) if ema is None else {n: config.decay * ema[n] + (1 - config.decay) * weights[n] for n in ema}
    return ema


def test_ema_equals_the_hand_recurrence_of_the_parameter_history_and_skips_frozen_weights():
    config = EMAConfig(decay=DECAY, start_step=2, every_n_steps=3)  # updates after steps 2, 5, 8
    ema, history = EMACallback(config), History()
    _, module = fit(8, [ema, history])
    assert set(ema.ema) == {"head.weight", "head.bias"}  # the frozen layer is never copied
    assert ema.updates == 3
    expected = hand_ema(history.after_step, config)
    got = ema.weights(module)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    # The schedule matters: every step's weights would give another average.
    every_step = hand_ema(history.after_step, EMAConfig(decay=DECAY, start_step=0, every_n_steps=1))
    assert not torch.allclose(every_step["head.weight"], got["head.weight"])


def test_resumed_run_ends_with_the_ema_of_a_run_never_stopped(tmp_path):
    config = EMAConfig(decay=DECAY, start_step=1, every_n_steps=2)
    straight = EMACallback(config)
    _, straight_module = fit(7, [straight])

    first = EMACallback(config)
    trainer, _ = fit(4, [first], root=tmp_path)
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["ema"]
    assert saved["updates"] == 2 and saved["last_step"] == 4 and set(saved["weights"]) == {"head.weight", "head.bias"}

    resumed = EMACallback(config)
    _, resumed_module = fit(7, [resumed], ckpt_path=str(ckpt), root=tmp_path)
    assert resumed.updates == straight.updates == 4
    for name, tensor in straight.weights(straight_module).items():
        torch.testing.assert_close(resumed.weights(resumed_module)[name], tensor, rtol=0, atol=0)


def test_applied_swaps_the_ema_in_and_restores_the_raw_weights():
    ema = EMACallback(EMAConfig(decay=DECAY))
    trainer, module = fit(3, [ema])
    raw = module.head.weight.detach().clone()
    with ema.applied(module) as swapped:
        assert swapped
        torch.testing.assert_close(module.head.weight.detach(), ema.ema["head.weight"])
        assert not torch.equal(module.head.weight.detach(), raw)
    assert torch.equal(module.head.weight.detach(), raw)
    # Sample videos: the EMA unless samples.weights=raw.
    with sampling_weights(trainer, module, "ema") as swapped:
        assert swapped and torch.equal(module.head.weight.detach(), ema.ema["head.weight"])
    with sampling_weights(trainer, module, "raw") as swapped:
        assert not swapped and torch.equal(module.head.weight.detach(), raw)


@pytest.mark.parametrize("mapping, culprit", [
    ({"decay": 1.0}, "ema.decay"), ({"decay": 0.9, "start_step": -1}, "ema.start_step"),
    ({"decay": 0.9, "every_n_steps": 0}, "ema.every_n_steps"), ({"decay": 0.9, "every": 2}, "every"),
    ({"decay": "high"}, "ema.decay"), ({"decay": 0.9, "start_step": 1.5}, "ema.start_step"),
])
def test_bad_ema_config_names_the_key(mapping, culprit):
    with pytest.raises(ConfigError, match=culprit):
        EMAConfig.from_mapping(mapping)


@pytest.mark.parametrize("override, culprit", [
    ("stage.ema.decay=1.5", "stage.ema.decay=1.5"), ("stage.ema.every_n_steps=0", "stage.ema.every_n_steps=0"),
    ("samples.weights=best", "samples.weights='best'"),
])
def test_bad_ema_settings_are_refused_before_a_model_is_built(override, culprit):
    from hydra import compose, initialize_config_dir

    from xdyna.train import config_rules
    from xdyna.train.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        good = compose(config_name="train", overrides=["stage.ema.decay=0.999"])
        bad = compose(config_name="train", overrides=[override])
    assert config_rules.violations(good, config_rules.CONFIG_RULES) == []
    (line,) = config_rules.violations(bad, [config_rules.ema_is_valid])
    assert line.startswith(culprit), line


def test_bytes_per_rank():
    from xdyna.models.info import model_state_memory

    # xdyna-info reports them beside the model states.
    report = model_state_memory(trainable=1000, frozen=5000, world_size=4)["ema_if_enabled"]
    assert {name: entry["bytes"] for name, entry in report.items()} == {"ddp": 4000, "zero2": 4000, "zero3": 1000}
    assert ema_bytes_per_rank(1000) == 4000
    assert ema_bytes_per_rank(1000, world_size=4, zero_stage=2) == 4000  # ZeRO-2: parameters replicated
    assert ema_bytes_per_rank(1000, world_size=4, zero_stage=3) == 1000  # ZeRO-3: each rank its partition


# ---------------------------------------------------------------------- export and pipeline

def tiny_checkpoint(path, module, with_ema: bool):
    """A Lightning-style checkpoint of the tiny model's trainable weights, its EMA offset by 1."""
    raw = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    checkpoint = {"state_dict": raw, "global_step": 5, "hyper_parameters": dict(module.hparams)}
    if with_ema:
        checkpoint["ema"] = {"config": {"decay": 0.9, "start_step": 0, "every_n_steps": 1}, "updates": 5, "last_step": 5,
                             "weights": {n: t + 1.0 for n, t in raw.items()}}
    torch.save(checkpoint, path)
    return raw


def test_export_writes_the_ema_beside_the_raw_weights_and_the_pipeline_loads_the_ema_by_default(tmp_path):
    from safetensors.torch import load_file

    from xdyna.checkpoint_io import ExportError
    from xdyna.pipelines.pipeline import PipelineFormatError, XDynaPipeline
    from xdyna.train.export import export_checkpoint

    from xdyna.train.module import XDynaTrainingModule

    module = XDynaTrainingModule(model={"flavour": "tiny"}, stage={"trainable": ["pose_controlnet"], "optim": {"lr": 1e-4}})
    raw = tiny_checkpoint(tmp_path / "ema.ckpt", module, with_ema=True)
    manifest = export_checkpoint(tmp_path / "ema.ckpt", tmp_path / "export", model=module.model)
    assert manifest["weights"] == {"raw": {"pose_controlnet": "pose_controlnet.safetensors"},
                                   "ema": {"pose_controlnet": "pose_controlnet.ema.safetensors"}}
    assert manifest["default_weights"] == "ema" and manifest["ema"]["updates"] == 5
    assert json.loads((tmp_path / "export" / "export.json").read_text())["weights"] == manifest["weights"]
    name = "pose_controlnet.conv_in.weight"
    key = f"model.{name}"
    if key not in raw:  # any trainable tensor will do
        key = next(iter(raw))
        name = key.removeprefix("model.")
    ema_file = load_file(tmp_path / "export" / "pose_controlnet.ema.safetensors")
    torch.testing.assert_close(ema_file[name], raw[key] + 1.0)

    def loaded(**kwargs):
        return XDynaPipeline.from_export(tmp_path / "export", **kwargs).model.state_dict()[name]

    # (Each pipeline build costs seconds here: one per choice.)
    torch.testing.assert_close(loaded(), raw[key] + 1.0)
    torch.testing.assert_close(loaded(weights="raw"), raw[key])
    # A checkpoint gives the same choice.
    from_checkpoint = XDynaPipeline.from_checkpoints([tmp_path / "ema.ckpt"]).model.state_dict()[name]
    torch.testing.assert_close(from_checkpoint, raw[key] + 1.0)

    # Without an EMA: raw files only, the default is raw, asking for the EMA is one clear error.
    tiny_checkpoint(tmp_path / "raw.ckpt", module, with_ema=False)
    manifest = export_checkpoint(tmp_path / "raw.ckpt", tmp_path / "export_raw", model=module.model)
    assert manifest["default_weights"] == "raw" and "ema" not in manifest["weights"]
    assert not list((tmp_path / "export_raw").glob("*.ema.safetensors"))
    torch.testing.assert_close(XDynaPipeline.from_export(tmp_path / "export_raw").model.state_dict()[name], raw[key])
    with pytest.raises((PipelineFormatError, ExportError), match="no EMA"):
        XDynaPipeline.from_export(tmp_path / "export_raw", weights="ema")
    with pytest.raises(PipelineFormatError, match="no EMA"):
        XDynaPipeline.from_checkpoints([tmp_path / "raw.ckpt"], weights="ema")
