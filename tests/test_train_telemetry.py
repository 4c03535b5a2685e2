"""Training telemetry reaches the logger (CSV here, W&B alike) and a NaN loss stops the run clearly."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import torch
import pytest
from torch.utils.data import DataLoader

from tests.test_train_cli import shards, train  # noqa: F401  (module-scoped synthetic shards fixture)
from tests.test_train_module import stage_config, tiny_model_config
from xdyna.train.module import NonFiniteLossError, XDynaTrainingModule
from xdyna.train.telemetry import mfu


def test_mfu_is_achieved_over_peak_flops():
    # 2e12 FLOPs per sample at 10 samples/s on 4 devices of 10 TFLOP/s: 20 of 40 TFLOP/s.
    assert mfu(2e12, 10.0, 10.0, 4) == pytest.approx(0.5)


def test_nan_loss_stops_the_run_naming_the_step(make_batch, tmp_path):
    good = make_batch(batch=1, frames=2, face=False)
    bad = {k: v.clone() for k, v in good.items()}
    bad["video"][0, 0, 0, 0, 0] = float("nan")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1 "):
        module = XDynaTrainingModule(model=tiny_model_config(), stage=stage_config("stage1"))
        trainer.fit(module, train_dataloaders=DataLoader([good, bad, good], batch_size=None))
    assert trainer.global_step == 1  # the bad batch was never stepped on


def lpips_manifest(folder: Path) -> Path:
    """A checksummed local weights manifest of LPIPS-VGG (random weights; xdyna-eval's format)."""
    from xdyna.metrics.lpips import LPIPSVGG
    from xdyna.metrics.weights import sha256_of

    torch.manual_seed(0)
    vgg = folder / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in LPIPSVGG().features.state_dict().items()}, vgg)
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"vgg16_imagenet": {"path": vgg.name, "sha256": sha256_of(vgg)}}))
    return manifest


@pytest.mark.slow
def test_cli_logs_loss_lr_throughput_memory_mfu_data_and_sample_metrics(tmp_path, shards):  # noqa: F811
    # 2 workers: the training loop must hand their reusable shared-memory buffers back.
    # samples.lpips_weights: LPIPS-VGG built from a local manifest, logged as val/lpips.
    result = train(tmp_path, shards, "logger=csv", "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                   "telemetry.peak_tflops=1", "data.num_workers=2", f"samples.lpips_weights={lpips_manifest(tmp_path)}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_csv = Path(next(line.split(None, 1)[1] for line in result.stdout.splitlines() if line.strip().startswith("metrics_csv")))
    rows = list(csv.DictReader(metrics_csv.open()))
    logged: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                logged.setdefault(key, []).append(float(value))
    expected = ["train/loss", "lr-AdamW", "perf/samples_per_s", "perf/data_wait_fraction", "perf/grad_norm",
                "perf/peak_mem_gib", "perf/mfu", "data/samples_drawn", "data/bad_samples", "data/bad_fraction",
                "data/fresh_shm_batches",
                "val/psnr", "val/ssim", "val/lpips"]
    missing = [k for k in expected if k not in logged]
    assert not missing, f"not logged: {missing}; logged: {sorted(logged)}"
    # A step's telemetry and loss share one row (Lightning writes both, every log_every_n_steps);
    # sample metrics (rendered after the last step) carry that step's index too.
    loss_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert [int(row["step"]) for row in rows if row.get("perf/samples_per_s")] == loss_steps == [1, 3]
    assert all(row.get("train/loss") for row in rows if row.get("perf/grad_norm"))
    assert [int(row["step"]) for row in rows if row.get("val/psnr")] == [int(row["step"]) for row in rows if row.get("val/lpips")] == [3]
    assert all(0 <= v < 2 for v in logged["val/lpips"])
    assert all(0 <= v <= 1 for v in logged["perf/data_wait_fraction"])
    assert all(0 < v < 1 for v in logged["perf/mfu"]) and all(v > 0 for v in logged["perf/samples_per_s"])
    assert logged["data/samples_drawn"][-1] >= 4 and logged["data/bad_samples"][-1] == 0
    assert logged["data/fresh_shm_batches"] == [0, 0]
    assert all(math.isfinite(v) and v > 0 for v in logged["perf/grad_norm"] + logged["val/psnr"])


def test_sample_videos_refuse_a_missing_lpips_manifest(tmp_path, shards):  # noqa: F811
    """samples.lpips_weights naming no file: one clear line naming it (logged LPIPS: the telemetry test)."""
    bad = train(tmp_path, shards, "logger=none", "trainer.max_steps=1", f"samples.lpips_weights={tmp_path / 'none.json'}")
    assert bad.returncode == 2 and "none.json" in bad.stderr and "Traceback" not in bad.stderr
