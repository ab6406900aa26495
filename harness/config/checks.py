"""Checks of a whole config before anything is built, submitted or written: the values (`validate`) and the
files a run will read (`check_run_inputs`). One error line naming the key or file on bad input."""

from __future__ import annotations

from omegaconf import DictConfig

from harness.autoencoders import check_autoencoder_config, check_autoencoder_source
from harness.config import latent_geometry
from harness.config.values import check_eval_schedule, check_eval_values, check_values
from harness.data import check_data_source
from harness.model import check_model_config


def validate(cfg: DictConfig, evaluates: bool = False) -> None:
    """Check every value that would otherwise fail deep inside a job; raise one HarnessError line. The schema
    has checked the keys and their types at composition; this checks ranges, choices and what keys imply together.
    The `eval` values count when the run evaluates (eval.every set) or `evaluates` (`harness eval`)."""
    check_autoencoder_config(cfg.autoencoder, cfg.data)  # first: a VAE on the wrong images also breaks the geometry
    for section in ("data", "autoencoder", "model"):
        check_values(cfg[section], section)
    check_model_config(cfg.model, latent_geometry(cfg))
    check_values(cfg.trainer, "trainer")
    check_values(cfg, "")
    check_values(cfg.diffusion, "diffusion")
    check_eval_schedule(cfg.eval)
    if evaluates or cfg.eval.every is not None:
        check_eval_values(cfg.eval, cfg.diffusion.num_timesteps)


def check_run_inputs(cfg: DictConfig) -> None:
    """The files a run will read, checked before it starts or is submitted (a missing FID extractor or VAE must
    not surface after hours of training): its data (the latent cache's index, the image folder's classes), the
    VAE it encodes or decodes with, and with eval.every set the FID extractor's weights and reference."""
    check_data_source(cfg.data, cfg.autoencoder)
    evaluates = cfg.eval.every is not None
    if evaluates or cfg.data.name != "latents":
        check_autoencoder_source(cfg.autoencoder)
    if evaluates:
        from harness.evaluate.fid import check_eval_config  # torch-fidelity loads in 3 s: only for a run that evaluates

        check_eval_config(cfg.eval, cfg.data)
