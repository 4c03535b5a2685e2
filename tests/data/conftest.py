"""Fixtures for the data tests: tiny synthetic shard sets built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from datapipes.synthetic import write_synthetic_shards

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "xdyna_examples"


@pytest.fixture(scope="session")
def portrait_shards(tmp_path_factory) -> str:
    """10 human + 6 scene clips, 12 frames of 64x32, 2 samples per shard (8 shards)."""
    out = tmp_path_factory.mktemp("portrait") / "shards"
    write_synthetic_shards(str(out), human=10, scene=6, frames=12, height=64, width=32, seed=1, shard_size=2)
    return str(out)


@pytest.fixture(scope="session")
def landscape_shards(tmp_path_factory) -> str:
    """4 human + 2 scene clips of 32x64 (landscape), for aspect-ratio buckets."""
    out = tmp_path_factory.mktemp("landscape") / "shards"
    write_synthetic_shards(str(out), human=4, scene=2, frames=12, height=32, width=64, seed=2, shard_size=3)
    return str(out)


@pytest.fixture(scope="session")
def examples() -> Path:
    """The real X-Dyna example videos in ../shared (skipped when absent)."""
    if not (EXAMPLES / "example_1_driving.mp4").is_file():
        pytest.skip(f"real example data not present at {EXAMPLES}")
    return EXAMPLES


def loader_config(shards, **overrides):
    from datapipes.loader import ClipLoaderConfig

    values = dict(shards=shards, num_frames=4, frame_stride=2, height=64, width=32, batch_size=2,
                  num_workers=0, batches_per_epoch=6, bad_fraction_min_samples=10_000)
    values.update(overrides)
    return ClipLoaderConfig(**values)
