"""Composing configs: Hydra-style overrides into a resolved config, and what a config implies.

One place turns overrides into a resolved config against the schema (`compose`, `schema.py`), derives the
DiT's input geometry from the data and autoencoder groups (`latent_geometry`) and the device a setting names
(`resolve_device`). The allowed values live in `values.py`, the checks of a whole config in `checks.py`. The
CLI, the train app, sweeps, notebooks and tests all go through these functions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hydra import compose as hydra_compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from harness.config import schema  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from harness.config.values import (ATTENTION_KERNELS, COMPILE_MODES, CONDITIONINGS, PRECISIONS,  # noqa: F401
                                   check_eval_values, integer, number, one_of, rule_error)
from harness.errors import HarnessError, first_line, require

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def slug(text: str) -> str:
    """A name safe for a directory: `DiT-XL/2` -> `DiT-XL-2`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)
# `${default:${key},fallback}`: oc.select falls back only for a missing key, not for one set to null.
if not OmegaConf.has_resolver("default"):
    OmegaConf.register_new_resolver("default", lambda value, fallback: fallback if value is None else value)
# `${seed_suffix:${seed}}`: seed replicas get run dirs of their own (`-seed1`), seed 0 keeps the name it always had.
if not OmegaConf.has_resolver("seed_suffix"):
    OmegaConf.register_new_resolver("seed_suffix", lambda seed: "" if str(seed) == "0" else f"-seed{seed}")


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


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train",
            return_hydra_config: bool = False) -> DictConfig:
    """The resolved config for `overrides`, as `harness train` would see it (bad overrides raise HarnessError);
    with `return_hydra_config`, its `hydra` node too (e.g. hydra.run.dir)."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise HarnessError(composition_error(err)) from None
    return cfg


def composition_error(err: Exception) -> str:
    """One line for a Hydra composition error that names the key and what is allowed (Hydra's own message
    spreads that over many lines, or leaves it out)."""
    text = str(err)
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing and config_groups(missing.group(1)):
        group, option = missing.groups()
        return f"{group}={option} is not one of {', '.join(config_groups(group))}"
    unknown = re.search(r"Could not override '([^']+)'\.\s*To append to your config use (\S+)", text)
    if unknown:
        return f"{unknown.group(1)} is not a config key (check its spelling; a new key is added as {unknown.group(2)})"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, ValidationError) and cause.full_key:  # an override of the wrong type
        # Worded as the key's rule words a bad value, so the line is the same whether the type or the range is wrong.
        return rule_error(cause.full_key, cause.value) or f"{cause.full_key}: {first_line(cause)}"
    in_file = re.match(r"In '([^']+)': (\w+) raised while composing config:\n(.*)\n\s*full_key: (\S+)", text)
    if in_file:  # a config file with a key the schema lacks, or a value of the wrong type
        config, kind, message, key = in_file.groups()
        what = "is not a config key" if kind == "ConfigKeyError" else "has a value of the wrong type"
        return f"{key} {what} (conf/{config}.yaml: {message})"
    return first_line(err)


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
    image_size, downsample = integer(data, "image_size"), integer(ae, "downsample")
    require(image_size % downsample == 0,
            f"data.image_size={image_size} is not divisible by autoencoder.downsample={downsample}")
    channels = integer(ae, "latent_channels", optional=True) or integer(data, "channels")
    return Geometry(image_size // downsample, channels, integer(data, "num_classes"))


def evaluates_at(ev: DictConfig, step: int, max_steps: int) -> bool:
    """Whether a training run evaluates at `step`: every eval.every steps and at the last (0: only at the last;
    null: never)."""
    every = ev.get("every")
    return every is not None and (step >= max_steps or (every > 0 and step % every == 0))


def evaluation_steps(ev: DictConfig, max_steps: int) -> list[int]:
    """The steps `evaluates_at` says yes to, in order (for plans; the training loop asks step by step)."""
    every = ev.get("every")
    if every is None:
        return []
    return [*(range(every, max_steps, every) if every > 0 else ()), max_steps]


def samples_fid_at(ev: DictConfig, step: int, max_steps: int) -> bool:
    """Whether the evaluation at `step` samples for FID too, not only the validation loss: every eval.fid_every
    steps and at the last (0: only at the last; null: at every evaluation). The validation loss costs a small
    fraction of sampling, so a loss curve can have many points and the FID a few."""
    fid_every = ev.get("fid_every")
    return step >= max_steps or fid_every is None or (fid_every > 0 and step % fid_every == 0)


def resolve_device(spec, key: str):
    """The torch.device a setting (`key`) names. `auto`: this process's GPU when CUDA is visible, else the CPU;
    `cuda`: this process's GPU (cuda:LOCAL_RANK, as torchrun and SLURM number a node's processes); `cuda:N`,
    `cpu`: as named. Naming CUDA where none is visible is an error, not a silent fall back to the CPU."""
    import torch  # heavy: reading a config (status, report) must not import it, resolving a device needs it

    spec = "auto" if spec is None else str(spec)
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec) is not None, f"{key}={spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    require(torch.cuda.is_available(), f"{key}={spec} but no CUDA device is visible")
    if spec in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device(spec)


# Keys added to the configs after runs may have been saved, each with the value that trains as those runs did:
# a stored config (a run's config.yaml, a checkpoint's) is read with them filled in, so an older run still
# resumes, plans and evaluates instead of differing from today's config by a key it never had.
KEYS_ADDED_LATER = {"trainer.compile_tuning": False, "trainer.residual_precision": "fp32", "eval.val_timesteps": 0,
                    "eval.val_limit": None, "trainer.parallel": "ddp", "trainer.async_checkpoint": False,
                    "eval.fid_resamples": "auto", "trainer.warmup_steps": 0, "trainer.lr_schedule": "constant"}
_ABSENT = object()


def with_keys_added_later(cfg: DictConfig) -> DictConfig:
    """`cfg`, a run's stored config, with the keys of KEYS_ADDED_LATER it lacks set to what it trained with."""
    for key, value in KEYS_ADDED_LATER.items():
        parent = key.rsplit(".", 1)[0]
        if OmegaConf.select(cfg, parent) is not None and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
