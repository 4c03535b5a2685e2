"""Provenance (:mod:`xdyna.provenance`): git state, file and shard hashes, the resume chain, and the
record an ``xdyna-train`` run leaves in its checkpoints, its export and its W&B run.

The end-to-end check (:func:`check_run_provenance`) runs inside the training CLI test of
``tests/test_train_cli.py``, which already trains, resumes and exports a tiny run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch

from xdyna import provenance

UNKNOWN = {"commit": "unknown", "dirty": "unknown"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_git_state_is_unknown_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert provenance.git_state(tmp_path) == UNKNOWN
    monkeypatch.setattr(provenance.shutil, "which", lambda name: None)
    assert provenance.git_state() == UNKNOWN


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    git("add", "pkg/code.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert provenance.git_state(tmp_path / "pkg") == {"commit": head, "dirty": False}
    (tmp_path / "pkg" / "scratch.txt").write_text("untracked files are not the code that ran")
    assert provenance.git_state(tmp_path / "pkg")["dirty"] is False
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path / "pkg") == {"commit": head, "dirty": True}


def test_file_hashes_are_streamed_and_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_BLOCK", 7)  # many blocks: the streaming path, not one read
    monkeypatch.setattr(provenance, "_SHA256_CACHE", {})
    file = tmp_path / "weights.bin"
    first, second = bytes(range(100)), bytes(reversed(range(100)))
    file.write_bytes(first)
    assert provenance.file_sha256(file) == hashlib.sha256(first).hexdigest()
    stat = file.stat()
    # Same size and mtime: the cached digest, the file is not read again.
    file.write_bytes(second)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.file_sha256(file) == hashlib.sha256(first).hexdigest()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert provenance.file_sha256(file) == hashlib.sha256(second).hexdigest()


def test_pretrained_sources_hash_every_file_under_each_path(tmp_path):
    folder = tmp_path / "sd15"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.safetensors").write_bytes(b"unet weights")
    (folder / "model_index.json").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("download bookkeeping")
    component = tmp_path / "pose_controlnet.safetensors"
    component.write_bytes(b"pose weights")
    sources = provenance.pretrained_sources({"sd15": str(folder), "vae": None, "ip_adapter": str(tmp_path / "gone.bin"),
                                             "components": {"pose_controlnet": str(component)}})
    assert sorted(sources) == ["components.pose_controlnet", "ip_adapter", "sd15"]
    assert sources["sd15"]["files"] == {
        "model_index.json": {"bytes": 2, "sha256": sha256(folder / "model_index.json")},
        "unet/model.safetensors": {"bytes": 12, "sha256": sha256(folder / "unet" / "model.safetensors")},
    }
    assert sources["components.pose_controlnet"]["files"] == {component.name: {"bytes": 12, "sha256": sha256(component)}}
    assert sources["ip_adapter"]["missing"] is True


def independent_shard_hash(paths: list[Path]) -> str:
    return hashlib.sha256("".join(f"{p}\t{p.stat().st_size}\n" for p in paths).encode()).hexdigest()


def test_data_provenance_hashes_the_shard_list_with_sizes_and_the_index(tmp_path):
    from datapipes.index import FORMAT

    folder = tmp_path / "pack"
    folder.mkdir()
    for name, size in (("b.tar", 3), ("a.tar", 5)):
        (folder / name).write_bytes(b"x" * size)
    index = folder / "index.json"
    index.write_text(json.dumps({"format": FORMAT, "shards": ["b.tar", "a.tar"]}))

    by_folder = provenance.data_provenance({"shards": str(folder)})
    shards = [folder / "a.tar", folder / "b.tar"]
    assert by_folder["shards_sha256"] == independent_shard_hash(shards)
    assert by_folder["shards"] == [{"path": str(p), "bytes": p.stat().st_size} for p in shards]
    assert (by_folder["num_shards"], by_folder["total_bytes"]) == (2, 8)
    assert by_folder["indexes"] == [{"path": str(index), "sha256": sha256(index)}]
    # Through the index: its own order, so another hash; a changed size changes it too.
    by_index = provenance.data_provenance({"shards": str(index)})
    assert by_index["shards_sha256"] == independent_shard_hash(shards[::-1]) != by_folder["shards_sha256"]
    (folder / "a.tar").write_bytes(b"x" * 6)
    assert provenance.data_provenance({"shards": str(folder)})["shards_sha256"] != by_folder["shards_sha256"]


def test_a_checkpoint_file_records_are_read_without_its_weights_and_described(tmp_path):
    record = provenance.with_run_state(
        {"git": {"commit": "abc123", "dirty": True}, "pretrained": {"sd15": provenance.path_hashes(tmp_path / "none")}},
        step=7, world_size=2,
        resume_chain=[provenance.resume_entry("runs/r/checkpoints/step=000004.ckpt", 4, 2, 4, "991")])
    checkpoint = tmp_path / "step=000007.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(3)}, provenance.CHECKPOINT_KEY: record}, checkpoint)
    assert provenance.read(checkpoint) == record
    assert provenance.read(tmp_path) is None  # a folder without provenance.json
    block = provenance.describe(record)
    assert "commit abc123 (dirty tree)" in block and "step 7 on 2 rank(s)" in block
    assert "step 4 (4->2 ranks, job 991)" in block and "pretrained sd15:" in block


def wandb_run_bytes(wandb_dir: Path) -> bytes:
    """The offline W&B run's record file (protobuf records; the JSON of config and summary values is
    stored as text, so a value recorded there is found in it)."""
    (record_file,) = wandb_dir.glob("*.wandb")
    return record_file.read_bytes()


def check_run_provenance(tmp_path: Path, shards: Path, first_checkpoint: Path, resumed_checkpoint: Path,
                         sd15_folder: Path, wandb_dir: Path, max_steps: int) -> None:
    """``xdyna-export`` of a run resumed once (single process, from ``first_checkpoint``) writes
    ``provenance.json``; read back, it holds what the run was. Called by the training CLI test."""
    from tools.xdyna_export import main as export_main

    out = tmp_path / "exported"
    assert export_main([str(resumed_checkpoint), str(out)]) == 0
    record = json.loads((out / provenance.PROVENANCE_FILE).read_text())
    assert torch.load(resumed_checkpoint, map_location="cpu", weights_only=True)[provenance.CHECKPOINT_KEY]["data"] \
        == record["data"]

    assert re.fullmatch(r"[0-9a-f]{40}|unknown", record["git"]["commit"]) and record["git"]["dirty"] in (True, False, "unknown")
    config = record["config"]
    assert config["data"]["shards"] == str(shards) and config["trainer"]["max_steps"] == max_steps
    assert config["model"]["pretrained"]["sd15"] == str(sd15_folder) and config["run"]["id"] == "e2e"
    tars = sorted(shards.rglob("*.tar"))
    assert record["data"]["shards_sha256"] == independent_shard_hash(tars)
    assert record["data"]["shards"] == [{"path": str(p), "bytes": p.stat().st_size} for p in tars]
    assert record["versions"] == {"python": record["versions"]["python"], "xdyna": metadata.version("xdyna"),
                                  "torch": str(torch.__version__), "diffusers": metadata.version("diffusers"),
                                  "deepspeed": metadata.version("deepspeed"), "lightning": metadata.version("lightning")}
    assert (record["step"], record["world_size"]) == (max_steps, 1)
    (link,) = record["resume_chain"]
    assert link["checkpoint"] == str(first_checkpoint) and (link["step"], link["from_world_size"], link["world_size"]) == \
        (int(torch.load(first_checkpoint, map_location="cpu", weights_only=True)["global_step"]), 1, 1)
    from xdyna.train.slurm import slurm_job_id

    assert link["slurm_job_id"] == slurm_job_id(os.environ)  # the training subprocess inherits this environment
    files = {p.relative_to(sd15_folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(sd15_folder.rglob("*")) if p.is_file()}
    assert record["pretrained"]["sd15"] == {"path": str(sd15_folder.resolve()), "files": files} and files
    assert record["exported_from"]["step"] == max_steps
    assert record["exported_from"]["checkpoint"] == str(resumed_checkpoint.resolve())
    # The W&B run (offline) holds the record in its config and the hash in its summary.
    logged = wandb_run_bytes(wandb_dir)
    assert b"provenance/shards_sha256" in logged and record["data"]["shards_sha256"].encode() in logged


def test_a_directory_checkpoint_carries_the_record_beside_its_shards(tmp_path):
    from xdyna.train import checkpointing

    record = {"git": {"commit": "unknown", "dirty": "unknown"}, "step": 2, "world_size": 2, "resume_chain": []}
    final = checkpointing.save_directory_checkpoint(
        tmp_path / "step=000002.ckpt", lambda tmp: (tmp / "shard.pt").write_bytes(b"shard"), is_global_zero=True,
        broadcast=lambda value: value, barrier=lambda: None, metadata={"world_size": 2}, provenance=record)
    assert provenance.read(final) == record
    # The COMPLETE marker stays the small metadata the elastic resume reads.
    assert checkpointing.read_metadata(final) == {"world_size": 2}
