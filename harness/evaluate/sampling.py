"""Sampling for evaluation: seeded, label-balanced, batched samples of a DiT, and the files that show them.

The same checkpoint and `eval` config give the same images on any number of ranks: each global batch has
its own seed, whichever rank samples it. Sampling can be stopped between batches (`SamplingStopped`), so a
preempted job stops within one batch instead of after hours of FID sampling. Rank 0 says how far sampling is
(`harness.progress.Progress`: samples done, rate, ETA) without touching any random draw.
"""

from __future__ import annotations

import io
import math
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from harness.autoencoders import Autoencoder
from harness.config import Geometry
from harness.data import seeded_generator
from harness.diffusion import create_diffusion
from harness.errors import require
from harness.io import atomic_write_bytes
from harness.progress import Progress, Say, quiet, to_stderr

# Mixed into evaluation seeds so they never coincide with the training stream's (seed, step) draws.
EVAL_STREAM = 0x5EED_E7A1


def eval_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Class labels of the evaluation samples, in sample-index order.

    balanced: exactly num_samples // num_classes of each class, the remainder given to classes picked by a
    seeded permutation, then shuffled; uniform: independent uniform draws (the released sampler's way).
    """
    require(mode in ("balanced", "uniform"), f"eval.labels={mode!r} is not one of balanced, uniform")
    gen = seeded_generator(int(seed), EVAL_STREAM, 1)
    if mode == "uniform":
        return torch.randint(num_classes, (num_samples,), generator=gen)
    counts = torch.full((num_classes,), num_samples // num_classes, dtype=torch.long)
    counts[torch.randperm(num_classes, generator=gen)[: num_samples % num_classes]] += 1
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels[torch.randperm(num_samples, generator=gen)]


def sample_labels(eval_cfg: DictConfig, geometry: Geometry) -> torch.Tensor:
    """The class each of `eval.num_samples` evaluation samples is conditioned on, in sample-index order (what
    `generate_samples` samples, and what class accuracy compares the samples with)."""
    return eval_labels(int(eval_cfg.num_samples), geometry.num_classes, str(eval_cfg.labels), int(eval_cfg.seed))


class SamplingStopped(Exception):
    """Sampling stopped between batches: the job is being preempted or stopped (see `generate_samples`)."""


@torch.no_grad()
def generate_samples(model: nn.Module, diffusion_cfg: DictConfig, autoencoder: Autoencoder, eval_cfg: DictConfig,
                     geometry: Geometry, device: str | torch.device, rank: int = 0, world_size: int = 1,
                     stop: Callable[[], bool] | None = None, say: Say = to_stderr) -> torch.Tensor | None:
    """`eval.num_samples` uint8 NCHW images from `model` (pass the EMA model), in sample-index order.

    The samples are cut into global batches of `eval.batch_size`; batch b is sampled with its own seed
    (from `eval.seed` and b) by rank b % world_size, so the same checkpoint and config give the same
    images on any number of ranks. Under torch.distributed the batches are gathered round by round to
    rank 0, which returns all images (other ranks return None); without it, a rank returns its own
    batches. Guidance (`eval.cfg_scale`, `eval.cfg_channels`) and the sampler come from `eval`. Rank 0 reports
    through `say` (a line at the start, then a bar on a terminal or periodic lines, then the total time and rate).
    """
    device = torch.device(device)
    n, bs, seed = int(eval_cfg.num_samples), int(eval_cfg.batch_size), int(eval_cfg.seed)
    labels = sample_labels(eval_cfg, geometry)
    diffusion = create_diffusion(diffusion_cfg)
    num_batches = math.ceil(n / bs)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    comm_device = device if distributed and dist.get_backend() == "nccl" else torch.device("cpu")
    shape = (geometry.in_channels, geometry.input_size, geometry.input_size)
    was_training = model.training
    model.eval()
    kept: list[torch.Tensor] = []
    image_shape = None
    say = say if rank == 0 else quiet
    say(f"sampling {n} images ({eval_cfg.sampler}, cfg {float(eval_cfg.cfg_scale):g}) in {num_batches} batch(es) "
        f"of {bs} on {world_size} rank(s) ...")
    try:
        with Progress(n, "sampling", "samples", say) as progress:
            for first in range(0, num_batches, world_size):
                if stop is not None and stop():  # every rank asks at each round, so all stop together
                    raise SamplingStopped(f"sampling stopped after {first} of {num_batches} batches")
                b = first + rank
                images = _sample_batch(model, diffusion, autoencoder, eval_cfg, labels, b, bs, shape, seed, device) \
                    if b < num_batches else None
                if not distributed:
                    kept += [images] if images is not None else []
                else:
                    if image_shape is None:  # rank 0 always holds batch 0; a rank without one learns the shape here
                        holder = [tuple(images.shape[1:]) if rank == 0 else None]
                        dist.broadcast_object_list(holder, src=0)
                        image_shape = holder[0]
                    # Every rank sends a full batch each round (zeros where it has fewer); rank 0 keeps the real ones.
                    padded = torch.zeros((bs, *image_shape), dtype=torch.uint8, device=comm_device)
                    if images is not None:
                        padded[: len(images)] = images.to(comm_device)
                    gathered = [torch.empty_like(padded) for _ in range(world_size)]
                    dist.all_gather(gathered, padded)
                    if rank == 0:
                        for k, tensor in enumerate(gathered):
                            if first + k < num_batches:
                                kept.append(tensor[: min(bs, n - (first + k) * bs)].cpu())
                progress.update(min(n, (first + world_size) * bs))  # this round's batches, on every rank together
    finally:
        model.train(was_training)
    if distributed and rank != 0:
        return None
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.uint8)


def _sample_batch(model, diffusion, autoencoder, eval_cfg, labels, b, bs, shape, seed, device) -> torch.Tensor:
    start, end = b * bs, min((b + 1) * bs, len(labels))
    # A CPU generator: diffusion draws the noise on the generator's device, so CPU and GPU runs get the same noise.
    gen = seeded_generator(seed, EVAL_STREAM, 2, b)
    latents = diffusion.sample(
        model, (end - start, *shape), labels[start:end].to(device), sampler=str(eval_cfg.sampler),
        cfg_scale=float(eval_cfg.cfg_scale), cfg_channels=eval_cfg.cfg_channels,
        eta=float(eval_cfg.get("ddim_eta", 0.0)), generator=gen, device=device,
    )
    return autoencoder.decode_uint8(latents).cpu()


def save_npz(images: torch.Tensor, path: str | os.PathLike) -> None:
    """ADM's sample-batch format: arr_0 = uint8 NHWC."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images.permute(0, 2, 3, 1).numpy())
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(images: torch.Tensor, path: str | os.PathLike, max_images: int = 64) -> None:
    """A PNG grid of the first `max_images` samples (square-ish, 1-pixel gaps)."""
    shown = images[:max_images]
    grid = make_grid(shown, nrow=math.ceil(math.sqrt(len(shown))), padding=1, pad_value=0)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
