"""Peak-memory prediction on fake tensors (xdyna.models.memory) against real CPU steps."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from tools.benchmarks.bench_memory_predict import profiler_peak
from tools.xdyna_info import main as xdyna_info
from xdyna.errors import ConfigError
from xdyna.models import ModelConfig, build_model
from xdyna.models.info import run_training_step
from xdyna.models.memory import GIB, WORKSPACE_BYTES, _largest, cuda_autocast_policy, parse_bytes, step_memory

STAGE1 = ["dynamics_adapter", "motion_modules", "pose_controlnet"]


@pytest.fixture(scope="module")
def plain():
    """One fake-tensor prediction of the tiny model's step (2 frames at 64x64, float32, no
    checkpointing), in exact bytes and CPU autocast's policy: comparable with a real CPU step."""
    return step_memory(ModelConfig(), STAGE1, ["pose"], 2, 64, 64, precision="32-true", engine="ddp",
                       checkpointing="none", autocast_policy="cpu", block=1)


@contextlib.contextmanager
def same_on_every_cpu():
    """The real step allocates the same bytes on any x86 CPU: without oneDNN (whose kernels, and
    their scratchpads and weight reorders, are picked per instruction set: AVX2, AVX-512, AMX) the
    convolutions take ATen's own path; on one thread (CPU flash attention sizes its buffers by the
    thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)


def test_prediction_equals_a_real_cpu_step(plain):
    """The fake run counts what the CPU allocator gives a real step of the tiny model (measured
    0.990 of it here; 0.997 with oneDNN on this AMX CPU)."""
    model = build_model(ModelConfig())
    model.set_trainable(STAGE1)
    model.train()
    with same_on_every_cpu():
        measured = profiler_peak(lambda: run_training_step(model, ["pose"], 2, 64, 64))
    assert plain["step_peak_bytes"] == pytest.approx(measured, rel=0.02)
    assert plain["gradient_bytes"] == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert plain["weights_bytes"] == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_cuda_autocast_policy_runs_norms_in_float32_only_inside():
    x = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 2).dtype == torch.bfloat16  # CPU autocast's own policy
        with cuda_autocast_policy():
            assert F.group_norm(x, 2).dtype == torch.float32  # what AutocastCUDA does
            assert F.layer_norm(x, (4,)).dtype == torch.float32
            assert F.linear(x.float(), torch.randn(3, 4)).dtype == torch.bfloat16
        assert F.group_norm(x, 2).dtype == torch.bfloat16


def test_xdyna_info_predicts_peak_and_checkpointing_saves_less(plain, capsys):
    args = ["model=tiny", "stage=stage1", "data.num_frames=2", "data.height=64", "data.width=64", "--micro-batch", "1",
            "--engine", "ddp", "--precision", "32-true", "--world-size", "2", "--checkpointing", "all"]
    assert xdyna_info(args) == 0
    report = json.loads(capsys.readouterr().out)["peak_memory_per_gpu"]
    assert report["checkpointing"] == "all" and report["engine"] == "ddp" and report["world_size"] == 2
    assert report["checkpointed_kinds"] == ["resnets", "attentions", "motion", "pose_controlnet", "face_controlnet"]
    parts = report["weights_GiB"] + report["step_peak_GiB"] + report["optimizer_GiB"]
    assert report["forward_backward_peak_GiB"] == pytest.approx(parts, abs=0.0003)
    assert report["tensor_peak_GiB"] == max(report["forward_backward_peak_GiB"], report["optimizer_step_peak_GiB"])
    assert report["peak_GiB"] == pytest.approx(report["tensor_peak_GiB"] + WORKSPACE_BYTES / GIB, abs=0.01)
    # Checkpointing every kind leaves less saved for backward than none (same step, same shapes).
    assert report["saved_for_backward_GiB"] * GIB < 0.8 * plain["saved_for_backward_bytes"]


def test_fit_search_confirms_its_linear_estimate():
    """Two runs give the slope, the estimate is confirmed by a run (stepping down while it fails)."""
    calls = []

    def predict(n, cost=lambda n: 10 + 3 * n + (5 if n >= 7 else 0), budget=30):
        calls.append(n)
        peak = cost(n)
        return {"peak_bytes": peak, "budget": budget} if peak <= budget else None

    assert _largest(predict, 1, 64)[0] == 6  # linear estimate 6 (10 + 3*6 = 28), confirmed
    assert calls == [1, 2, 6]
    assert _largest(lambda n: None, 1, 64) == (0, None)  # nothing fits
    assert _largest(predict, 1, 3)[0] == 3  # capped by the limit


def test_memory_sizes_parse_or_name_the_culprit():
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("40GB") == 40 * GIB and parse_bytes("24g") == 24 * GIB
    assert parse_bytes("512MiB") == 512 * 2**20
    for bad in ("80", "lots", "-3GiB"):
        with pytest.raises(ConfigError, match=rf"memory size '{bad}': expected a positive number with a unit"):
            parse_bytes(bad)
