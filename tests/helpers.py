"""Small fixtures shared by the tests: a generated ImageFolder and a tiny randomly initialised VAE.

Nothing here downloads anything; both are built in a temporary directory in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_folder(root, classes: int = 2, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """`root/class_<k>/img_<i>.png`: random RGB images of varying aspect ratio around `size` pixels.

    Each image is a noisy left-to-right gradient, so it is not mirror-symmetric (a flip changes it),
    and half of them are larger than 2x `size` so ADM's BOX-halving path runs too.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            scale = 1 if i % 2 == 0 else 2
            height, width = size * scale + 3 * (i % 3), size * scale + 8 * ((i + k) % 4)
            ramp = np.linspace(0, 255, width)[None, :, None] * np.array([1.0, 0.5, 0.2]) * ((k + 1) / classes)
            noise = rng.integers(0, 64, size=(height, width, 3))
            pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


def make_tiny_vae(directory, latent_channels: int = 4, seed: int = 0) -> Path:
    """A randomly initialised diffusers AutoencoderKL (downsample 2, 8/16 channels) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    directory = Path(directory)
    vae.save_pretrained(directory)
    return directory


def tiny_vae_overrides(vae_dir) -> list[str]:
    """Config overrides selecting the tiny VAE of `make_tiny_vae` (it downsamples by 2, not 8)."""
    return ["autoencoder=sd-vae-ft-ema", f"autoencoder.path={vae_dir}", "autoencoder.downsample=2"]
