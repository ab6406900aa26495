"""Composing and checking configs.

One place turns Hydra-style overrides into a resolved config (`compose`), derives the DiT's input
geometry from the data and autoencoder groups (`latent_geometry`), and checks a config before
anything is built, submitted or written (`validate`). The CLI, the train app, sweeps, notebooks
and tests all go through these functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.errors import HarnessError, first_line, require

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONDITIONINGS = ("adaln_zero", "adaln", "cross_attention", "in_context")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def slug(text: str) -> str:
    """A name safe for a directory: `DiT-XL/2` -> `DiT-XL-2`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)


def config_groups(group: str) -> list[str]:
    """The options of a config group, e.g. every model name under `conf/model/`."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


PAPER_EXPERIMENT = "experiment=imagenet256"


def with_paper_setting(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`overrides`, plus the paper's setting (ImageNet-256 latents) when they pick a paper model (model=DiT-*)
    and neither an experiment nor a dataset: `harness dry-run model=DiT-XL/2` means the paper's DiT-XL/2."""
    overrides = list(overrides)
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    paper_model = any(o.startswith("model=DiT-") for o in overrides)
    if paper_model and not keys & {"experiment", "data", "autoencoder"}:
        return [PAPER_EXPERIMENT, *overrides]
    return overrides


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The resolved config for `overrides`, as `harness train` would see it (bad overrides raise HarnessError)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise HarnessError(first_line(err)) from None
    return cfg


@dataclass(frozen=True)
class Geometry:
    """What the DiT sees: a (channels, size, size) latent and num_classes labels."""

    input_size: int
    in_channels: int
    num_classes: int

    def tokens(self, patch_size: int) -> int:
        return (self.input_size // patch_size) ** 2


def latent_geometry(cfg: DictConfig) -> Geometry:
    """The DiT input geometry implied by `data` and `autoencoder` (e.g. 256px through the SD VAE -> 32x32x4)."""
    data, ae = cfg.data, cfg.autoencoder
    require(int(data.image_size) > 0, f"data.image_size must be a positive integer, got {data.image_size}")
    require(int(ae.downsample) > 0, f"autoencoder.downsample must be a positive integer, got {ae.downsample}")
    require(
        data.image_size % ae.downsample == 0,
        f"data.image_size={data.image_size} is not divisible by autoencoder.downsample={ae.downsample}",
    )
    channels = ae.latent_channels if ae.latent_channels is not None else data.channels
    return Geometry(int(data.image_size) // int(ae.downsample), int(channels), int(data.num_classes))


def validate(cfg: DictConfig) -> None:
    """Check every value that would otherwise fail deep inside a job; raise one HarnessError line."""
    from harness.model import check_model_config

    geometry = latent_geometry(cfg)
    require(geometry.in_channels > 0, f"data.channels / autoencoder.latent_channels must be positive, got {geometry.in_channels}")
    require(geometry.num_classes > 0, f"data.num_classes must be positive, got {geometry.num_classes}")
    check_model_config(cfg.model, geometry)
    trainer = cfg.trainer
    for key in ("max_steps", "global_batch_size", "ckpt_every", "log_every"):
        value = trainer[key]
        require(isinstance(value, int) and value > 0, f"trainer.{key} must be a positive integer, got {value!r}")
    require(float(trainer.lr) > 0, f"trainer.lr must be positive, got {trainer.lr}")
    require(0.0 <= float(trainer.ema_decay) < 1.0, f"trainer.ema_decay must be in [0, 1), got {trainer.ema_decay}")
    require(trainer.precision in PRECISIONS, f"trainer.precision={trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
    require(trainer.compile in ("auto", True, False), f"trainer.compile must be auto, true or false, got {trainer.compile!r}")
    require(trainer.compile_mode in COMPILE_MODES,
            f"trainer.compile_mode={trainer.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    require(trainer.attention in ATTENTION_KERNELS,
            f"trainer.attention={trainer.attention!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    require(isinstance(trainer.ddp_bucket_mb, (int, float)) and trainer.ddp_bucket_mb > 0,
            f"trainer.ddp_bucket_mb must be a positive number, got {trainer.ddp_bucket_mb!r}")
    require(trainer.keep_last >= 1, f"trainer.keep_last must be >= 1, got {trainer.keep_last}")
    require(
        cfg.on_config_change in ("refuse", "resume", "overwrite"),
        f"on_config_change={cfg.on_config_change!r} is not one of refuse, resume, overwrite",
    )
    diffusion = cfg.diffusion
    require(int(diffusion.num_timesteps) > 0, f"diffusion.num_timesteps must be positive, got {diffusion.num_timesteps}")
    if cfg.eval.every is not None:
        require(int(cfg.eval.every) >= 0, f"eval.every must be >= 0 or null, got {cfg.eval.every}")
        check_eval_values(cfg.eval, int(diffusion.num_timesteps))


def check_eval_values(ev: DictConfig, num_timesteps: int) -> None:
    """The `eval` values that need no files (sample counts, labels, guidance, sampler); the extractor and its
    weights are checked by `harness.evaluate.check_eval_config`, which calls this too."""
    from harness.diffusion import parse_sampler

    require(int(ev.num_samples) >= 2, f"eval.num_samples must be >= 2 for FID, got {ev.num_samples}")
    require(int(ev.batch_size) > 0, f"eval.batch_size must be positive, got {ev.batch_size}")
    require(ev.labels in ("balanced", "uniform"), f"eval.labels={ev.labels!r} is not one of balanced, uniform")
    require(float(ev.cfg_scale) >= 1.0, f"eval.cfg_scale must be >= 1 (1 = no guidance), got {ev.cfg_scale}")
    require(ev.precision in PRECISIONS, f"eval.precision={ev.precision!r} is not one of {', '.join(PRECISIONS)}")
    require(ev.max_forward_batch == "auto" or (isinstance(ev.max_forward_batch, int) and ev.max_forward_batch > 0),
            f"eval.max_forward_batch must be auto or a positive integer, got {ev.max_forward_batch!r}")
    parse_sampler(str(ev.sampler), num_timesteps)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
