"""Cached latents (`xdyna-data encode`, data.latents): encode -> loader -> training loss, tiny model, CPU."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from datapipes.latents import LatentsError
from datapipes.loader import ClipLoader
from datapipes.synthetic import write_synthetic_shards
from tests.data.conftest import loader_config
from tools.xdyna_data import main
from xdyna.latents import sample_cached
from xdyna.train.module import XDynaTrainingModule

# fp16 storage of the posterior mean/std: about 2^-11 relative per value (LATENT_TOL on the sampled
# latents). The loss, a mean over every value dominated by the noise, moved 1e-7 to 5e-7 relative
# on this data; a draw without the std (the mean alone) moves it 1.5e-3 to 2.6e-3.
LATENT_TOL = dict(rtol=2e-3, atol=2e-3)
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Source shards (2 human + 1 scene clips of 10 frames at 72x32, 2 per shard) and their
    encoding at 64x32 in 2 parts: part 0 first, then the whole command (part 0 skipped)."""
    root = tmp_path_factory.mktemp("latents")
    source, out = str(root / "source"), str(root / "encoded")
    write_synthetic_shards(source, human=2, scene=1, frames=10, height=72, width=32, seed=3, shard_size=2)
    command = ["encode", source, "--out", out, "--height", "64", "--width", "32", "--parts", "2"]
    assert main(command + ["--part", "0"]) == 0
    part0 = os.path.getmtime(os.path.join(out, "parts", "part-00000.json"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(command) == 0
    return source, out, printed.getvalue(), part0


def test_rerun_skips_finished_parts_and_writes_the_index(encoded):
    source, out, printed, part0 = encoded
    assert "part 0/2: already finished, skipped" in printed and "part 1/2: done" in printed
    assert os.path.getmtime(os.path.join(out, "parts", "part-00000.json")) == part0
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["samples"] == 3 and index["latents"]["crop"] == "center"
    assert index["latents"]["buckets"] == [[64, 32]]
    assert sorted(os.listdir(source)) == ["synthetic-000000.tar", "synthetic-000001.tar"]  # sources untouched


def _batches(shards, latents, **overrides):
    cfg = loader_config(shards, num_frames=3, frame_stride=2, crop="center", latents=latents, batches_per_epoch=2,
                        scene_probability=None, resample=False, **overrides)
    return list(ClipLoader(cfg, rank=0, world_size=1))


def test_latents_give_the_loss_pixels_give(encoded):
    index = os.path.join(encoded[1], "index.json")
    pixels, cached = _batches(index, False), _batches(index, True)
    stage = {"trainable": ["dynamics_adapter", "motion_modules", "pose_controlnet"], "conditions": ["pose"],
             "optim": {"lr": 1e-5}}
    module = XDynaTrainingModule(model={"flavour": "tiny"}, stage=stage)  # the VAE encode used: same init
    vae = module.model.vae
    assert len(pixels) == len(cached) == 2
    for pixel, latent in zip(pixels, cached):
        assert pixel["__key__"] == latent["__key__"] and "video" not in latent
        assert torch.equal(pixel["frame_index"], latent["frame_index"])
        assert torch.equal(pixel["reference_index"], latent["reference_index"])
        assert torch.equal(pixel["reference"], latent["reference"]) and torch.equal(pixel["pose"], latent["pose"])
        # Round trip: the cached mean and std are the VAE's posterior of the clip's frames.
        with torch.no_grad():
            posterior = vae.encode(pixel["video"].flatten(0, 1)).latent_dist
        mean, std = latent["video_latents"].float().flatten(0, 1).unbind(1)
        torch.testing.assert_close(mean, posterior.mean, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(std, posterior.std, rtol=2e-3, atol=2e-4)
        # The posterior sample from the cache is the one the VAE's own posterior.sample draws.
        from_vae = module.model.encode_video(pixel["video"], generator=torch.Generator().manual_seed(5))
        from_cache = sample_cached(module.model, latent["video_latents"], torch.Generator().manual_seed(5))
        torch.testing.assert_close(from_cache, from_vae, **LATENT_TOL)
        # The same objective draws give the same loss, the VAE encode skipped.
        start = module.objective_rng_state()
        from_pixels = module.diffusion_loss(pixel)
        after_pixels = module.objective_rng_state()
        module.load_objective_rng_state(start)
        from_latents = module.diffusion_loss(latent)
        assert torch.equal(module.objective_rng_state(), after_pixels)  # same draws, same order
        assert from_latents.item() == pytest.approx(from_pixels.item(), rel=LOSS_RTOL)


def test_bad_input_is_one_clear_error(encoded, tmp_path, capsys):
    source, out = encoded[:2]
    assert main(["encode", source, "--out", str(tmp_path / "x"), "--vae", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "model.pretrained.vae" in error and "missing" in error
    assert not (tmp_path / "x").exists()
    with pytest.raises(LatentsError, match="hold no cached latents.*xdyna-data encode"):
        ClipLoader(loader_config(source, crop="center", latents=True), rank=0, world_size=1)
    with pytest.raises(LatentsError, match="encoded at 64x32 with a center crop, the config asks for 32x16"):
        ClipLoader(loader_config(out, crop="center", height=32, width=16, latents=True), rank=0, world_size=1)
    with pytest.raises(LatentsError, match="asks for 64x32 with a random crop"):
        ClipLoader(loader_config(out, crop="random", latents=True), rank=0, world_size=1)


def test_training_refuses_latents_another_vae_encoded(encoded):
    """Latents of another VAE would train the denoiser in a latent space the model does not decode,
    silently: xdyna-train checks the encoding VAE's digest against its model's before training."""
    from datapipes.loader import latents_records
    from xdyna.errors import ConfigError
    from xdyna.latents import check_cached_vae, load_vae
    from xdyna.models import ModelConfig

    records = latents_records(loader_config(encoded[1], crop="center", latents=True))
    assert list(records) == ["data.shards"]
    check_cached_vae(load_vae(ModelConfig())[0], records)  # the VAE that encoded them (the tiny default)
    with pytest.raises(ConfigError, match=r"data.latents: data.shards \(VAE random init .*\) were encoded with another VAE"):
        check_cached_vae(load_vae(ModelConfig(init_seed=1))[0], records)


def test_encoding_an_index_keeps_its_curation_decisions(encoded, tmp_path):
    """Retuning the thresholds of an encoded set must not need the source index: its curation
    decisions (with their scores) and not_packed list carry over."""
    from datapipes.index import FORMAT, INDEX

    source = encoded[0]
    curation = [{"key": "clip-a", "decision": "kept", "motion": 0.4}, {"key": "clip-b", "decision": "static", "motion": 0.01}]
    index = os.path.join(source, INDEX)
    with open(index, "w") as handle:
        json.dump({"format": FORMAT, "shards": sorted(n for n in os.listdir(source) if n.endswith(".tar")),
                   "curation": curation, "not_packed": ["clip-c"]}, handle)
    try:
        out = str(tmp_path / "encoded")
        assert main(["encode", index, "--out", out, "--height", "64", "--width", "32"]) == 0
    finally:
        os.unlink(index)  # the module's other tests read the source folder as it was
    with open(os.path.join(out, INDEX)) as handle:
        encoded_index = json.load(handle)
    assert encoded_index["curation"] == curation and encoded_index["not_packed"] == ["clip-c"]
    assert encoded_index["curation_decisions"] == {"kept": 1, "static": 1} and encoded_index["encoded_from"] == index
    assert encoded_index["samples"] == 3
