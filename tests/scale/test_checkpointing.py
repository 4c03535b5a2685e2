"""Atomic checkpoint commits: a killed write never becomes `latest`, resume picks the newest complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from xdyna.train import checkpointing as ck

# A writer that commits step 1, then starts step 2 and is killed while the file is half written.
_SLOW_WRITER = r"""
import sys, time, torch
from pathlib import Path
from xdyna.train import checkpointing as ck
d = Path(sys.argv[1])
ck.save_file_atomic({"global_step": 1}, d / ck.checkpoint_name(1))
tmp = ck.partial_path(d / ck.checkpoint_name(2))
with open(tmp, "wb") as f:
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_write_never_becomes_latest(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert leftovers, "the killed write left nothing behind: the test did not interrupt a write"
    assert (tmp_path / ck.LATEST_POINTER).read_text().strip() == ck.checkpoint_name(1)
    assert ck.newest_complete_checkpoint(tmp_path) == tmp_path / ck.checkpoint_name(1)
    assert ck.remove_stale_partials(tmp_path) and not any(".partial-" in p.name for p in tmp_path.iterdir())


def test_directory_checkpoint_needs_complete_marker_and_pointer_follows_commits(tmp_path):
    def write(step: int) -> Path:
        def shards(tmp_dir: Path) -> None:
            (tmp_dir / "shard_rank0.pt").write_bytes(b"x")

        return ck.save_directory_checkpoint(
            tmp_path / ck.checkpoint_name(step), shards,
            is_global_zero=True, broadcast=lambda obj: obj, barrier=lambda: None, metadata={"global_step": step},
        )

    write(3)
    newer = write(5)
    assert ck.newest_complete_checkpoint(tmp_path) == newer
    # A directory with a final name but no marker (copied by hand, half restored) is not trusted.
    (tmp_path / ck.checkpoint_name(9)).mkdir()
    assert ck.newest_complete_checkpoint(tmp_path) == newer
    # A dangling pointer falls back to the highest complete step.
    ck.remove_checkpoint(newer)
    assert ck.newest_complete_checkpoint(tmp_path) == tmp_path / ck.checkpoint_name(3)


def test_recommit_replaces_existing_checkpoint(tmp_path):
    target = tmp_path / ck.checkpoint_name(7)
    ck.save_file_atomic({"v": 1}, target)
    ck.save_file_atomic({"v": 2}, target)
    assert torch.load(target, weights_only=True) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
