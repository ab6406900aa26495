"""Validation loss: the diffusion loss of a run's EMA on the held-out split, at fixed timesteps with fixed noise.

Every held-out image (`eval.val_limit` of them at most, evenly spread) is noised at the same `eval.val_timesteps`
timesteps, evenly spaced over [0, T - 1], with noise from its own generator (seeded by `eval.seed`, VAL_STREAM and
the image's index), and scored by `GaussianDiffusion.training_losses` in fp32, in eval mode, labels as given. So
the value depends only on the weights: not on `eval.batch_size`, the number of ranks, or the global RNG, which is
never drawn from. Pixels through a VAE are encoded as training encodes them, a posterior sample, drawn per batch
of `eval.batch_size` from a generator of its own (that sample alone depends on the batch size).

Reported: the mean over images x timesteps of L_simple (`val_loss`) and of the variational-bound term of the hybrid
objective in bits/dim (`val_vb_bpd`), each with its standard error over images (an image's value: its mean over
the timesteps).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from omegaconf import DictConfig

from harness.autoencoders import run_autoencoder
from harness.data import build_dataset, seeded_generator
from harness.diffusion import create_diffusion
from harness.errors import require
from harness.progress import Say, quiet

# Mixed into the validation seeds so they never coincide with the training stream's or the sampling's draws.
VAL_STREAM = 0x7A1_1055


def has_held_out(data_cfg: DictConfig) -> bool:
    """Whether the data has a held_out split: a fraction held out (digits) or a second folder (imagefolder)."""
    return bool(data_cfg.get("held_out_fraction") or data_cfg.get("held_out_root"))


def timestep_grid(num_timesteps: int, count: int) -> torch.Tensor:
    """`count` timesteps evenly spaced over [0, num_timesteps - 1], rounded."""
    return torch.from_numpy(np.linspace(0, num_timesteps - 1, count).round().astype(np.int64))


def held_out_indices(n: int, limit: int | None) -> torch.Tensor:
    """All n indices, or `limit` of them evenly spread (the first ones would all be the first classes)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.from_numpy(np.linspace(0, n - 1, limit).round().astype(np.int64))


@torch.no_grad()
def validation_loss(model: nn.Module, cfg: DictConfig, device: torch.device, dist=None,
                    say: Say = quiet) -> dict | None:
    """{val_loss, val_loss_se, val_vb_bpd, val_vb_bpd_se, val_images, val_timesteps} of `model` (the EMA) on the
    held-out split of `cfg.data`; None when `eval.val_timesteps` is 0, or when the data have no held-out split
    (said in one line through `say`).

    Called by every rank of a job (`dist`: rank, world_size, host_group; None: one process): global batch b is
    scored by rank b % world_size and every rank returns the same numbers.
    """
    ev = cfg.eval
    count = int(ev.get("val_timesteps") or 0)
    if count == 0:
        return None
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if not has_held_out(cfg.data):
        if rank == 0:
            say(f"no validation loss: data={cfg.data.name} has no held-out split")
        return None
    dataset = build_dataset(cfg.data, "held_out")
    indices = held_out_indices(len(dataset), ev.get("val_limit"))
    diffusion = create_diffusion(cfg.diffusion)
    grid = timestep_grid(diffusion.num_timesteps, count).to(device)
    encoder = run_autoencoder(cfg, device) if cfg.autoencoder.name != "identity" else None
    seed = int(ev.seed)

    scored: list[tuple[int, float, float]] = []  # (image index, mean mse, mean vb) of this rank's images
    was_training = model.training
    model.eval()
    try:
        for b, batch in enumerate(indices.split(int(ev.batch_size))):
            if b % world_size != rank:
                continue
            items = [(int(i), dataset[int(i)]) for i in batch]
            items = [(i, item) for i, item in items if item is not None]  # an unreadable image skipped (imagefolder)
            if not items:
                continue
            x0 = torch.stack([x for _, (x, _) in items]).to(device)
            y = torch.stack([label for _, (_, label) in items]).to(device)
            if encoder is not None:
                x0 = encoder.encode(x0, generator=seeded_generator(seed, VAL_STREAM, 1, b))
            noise = torch.stack([torch.randn((count, *x0.shape[1:]), generator=seeded_generator(seed, VAL_STREAM, 2, i))
                                 for i, _ in items]).to(device)  # (images, timesteps, C, H, W)
            mse, vb = [], []
            for k in range(count):
                t = grid[k].expand(len(items))
                losses = diffusion.training_losses(model, x0, t, {"y": y}, noise=noise[:, k])
                mse.append(losses["mse"])
                vb.append(losses["vb"])
            mse, vb = torch.stack(mse).mean(0).tolist(), torch.stack(vb).mean(0).tolist()
            scored += [(i, m, v) for (i, _), m, v in zip(items, mse, vb)]
    finally:
        model.train(was_training)
    if world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
        everyone: list = [None] * world_size
        torch_dist.all_gather_object(everyone, scored, group=getattr(dist, "host_group", None))
        scored = [entry for part in everyone for entry in part]
    scored.sort()
    require(len(scored) >= 2, f"validation loss: {len(scored)} held-out image(s); a standard error needs 2 or more")
    mse, vb = np.array([m for _, m, _ in scored]), np.array([v for _, _, v in scored])
    return {"val_loss": float(mse.mean()), "val_loss_se": _standard_error(mse),
            "val_vb_bpd": float(vb.mean()), "val_vb_bpd_se": _standard_error(vb),
            "val_images": len(scored), "val_timesteps": count}


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values)))
