"""Ctrl-C, metrics history and what a run shows: SIGINT saves the finished step (no requeue),
metrics.csv keeps its rows across a resume, the last step is logged, the bar counts steps."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from xdyna.train.callbacks import StepProgressBar
from xdyna.train.csv_history import HistoryCSVLogger
from xdyna.train.signals import PreemptionSignals
from xdyna.train.telemetry import TrainingTelemetry

BIN = Path(sys.executable).parent


def test_ctrl_c_interrupts_at_once_before_training_then_is_deferred_once():
    previous = signal.getsignal(signal.SIGINT)
    flag = PreemptionSignals(("SIGUSR1",), interrupt=True)
    flag.install()
    try:
        with pytest.raises(KeyboardInterrupt):  # nothing to save yet: Python's default behaviour
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is never reached in full
        assert flag.received is None
        flag.deferring_interrupt = True
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.interrupted and flag.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_keeps_the_rows_of_the_resumed_steps_and_drops_later_ones(tmp_path):
    metrics = tmp_path / "metrics" / "metrics.csv"
    metrics.parent.mkdir()
    metrics.write_text("step,train/loss\n" + "".join(f"{step},{step / 10}\n" for step in range(6)))
    logger = HistoryCSVLogger(save_dir=str(tmp_path), name="metrics", version="", keep_before_step=3)
    logger.log_metrics({"train/loss": 0.9, "perf/grad_norm": 1.5}, step=3)
    logger.save()
    rows = read_rows(metrics)
    assert [row["step"] for row in rows] == ["0", "1", "2", "3"]
    assert rows[0]["train/loss"] == "0.0" and rows[3]["perf/grad_norm"] == "1.5"


class _TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch["video"].float().flatten(1)[:, :2]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks, max_steps: int, log_every_n_steps: int, logger=False):
    # Two batches per epoch: epochs and steps disagree, as with the clip loader.
    # (The batch contract's keys the telemetry reads: the reference, in batches from pixels and from latents.)
    batches = [{"video": torch.randn(1, 2, 3, 4, 4), "reference": torch.randn(1, 3, 4, 4)} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, log_every_n_steps=log_every_n_steps, logger=logger,
                        callbacks=callbacks, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(_TinyModule(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_a_run_shorter_than_the_logging_interval_logs_its_last_step(tmp_path):
    logger = HistoryCSVLogger(save_dir=str(tmp_path), name="metrics", version="")
    _fit(tmp_path, [TrainingTelemetry()], max_steps=3, log_every_n_steps=50, logger=logger)
    rows = read_rows(tmp_path / "metrics" / "metrics.csv")
    last = [row for row in rows if row["step"] == "2"]
    assert last and last[0]["train/loss"] and last[0]["perf/samples_per_s"]


def test_progress_bar_counts_steps_of_max_steps(tmp_path, capsys):
    _fit(tmp_path, [StepProgressBar()], max_steps=5, log_every_n_steps=1)
    out = capsys.readouterr().out.replace("\r", "\n")
    assert "step: 100%" in out and "5/5" in out, out[-500:]
    assert "Epoch" not in out and "/2 [" not in out


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_step_and_the_resumed_run_keeps_the_metrics_history(tmp_path):
    shards = tmp_path / "shards"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("XDYNA_RUN_ID", None)
    made = subprocess.run([str(BIN / "xdyna-data"), "synth", "--out", str(shards), "--human", "2", "--scene", "1",
                           "--frames", "8", "--height", "64", "--width", "32"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    common = [str(BIN / "xdyna-train"), "model=tiny", "logger=csv", f"data.shards={shards}", "data.num_frames=4",
              "data.height=64", "data.width=32", f"run.root={tmp_path / 'runs'}", "run.id=ctrlc",
              "checkpoint.every_n_steps=2", "checkpoint.keep=0", "checkpoint.export_at_end=false",
              "samples.num_inference_steps=1", "samples.max_samples=1", "trainer.precision=32-true"]
    checkpoints = tmp_path / "runs" / "ctrlc" / "checkpoints"
    log = (tmp_path / "first.log").open("w")
    # The run holds after step 2 until it gets the signal: it is mid-run by construction, however
    # loaded the machine.
    first = subprocess.Popen([*common, "trainer.max_steps=40", "trainer.log_every_n_steps=1", "debug.hold_after_step=2"],
                             cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (checkpoints / "step=000002.ckpt").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    output = (tmp_path / "first.log").read_text()
    assert "xdyna-train interrupted" in output and "resume_with" in output and "Traceback" not in output
    saved = max(int(p.name[5:11]) for p in checkpoints.glob("step=*.ckpt"))
    assert saved == 3  # the step that finished after the Ctrl-C, not only the periodic one before it
    # A stopped stage renders no end-of-stage samples (the grace time before SIGKILL is the checkpoint's).
    assert not list((tmp_path / "runs" / "ctrlc" / "samples").glob("*.mp4"))
    metrics = tmp_path / "runs" / "ctrlc" / "metrics" / "metrics.csv"
    assert {int(r["step"]) for r in read_rows(metrics) if r.get("train/loss")} >= set(range(saved))

    second = subprocess.run([*common, f"trainer.max_steps={saved + 2}", "trainer.log_every_n_steps=50"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"step={saved:06d}.ckpt" in second.stdout  # resumed from the Ctrl-C checkpoint
    assert [p.name for p in (tmp_path / "runs" / "ctrlc" / "samples").glob("*.mp4")] == [f"step{saved + 2:07d}_rank0.mp4"]
    logged = {int(r["step"]) for r in read_rows(metrics) if r.get("train/loss")}
    # The first run's rows survive the resume, and the resumed run's last step is logged although
    # it is shorter than its logging interval.
    assert logged >= set(range(saved)) | {saved + 1}
