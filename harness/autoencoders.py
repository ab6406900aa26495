"""Autoencoders: what maps images in [-1, 1] to the space the DiT is trained in, and back (to uint8 images too).

`identity` trains in pixel space (the embedded digits default). `sd-vae-ft-ema` / `sd-vae-ft-mse` are
Stable Diffusion's VAE through diffusers' `AutoencoderKL`, as in the DiT paper: the latent is a sample
of the encoder's posterior times `scale_factor` (0.18215), and decoding divides by it first. The
weights come from `autoencoder.path` (a local directory or a hub id); nothing is downloaded when the
hub is offline, and a missing model is one HarnessError naming that key.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from harness.errors import HarnessError, first_line, require

VAE_NAMES = ("sd-vae-ft-ema", "sd-vae-ft-mse")


class Autoencoder(torch.nn.Module):
    """Common interface: `encode(x in [-1, 1]) -> latents`, `decode(latents) -> x in [-1, 1]`.

    Both run without gradients and take optional `batch_size` to bound memory on large inputs.
    """

    name: str
    latent_channels: int
    downsample: int
    scale_factor: float

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               batch_size: int | None = None) -> torch.Tensor:
        return _batched(lambda chunk: self._encode(chunk, generator), x, batch_size)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        return _batched(self._decode, z, batch_size)

    def decode_uint8(self, z: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """`decode` to uint8 images: what FID and the sample files take."""
        return to_uint8(self.decode(z, batch_size))

    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, as DiT's sample.py converts them (127.5 x + 128, clamped, truncated)."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def _batched(fn, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    if batch_size is None or len(x) <= batch_size:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the DiT sees the images themselves."""

    def __init__(self, channels: int):
        super().__init__()
        self.name = "identity"
        self.latent_channels = int(channels)
        self.downsample = 1
        self.scale_factor = 1.0

    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x.clone()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clone()


class VAEAutoencoder(Autoencoder):
    """Stable Diffusion's KL autoencoder; latent = posterior sample x scale_factor."""

    def __init__(self, name: str, vae: torch.nn.Module, scale_factor: float):
        super().__init__()
        self.name = name
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(vae.config.latent_channels)
        # Each down block but the last halves the resolution.
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale_factor = float(scale_factor)

    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        posterior = self.vae.encode(x.to(self._dtype())).latent_dist
        return posterior.sample(generator=generator).float() * self.scale_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale_factor).to(self._dtype())).sample.float()

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def check_autoencoder_config(ae_cfg: DictConfig, data_cfg: DictConfig) -> None:
    """The autoencoder's settings against the images it encodes: checked with the config, before a run claims
    its directory, and again when the autoencoder is built."""
    name = str(ae_cfg.name)
    if name == "identity":
        require(int(ae_cfg.downsample) == 1, f"autoencoder.downsample must be 1 for identity, got {ae_cfg.downsample}")
        channels = ae_cfg.latent_channels if ae_cfg.latent_channels is not None else data_cfg.channels
        require(int(channels) == int(data_cfg.channels),
                f"autoencoder.latent_channels={channels} must equal data.channels={data_cfg.channels} for identity")
        return
    require(name in VAE_NAMES, f"autoencoder.name={name!r} is not one of identity, {', '.join(VAE_NAMES)}")
    require(int(data_cfg.channels) == 3, f"data.channels={data_cfg.channels}: the {name} VAE encodes RGB images (3 channels)")


def build_autoencoder(ae_cfg: DictConfig, data_cfg: DictConfig, device: str | torch.device = "cpu") -> Autoencoder:
    """The autoencoder of `ae_cfg` on `device`, checked against the geometry the config declares."""
    check_autoencoder_config(ae_cfg, data_cfg)
    name = str(ae_cfg.name)
    if name == "identity":
        return IdentityAutoencoder(int(data_cfg.channels)).to(device)
    ae = VAEAutoencoder(name, load_vae(str(ae_cfg.path)), float(ae_cfg.scale_factor))
    # The DiT's input geometry is computed from the config; it must describe the weights actually loaded.
    require(ae.downsample == int(ae_cfg.downsample),
            f"autoencoder.downsample={ae_cfg.downsample} but the VAE at {ae_cfg.path} downsamples by {ae.downsample}")
    if ae_cfg.latent_channels is not None:
        require(ae.latent_channels == int(ae_cfg.latent_channels),
                f"autoencoder.latent_channels={ae_cfg.latent_channels} but the VAE at {ae_cfg.path} has {ae.latent_channels}")
    return ae.to(device)


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    from huggingface_hub import constants  # the hub and diffusers: only the SD-VAE needs them (seconds to import)

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


VAE_HINT = "point autoencoder.path at a local directory holding the VAE's config.json and weights"


def local_vae_dir(path: str) -> Path | None:
    """The local directory `autoencoder.path` names, or None for a hub id (e.g. stabilityai/sd-vae-ft-ema)."""
    local = Path(path).expanduser()
    if not (local.is_absolute() or path.startswith((".", "~")) or local.exists()):
        return None
    require(local.is_dir(), f"autoencoder.path={path!r} is not a directory; {VAE_HINT}")
    return local


def check_autoencoder_source(ae_cfg: DictConfig) -> None:
    """The VAE `build_autoencoder` will load can be found, without loading it: a local directory with its
    config.json, or a hub id that is in the hub cache when the hub is offline. Nothing to find for identity."""
    if str(ae_cfg.name) == "identity":
        return
    path = str(ae_cfg.path)
    local = local_vae_dir(path)
    if local is not None:
        require((local / "config.json").is_file(), f"autoencoder.path={path!r} has no config.json; {VAE_HINT}")
    elif hub_offline():
        from huggingface_hub import try_to_load_from_cache  # see hub_offline

        require(isinstance(try_to_load_from_cache(path, "config.json"), str),
                f"autoencoder.path={path!r} is not in the hub cache and the hub is offline (HF_HUB_OFFLINE); {VAE_HINT}")


def load_vae(path: str) -> torch.nn.Module:
    """`AutoencoderKL.from_pretrained(path)` from a local directory, the hub cache, or (online) the hub."""
    from diffusers import AutoencoderKL  # see hub_offline
    from diffusers.utils import is_accelerate_available

    local = local_vae_dir(path)
    # Offline, only the local directory or the hub cache may be read: never wait on a connection.
    offline = hub_offline()
    try:
        with warnings.catch_warnings():  # deprecation notices between diffusers and huggingface_hub versions
            warnings.simplefilter("ignore")
            # The low-memory loader needs `accelerate`; without it diffusers falls back anyway, only noisily.
            return AutoencoderKL.from_pretrained(str(local) if local is not None else path,
                                                 local_files_only=offline or local is not None,
                                                 low_cpu_mem_usage=is_accelerate_available())
    except Exception as err:  # diffusers/huggingface_hub raise OSError, ValueError, HTTP and JSON errors
        reason = first_line(err)[:200]
        where = "offline (HF_HUB_OFFLINE) and not in the hub cache" if offline and local is None else reason
        raise HarnessError(f"autoencoder.path={path!r}: cannot load the AutoencoderKL weights ({where}); {VAE_HINT}") from None


_AUTOENCODERS: dict[tuple[str, str], torch.nn.Module] = {}


def run_autoencoder(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The run's autoencoder, built once per (config, device) and shared by training's encoder and
    evaluation's decoder: a VAE costs seconds and hundreds of MB to load."""
    key = (OmegaConf.to_yaml(cfg.autoencoder, resolve=True) + OmegaConf.to_yaml(cfg.data, resolve=True), str(device))
    if key not in _AUTOENCODERS:
        _AUTOENCODERS[key] = build_autoencoder(cfg.autoencoder, cfg.data, device=device)
    return _AUTOENCODERS[key]
