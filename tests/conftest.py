"""Shared fixtures: tiny weights saved in the real on-disk formats, synthetic batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Each pytest-xdist worker (make test: one per core) and the processes its tests start get their
# share of the cores as OpenMP threads (a user's OMP_NUM_THREADS wins). torch's default, every
# core in every process, oversubscribes: spinning OpenMP threads of several processes on the same
# cores made a tiny training step 20-30x slower. Set before torch starts its thread pool.
# (xdist sets the worker variables before a worker imports this; its controller runs no tests.)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # a plugin may have imported torch already

REPO = Path(__file__).resolve().parents[1]
SHARED_EXAMPLES = REPO.parent / "shared" / "data" / "xdyna_examples"
# `make test` runs on two pytest-xdist workers (-n 2 --dist loadgroup). The tests that share an
# expensive session fixture go to one worker together, so that it is built once: the real local
# SLURM cluster here; the tiny 2-rank runs of tests/scale/resume_runs.py are grouped per case by
# their tests' own marks (resume_runs.reads_runs), which this hook requires.
SHARED_SESSION_FIXTURES = {"slurm_cluster": "slurm"}


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into node-id suffixes
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, group in SHARED_SESSION_FIXTURES.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
        if "runs" in fixtures and item.get_closest_marker("xdist_group") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the shared runs without @reads_runs(<cases>) "
                                    "(tests/scale/resume_runs.py): its runs would be trained again on another worker")
    # Longest first: xdist hands out work in collection order, and the grouped chains of 2-rank
    # runs (minutes each) would otherwise start last (tests/scale sorts late) and leave one worker
    # alone with them at the end. Whole modules move, in their own order, so that a module's
    # fixtures are still built once per worker.
    weight: dict[str, int] = {}  # per module, its heaviest test: 0 grouped, 1 slow, 2 the rest
    for item in items:
        rank = 0 if item.get_closest_marker("xdist_group") else 1 if item.get_closest_marker("slow") else 2
        weight[item.path] = min(weight.get(item.path, 2), rank)
    items.sort(key=lambda item: weight[item.path])  # stable: modules and their tests keep their order


@pytest.fixture(scope="session")
def tiny_sd15_folder(tmp_path_factory) -> Path:
    """A diffusers-format SD1.5-layout folder (unet/, vae/, text_encoder/) with tiny random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from xdyna.models.flavours import TINY

    folder = tmp_path_factory.mktemp("tiny_sd15")
    torch.manual_seed(123)
    UNet2DConditionModel(**TINY.unet).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY.vae).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY.text_encoder)).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture
def make_batch():
    """Factory of random batches following the batch contract in docs/design.md."""
    return random_batch


def random_batch(batch: int = 2, frames: int = 4, height: int = 128, width: int = 64, face: bool = True, seed: int = 0) -> dict:
    """A batch following the batch contract in docs/design.md."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "video": torch.rand(batch, frames, 3, height, width, generator=g) * 2 - 1,
        "reference": torch.rand(batch, 3, height, width, generator=g) * 2 - 1,
        "pose": torch.rand(batch, frames, 3, height, width, generator=g),
        "is_scene": torch.zeros(batch, dtype=torch.bool),
    }
    if face:
        out["face"] = torch.rand(batch, frames, 6, height, width, generator=g)
    return out
