"""Composing and checking configs.

One place turns Hydra-style overrides into a resolved config (`compose`), derives the DiT's input
geometry from the data and autoencoder groups (`latent_geometry`), and checks a config before
anything is built, submitted or written (`harness.config.checks`). The CLI, the train app, sweeps, notebooks
and tests all go through these functions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.diffusion import parse_sampler
from harness.errors import HarnessError, first_line, require

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
CONDITIONINGS = ("adaln_zero", "adaln", "cross_attention", "in_context")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def slug(text: str) -> str:
    """A name safe for a directory: `DiT-XL/2` -> `DiT-XL-2`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)
# `${default:${key},fallback}`: oc.select falls back only for a missing key, not for one set to null.
if not OmegaConf.has_resolver("default"):
    OmegaConf.register_new_resolver("default", lambda value, fallback: fallback if value is None else value)


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
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

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
    return first_line(err)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is an int to Python


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(node: DictConfig, key: str, low: int = 1, optional: bool = False, section: str | None = None) -> int | None:
    """`node[key]` as an integer >= `low` (None allowed when `optional`), else one error line naming the key
    (`section.key` when the node is not part of a full config, e.g. a model config on its own)."""
    value = node.get(key)
    if optional and value is None:
        return None
    kind = "a positive integer" if low == 1 else f"an integer >= {low}"
    require(_is_integer(value) and value >= low,
            f"{_full_key(node, key, section)} must be {kind}{' or null' if optional else ''}, got {value!r}")
    return value


def number(node: DictConfig, key: str, allowed: str, test=lambda v: True, optional: bool = False) -> float | None:
    """`node[key]` as a number passing `test` (described by `allowed`, e.g. "in [0, 1)"), else one error line."""
    value = node.get(key)
    if optional and value is None:
        return None
    ok = _is_number(value) and test(value)
    require(ok, f"{_full_key(node, key)} must be a number {allowed}{' or null' if optional else ''}, got {value!r}")
    return float(value)


def one_of(node: DictConfig, key: str, allowed: tuple) -> None:
    """`node[key]` is one of `allowed`, of the same type (1 is not true), else one error line naming the key."""
    value = node.get(key)
    require(any(value == a and type(value) is type(a) for a in allowed),
            f"{_full_key(node, key)}={value!r} is not one of {', '.join(map(str, allowed))}")


def _full_key(node: DictConfig, key: str, section: str | None = None) -> str:
    parent = section or (node._get_full_key(None) if isinstance(node, DictConfig) else "")
    return f"{parent}.{key}" if parent else key


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


def resolve_device(spec, key: str):
    """The torch.device a setting (`key`) names. `auto`: this process's GPU when CUDA is visible, else the CPU;
    `cuda`: this process's GPU (cuda:LOCAL_RANK, as torchrun and SLURM number a node's processes); `cuda:N`,
    `cpu`: as named. Naming CUDA where none is visible is an error, not a silent fall back to the CPU."""
    import torch

    spec = "auto" if spec is None else str(spec)
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec) is not None, f"{key}={spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    require(torch.cuda.is_available(), f"{key}={spec} but no CUDA device is visible")
    if spec in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device(spec)


def check_eval_values(ev: DictConfig, num_timesteps: int) -> None:
    """The `eval` values that need no files (sample counts, labels, guidance, sampler); the extractor and its
    weights are checked by `harness.evaluate.check_eval_config`, which calls this too."""
    require(_is_integer(ev.num_samples) and ev.num_samples >= 2,
            f"eval.num_samples must be an integer >= 2 for FID, got {ev.num_samples!r}")
    integer(ev, "batch_size")
    integer(ev, "seed", low=0)
    integer(ev, "reference_limit", low=2, optional=True)
    integer(ev, "cfg_channels", optional=True)
    one_of(ev, "labels", ("balanced", "uniform"))
    number(ev, "cfg_scale", ">= 1 (1 = no guidance)", lambda v: v >= 1)
    number(ev, "ddim_eta", ">= 0", lambda v: v >= 0)
    one_of(ev, "precision", PRECISIONS)
    require(ev.max_forward_batch == "auto" or (isinstance(ev.max_forward_batch, int) and ev.max_forward_batch > 0),
            f"eval.max_forward_batch must be auto or a positive integer, got {ev.max_forward_batch!r}")
    parse_sampler(str(ev.sampler), num_timesteps, key="eval.sampler")


# Keys added to the configs after runs may have been saved, each with the value that trains as those runs did:
# a stored config (a run's config.yaml, a checkpoint's) is read with them filled in, so an older run still
# resumes, plans and evaluates instead of differing from today's config by a key it never had.
KEYS_ADDED_LATER = {"trainer.compile_tuning": False, "trainer.residual_precision": "fp32"}
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
