"""Cached latents (``xdyna-data encode``, ``data.latents``) against pixels: what training saves.

    python -m tools.benchmarks.bench_latents --steps 12

1. ``step``: tiny model on CPU, one module and optimizer, steps alternating from pixels (the VAE
   encodes the clip and reference) and from cached latents (the posterior sampled from the
   cached mean/std), every step timed whole (loss, backward, AdamW), in the same run so both see
   the same machine load; medians and their ratio.
2. ``flops``: SD1.5 at 896x512, 16 frames, stage 1: the VAE encoder's FLOPs (clip + reference)
   and the whole training step's, from the project's FLOP counter (``xdyna.models.info``:
   FlopCounterMode on a meta-device model, no weights read).
3. ``bytes``: shard bytes per clip with and without latents: synthetic clips at 896x512 packed
   by ``xdyna-data synth`` (their H.264 stream) and the ``latents.npy`` member
   ``encode`` adds for the same frame count (float16 mean and std of every frame).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tools.benchmarks.bench_train import batches, make_module


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the loader's uint8 frames."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def step_times(steps: int, warmup: int = 2) -> dict:
    from xdyna.latents import posterior_encoder

    torch.manual_seed(0)
    module = make_module()
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    encode = posterior_encoder(module.model.vae, module.model.config.vae_chunk_size)
    pixel_batches = batches(steps + warmup)
    latent_batches = []
    for batch in pixel_batches:  # what the loader delivers from an encoded shard set
        video_mean, video_std = encode(_uint8(batch["video"]).flatten(0, 1))
        ref_mean, ref_std = encode(_uint8(batch["reference"]))
        frames = batch["video"].shape[1]
        latent_batches.append({
            "video_latents": torch.stack([video_mean, video_std], 1).unflatten(0, (-1, frames)).half(),
            "reference_latents": torch.stack([ref_mean, ref_std], 1).half(),
            **{k: v for k, v in batch.items() if k != "video"}})
    times = {"pixels": [], "latents": [], "vae_encode": []}
    for index in range(2 * (steps + warmup)):
        kind = "pixels" if index % 2 == 0 else "latents"
        batch = (pixel_batches if kind == "pixels" else latent_batches)[index // 2]
        start = time.perf_counter()
        module.diffusion_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index // 2 >= warmup:
            times[kind].append(time.perf_counter() - start)
        if kind == "pixels":  # the part a step from latents skips, timed alone beside the steps
            start = time.perf_counter()
            module.model.encode_video(batch["video"])
            module.model.encode_images(batch["reference"])
            if index // 2 >= warmup:
                times["vae_encode"].append(time.perf_counter() - start)
    pixels, latents, vae = (statistics.median(times[kind]) for kind in ("pixels", "latents", "vae_encode"))
    shape = tuple(pixel_batches[0]["video"].shape)
    return {"batch_BFCHW": shape, "steps_each": steps, "pixels_s": round(pixels, 4), "latents_s": round(latents, 4),
            "latents_over_pixels": round(latents / pixels, 3), "vae_encode_s": round(vae, 4),
            "vae_encode_over_pixel_step": round(vae / pixels, 4)}


def vae_share(frames: int = 16, height: int = 896, width: int = 512) -> dict:
    from omegaconf import OmegaConf

    from xdyna.models import ModelConfig, build_model
    from xdyna.models.info import count_flops, training_flops
    from xdyna.train.cli import CONF_DIR

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "sd15.yaml"))
    values.pop("defaults", None)
    model = build_model(ModelConfig.from_mapping(values), device="meta")
    model.set_trainable(["dynamics_adapter", "motion_modules", "pose_controlnet"])  # stage 1
    video = torch.zeros(1, frames, 3, height, width, device="meta")
    reference = torch.zeros(1, 3, height, width, device="meta")
    vae, _ = count_flops(lambda: (model.encode_video(video), model.encode_images(reference)))
    step = training_flops(model, ["pose"], frames, height, width)
    return {"shape": f"{height}x{width}x{frames}", "vae_encoder_tflops": round(vae / 1e12, 2),
            "step_tflops": round(step["training"] / 1e12, 2),
            "encoders_tflops": round(step["encoders"] / 1e12, 2),
            "vae_share_of_step": round(vae / step["training"], 4)}


def shard_bytes(frames: int = 16, height: int = 896, width: int = 512, clips: int = 2) -> dict:
    from datapipes import shards
    from datapipes.latents import to_bytes
    from datapipes.synthetic import write_synthetic_shards

    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_shards(folder, human=clips, scene=0, frames=frames, height=height, width=width, seed=0)
        urls = shards.expand_shard_urls(folder)
        reader = shards.TarSampleReader(urls)
        samples = [s for n in range(len(urls)) for s in reader.iter_shard(n)]
        reader.close()
    video = statistics.mean(len(s.members[shards.VIDEO]) for s in samples)
    members = statistics.mean(sum(len(v) for v in s.members.values()) for s in samples)
    zeros = torch.zeros(frames, 4, height // 8, width // 8)
    latents = len(to_bytes(zeros, zeros))
    return {"frames_per_clip": frames, "clip_bytes_pixels": int(members), "mp4_bytes": int(video),
            "latents_npy_bytes": latents, "clip_bytes_with_latents": int(members + latents),
            "latent_bytes_per_frame": latents // frames,
            "with_over_without": round((members + latents) / members, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--skip-flops", action="store_true")
    args = parser.parse_args()
    report = {"step": step_times(args.steps), "bytes": shard_bytes()}
    if not args.skip_flops:
        report["flops"] = vae_share()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
