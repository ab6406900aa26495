"""One training step and what it is made of: the model, EMA and optimizer it updates, the per-step random draws
(the same on every rank and after any resume), the update itself, and the watch for a non-finite loss.

Exactness. Every random draw of a training step (timesteps, noise, label dropout) comes from a generator seeded
by (seed, step) over the GLOBAL batch, of which each rank takes its slice, and the data stream is a resumable,
seeded permutation. So a run killed at any moment and resumed from its last checkpoint ends bitwise equal to an
uninterrupted run (on CPU), and W ranks with batch B/W train the same samples as one process with batch B.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from omegaconf import DictConfig

from harness.config import latent_geometry
from harness.diffusion import create_diffusion
from harness.model import build_model
from harness.train.runtime import Dist, fully_shard_training

LOGGED_LOSSES = ("loss", "mse", "vb")  # each a mean over the logging window


# ----------------------------------------------------------------------------- model, EMA, optimizer


def build_training(cfg: DictConfig, device: torch.device, dist: Dist | None = None) -> tuple:
    """(model, fp32 EMA, optimizer, diffusion) of `cfg` on `device`. The model is initialised on the CPU from
    `cfg.seed`, so every rank and every device starts from the same weights. With `trainer.parallel=fsdp` (and
    the job's `dist`) the model and the EMA are sharded alike (`runtime.fully_shard_training`) before the
    optimizer is built on the shards."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, latent_geometry(cfg)).to(device)
    model.grad_checkpointing = bool(cfg.trainer.grad_checkpointing)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Training only: the EMA samples FIDs as `harness eval` does, with the residual stream in fp32.
    model.low_precision_residual = cfg.trainer.residual_precision == "bf16"
    if dist is not None and cfg.trainer.parallel == "fsdp":
        fully_shard_training(model, ema, cfg.trainer, dist)
    return model, ema, build_optimizer(model, cfg.trainer, device), create_diffusion(cfg.diffusion)


def build_optimizer(model: torch.nn.Module, tc: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as configured; PyTorch's fused kernel (CUDA and CPU) unless told otherwise: on a CPU the per-parameter
    loop of the plain one cost mini-S/8 about 15% of its step (docs/demo.md)."""
    fused = tc.fused_adamw is True or (tc.fused_adamw == "auto" and device.type in ("cuda", "cpu"))
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas),
                             fused=fused or None)


def learning_rate(tc: DictConfig, step: int) -> float:
    """The lr of the optimizer step that takes a run from `step` to `step + 1`: a linear warm-up over
    `trainer.warmup_steps`, then `trainer.lr` held (constant, the paper's) or brought down to 0 at `max_steps` along
    a half cosine. A function of the step alone, as nanoGPT's, so a resumed run follows the same schedule."""
    lr = float(tc.lr) * min(1.0, (step + 1) / max(1, tc.warmup_steps))
    if tc.lr_schedule == "cosine" and step >= tc.warmup_steps:
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


# ----------------------------------------------------------------------------- per-step randomness


def step_generator(seed: int, step: int, device: torch.device, *stream: int) -> torch.Generator:
    """The generator of one training step, the same on every rank and after any resume (`stream` splits it)."""
    mixed = int(np.random.SeedSequence([seed, step, *stream]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def step_draws(gen, global_batch, rank_slice, sample_shape, num_timesteps, drop_prob, device):
    """Timesteps, noise and label-dropout mask for this rank's slice of the global batch."""
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=device)
    noise = torch.randn((global_batch, *sample_shape), generator=gen, device=device)
    drop = torch.rand(global_batch, generator=gen, device=device) < drop_prob
    return t[rank_slice], noise[rank_slice], drop[rank_slice]


# ----------------------------------------------------------------------------- the update


def train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc: DictConfig) -> dict:
    """One optimizer step: loss (labels where `drop` is set replaced by the null label), backward, clip, AdamW, EMA.

    Nothing here reads a value back to the host, so the CPU queues the next step while the GPU runs this one;
    a non-finite loss is caught by `NonFiniteWatch` before anything is written.
    """
    if x.is_cuda:  # CUDA graphs only there; on a CPU the call costs 1.5 s of torch._inductor imports at the first step
        torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: a new step, the last one's buffers are free
    losses = diffusion.training_losses(forward, x, t, {"y": y, "force_drop_ids": drop.long()}, noise=noise)
    losses["loss"].mean().backward()
    if tc.grad_clip and tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, model, float(tc.ema_decay))
    return losses


class NonFiniteWatch:
    """The first step whose loss was not finite, noted on the device: a host check after every step would
    make the GPU idle while the CPU queues the next one (a few percent of an H100 step, more for small models).

    `check` reads it (one sync; the earliest step over all ranks, so every rank stops together) and raises.
    The train loop checks before it logs, evaluates or saves anything, so nothing a non-finite loss touched
    reaches the disk; the steps between the bad one and the check are wasted, not written."""

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), self.NEVER, dtype=torch.int64, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self.first_step = torch.where(finite, self.first_step, self.first_step.clamp(max=step))

    def check(self, dist: Dist) -> None:
        first = self.first_step.clone()
        if dist.world_size > 1:
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        first = int(first)
        if first != self.NEVER:
            raise FloatingPointError(f"non-finite loss at step {first} (on at least one rank); stopping with "
                                     "the checkpoints before it untouched")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter. Under FSDP both are sharded alike, so each
    rank updates its own shards (the DTensors' local tensors): no communication."""
    ema_params = [_local(p) for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [_local(p.detach()) for p in model.parameters()], 1.0 - decay)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a view: updating it updates the parameter); a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_full_ema(ema: torch.nn.Module, full: torch.nn.Module) -> torch.nn.Module:
    """`full`, an unsharded model of the EMA's config, loaded with the sharded EMA's weights (every rank takes part
    in the all-gather): under FSDP each rank samples its share of an evaluation from a whole copy, as under DDP."""
    full.load_state_dict(get_model_state_dict(ema, options=StateDictOptions(full_state_dict=True)))
    return full
