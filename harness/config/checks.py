"""Checks of a whole config before anything is built, submitted or written: the values (`validate`) and the
files a run will read (`check_run_inputs`). One error line naming the key or file on bad input."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from harness.autoencoders import check_autoencoder_config, check_autoencoder_source
from harness.config import (ATTENTION_KERNELS, COMPILE_MODES, PRECISIONS, _is_integer, _is_number, check_eval_values, integer,
                            latent_geometry, number, one_of)
from harness.data import check_data_source
from harness.errors import require
from harness.evaluate.fid import check_eval_config
from harness.model import check_model_config


def validate(cfg: DictConfig) -> None:
    """Check every value that would otherwise fail deep inside a job; raise one HarnessError line."""
    check_autoencoder_config(cfg.autoencoder, cfg.data)  # first: a VAE on the wrong images also breaks the geometry
    check_model_config(cfg.model, latent_geometry(cfg))
    trainer = cfg.trainer
    for key in ("max_steps", "global_batch_size", "ckpt_every", "log_every", "keep_last", "gpus"):
        integer(trainer, key)
    number(trainer, "lr", "> 0", lambda v: v > 0)
    number(trainer, "weight_decay", ">= 0", lambda v: v >= 0)
    number(trainer, "ema_decay", "in [0, 1)", lambda v: 0 <= v < 1)
    number(trainer, "grad_clip", ">= 0 (0: no clipping)", lambda v: v >= 0)
    number(trainer, "ddp_bucket_mb", "> 0", lambda v: v > 0)
    number(trainer, "peak_tflops", "> 0", lambda v: v > 0, optional=True)
    betas = trainer.betas
    require(OmegaConf.is_list(betas) and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas),
            f"trainer.betas must be two numbers in [0, 1), got {betas!r}")
    milestones = trainer.ckpt_milestones
    require(OmegaConf.is_list(milestones) and all(_is_integer(m) and m > 0 for m in milestones),
            f"trainer.ckpt_milestones must be a list of positive integers, got {milestones!r}")
    one_of(trainer, "device", ("auto", "cpu", "cuda"))
    one_of(trainer, "precision", PRECISIONS)
    one_of(trainer, "compile", ("auto", True, False))
    one_of(trainer, "fused_adamw", ("auto", True, False))
    one_of(trainer, "tf32", (True, False))
    one_of(trainer, "grad_checkpointing", (True, False))
    one_of(trainer, "compile_mode", COMPILE_MODES)
    one_of(trainer, "compile_tuning", (True, False))
    one_of(trainer, "residual_precision", ("fp32", "bf16"))
    one_of(trainer, "attention", ATTENTION_KERNELS)
    one_of(cfg, "on_config_change", ("refuse", "resume", "overwrite"))
    integer(cfg, "seed", low=0)
    num_timesteps = integer(cfg.diffusion, "num_timesteps")
    for key in ("beta_start", "beta_end"):
        number(cfg.diffusion, key, "in (0, 1)", lambda v: 0 < v < 1)
    if integer(cfg.eval, "every", low=0, optional=True) is not None:
        check_eval_values(cfg.eval, num_timesteps)


def check_run_inputs(cfg: DictConfig) -> None:
    """The files a run will read, checked before it starts or is submitted (a missing FID extractor or VAE must
    not surface after hours of training): its data (the latent cache's index, the image folder's classes), the
    VAE it encodes or decodes with, and with eval.every set the FID extractor's weights and reference."""
    check_data_source(cfg.data, cfg.autoencoder)
    evaluates = cfg.eval.every is not None
    if evaluates or cfg.data.name != "latents":
        check_autoencoder_source(cfg.autoencoder)
    if evaluates:
        check_eval_config(cfg.eval, cfg.data, int(cfg.diffusion.num_timesteps))
