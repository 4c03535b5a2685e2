"""The model side of cached latents (``xdyna-data encode``, docs/data.md): the VAE that encodes,
the encoder handed to :func:`datapipes.latents.encode_part`, and the posterior sample training
draws from a cached mean and std.

Training from pixels draws ``posterior.sample(generator)`` per chunk of ``vae_chunk_size``
frames (:meth:`xdyna.models.XDynaModel.encode_images`): ``mean + std * randn_tensor(chunk
shape, generator, device, dtype=VAE dtype)``, then multiplies by the VAE's ``scaling_factor``.
:func:`sample_cached` makes the same draws in the same order from the cached mean and std, so a
step from latents consumes the objective generator exactly as a step from pixels does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from datapipes.clips import to_batch_contract

from .errors import ConfigError
from .models import ModelConfig, XDynaModel, build_model
from .models.loading import require_folder


def load_vae(config: ModelConfig) -> tuple[AutoencoderKL, dict]:
    """The VAE training uses with ``config`` and a description of it for the shard records:
    ``pretrained.vae`` (an AutoencoderKL folder), else ``pretrained.sd15``'s ``vae/``, else the
    flavour's random init (tiny: tests only; built with the whole model, since the init order
    decides its weights). A missing folder is one error naming the key and the path."""
    paths = config.pretrained
    if paths.vae is not None:
        folder = require_folder(paths.vae, "a diffusers AutoencoderKL folder", "model.pretrained.vae", ("config.json",))
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        source = str(Path(folder).resolve())
    elif paths.sd15 is not None:
        folder = require_folder(paths.sd15, "a diffusers-format Stable Diffusion 1.5 folder", "model.pretrained.sd15",
                                ("vae",))
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        source = str((Path(folder) / "vae").resolve())
    else:
        if config.flavour != "tiny":
            raise ValueError(f"flavour {config.flavour!r} without model.pretrained.vae or .sd15: latents of a randomly "
                             f"initialised VAE are of no use; give the VAE's folder (--vae or --sd15)")
        vae = build_model(config).vae
        source = f"random init (flavour {config.flavour}, init_seed {config.init_seed})"
    vae.requires_grad_(False).eval()
    return vae, {"weights": source, "scaling_factor": float(vae.config.scaling_factor),
                 "digest": vae_digest(vae), "chunk": int(config.vae_chunk_size)}


def vae_digest(vae: AutoencoderKL) -> str:
    """A short fingerprint of a VAE's weights (float32 values, so a bf16 copy of the same weights
    differs only where rounding does): enough to tell two VAEs apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items())[:8]:
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


def check_cached_vae(vae: AutoencoderKL, records: dict[str, dict]) -> None:
    """Refuse, in one line, latents that another VAE than ``vae`` encoded (``records``:
    :func:`datapipes.loader.latents_records`): the denoiser would learn in another latent space
    than the one the model decodes, and nothing downstream would notice."""
    own = vae_digest(vae)
    foreign = [f"{where} (VAE {(record.get('vae') or {}).get('weights')}, digest {(record.get('vae') or {}).get('digest')})"
               for where, record in records.items() if (record.get("vae") or {}).get("digest") != own]
    if foreign:
        raise ConfigError(f"data.latents: {'; '.join(foreign)} were encoded with another VAE than this model's "
                          f"(digest {own}); encode them again with this model's VAE (xdyna-data encode --sd15/--vae) "
                          f"or set model.pretrained to the VAE that encoded them")


def posterior_encoder(vae: AutoencoderKL, chunk: int, device: str | torch.device = "cpu"):
    """``frames uint8 (T, 3, H, W) -> (mean, std)`` of the VAE posterior, each ``(T, C, h, w)``,
    unscaled; frames scaled to [-1, 1] exactly as the loader's batches are."""
    vae = vae.to(device)

    @torch.no_grad()
    def encode(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_batch_contract({"video": frames})["video"].to(device)
        means, stds = [], []
        for part in images.split(chunk):
            posterior = vae.encode(part.to(vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    return encode


def sample_cached(model: XDynaModel, cached: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents sampled from cached ``(..., 2, C, h, w)`` posteriors (``[..., 0]`` the mean,
    ``[..., 1]`` the std): the draw ``model.encode_images`` makes from the same generator."""
    lead = cached.shape[:-4]
    flat = cached.reshape(-1, *cached.shape[-4:])
    dtype, device = model.vae.dtype, flat.device
    out = []
    for chunk in flat.split(model.config.vae_chunk_size):
        mean, std = chunk[:, 0].to(dtype), chunk[:, 1].to(dtype)
        out.append(mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=dtype))
    return (torch.cat(out) * model.vae_scale).reshape(*lead, *cached.shape[-3:])


def decode_cached(model: XDynaModel, cached: torch.Tensor) -> torch.Tensor:
    """``(B, F, 3, H, W)`` in [-1, 1]: the VAE's reconstruction of cached ``(B, F, 2, C, h, w)``
    posterior means (the ground truth a batch from latents can show)."""
    return model.decode_latents(cached.select(-4, 0).to(model.vae.dtype) * model.vae_scale)
