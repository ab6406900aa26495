"""The allowed values of each config key, stated once (`RULES`): the ranges and choices that the schema's types
cannot say. `harness.config.checks.validate` runs them on a composed config, and `compose` words a value the
schema refuses by the same rule, so a key reads the same error whichever of the two finds it."""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig, OmegaConf

from harness.errors import HarnessError, require

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attention", "in_context")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")
LR_SCHEDULES = ("constant", "cosine")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def _fid_samples(node: DictConfig, key: str) -> None:
    value = node.get(key)
    require(_is_integer(value) and value >= 2, f"{_full_key(node, key)} must be an integer >= 2 for FID, got {value!r}")


def _forward_batch(node: DictConfig, key: str) -> None:
    value = node.get(key)
    require(value == "auto" or (_is_integer(value) and value > 0),
            f"{_full_key(node, key)} must be auto or a positive integer, got {value!r}")


def _resamples(node: DictConfig, key: str) -> None:
    value = node.get(key)
    require(value == "auto" or (_is_integer(value) and value >= 0),
            f"{_full_key(node, key)} must be auto or an integer >= 0 (0: no interval), got {value!r}")


def _betas(node: DictConfig, key: str) -> None:
    betas = node.get(key)
    require(OmegaConf.is_list(betas) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
            f"{_full_key(node, key)} must be two numbers in [0, 1), got {betas!r}")


def _strings(node: DictConfig, key: str) -> None:
    lines = node.get(key)
    require(OmegaConf.is_list(lines) and all(isinstance(line, str) for line in lines),
            f"{_full_key(node, key)} must be a list of shell lines (strings), got {lines!r}")


def _milestones(node: DictConfig, key: str) -> None:
    milestones = node.get(key)
    require(OmegaConf.is_list(milestones) and all(_is_integer(m) and m > 0 for m in milestones),
            f"{_full_key(node, key)} must be a list of positive integers, got {milestones!r}")


positive = integer
flag = partial(one_of, allowed=(True, False))
auto_or_flag = partial(one_of, allowed=("auto", True, False))

# Every key with a range or a fixed set of values. harness.model.check_model_config and latent_geometry check the
# model's and the sizes' keys again, in the same words, for the configs that never pass validate (a stored one,
# a model config built by hand).
RULES = {
    "seed": partial(integer, low=0),
    "on_config_change": partial(one_of, allowed=("refuse", "resume", "overwrite")),
    "model.conditioning": partial(one_of, allowed=CONDITIONINGS),
    "model.depth": positive,
    "model.hidden_size": positive,
    "model.num_heads": positive,
    "model.patch_size": positive,
    "data.image_size": positive,
    "data.channels": positive,
    "data.num_classes": positive,
    "autoencoder.downsample": positive,
    "autoencoder.latent_channels": partial(integer, optional=True),
    "diffusion.num_timesteps": positive,
    "diffusion.beta_start": partial(number, allowed="in (0, 1)", test=lambda v: 0 < v < 1),
    "diffusion.beta_end": partial(number, allowed="in (0, 1)", test=lambda v: 0 < v < 1),
    "trainer.max_steps": positive,
    "trainer.global_batch_size": positive,
    "trainer.ckpt_every": positive,
    "trainer.log_every": positive,
    "trainer.keep_last": positive,
    "trainer.gpus": positive,
    "trainer.lr": partial(number, allowed="> 0", test=lambda v: v > 0),
    "trainer.warmup_steps": partial(integer, low=0),
    "trainer.lr_schedule": partial(one_of, allowed=LR_SCHEDULES),
    "trainer.weight_decay": partial(number, allowed=">= 0", test=lambda v: v >= 0),
    "trainer.ema_decay": partial(number, allowed="in [0, 1)", test=lambda v: 0 <= v < 1),
    "trainer.grad_clip": partial(number, allowed=">= 0 (0: no clipping)", test=lambda v: v >= 0),
    "trainer.ddp_bucket_mb": partial(number, allowed="> 0", test=lambda v: v > 0),
    "trainer.peak_tflops": partial(number, allowed="> 0", test=lambda v: v > 0, optional=True),
    "trainer.gpu_memory_gib": partial(number, allowed="> 0", test=lambda v: v > 0),
    "trainer.betas": _betas,
    "trainer.ckpt_milestones": _milestones,
    "trainer.device": partial(one_of, allowed=("auto", "cpu", "cuda")),
    "trainer.precision": partial(one_of, allowed=PRECISIONS),
    "trainer.compile": auto_or_flag,
    "trainer.fused_adamw": auto_or_flag,
    "trainer.tf32": flag,
    "trainer.grad_checkpointing": flag,
    "trainer.compile_mode": partial(one_of, allowed=COMPILE_MODES),
    "trainer.compile_tuning": flag,
    "trainer.residual_precision": partial(one_of, allowed=("fp32", "bf16")),
    "trainer.attention": partial(one_of, allowed=ATTENTION_KERNELS),
    "trainer.parallel": partial(one_of, allowed=("ddp", "fsdp")),
    "trainer.async_checkpoint": flag,
    "eval.every": partial(integer, low=0, optional=True),
    "eval.fid_every": partial(integer, low=0, optional=True),
    "eval.num_samples": _fid_samples,
    "eval.batch_size": positive,
    "eval.seed": partial(integer, low=0),
    "eval.reference_limit": partial(integer, low=2, optional=True),
    "eval.cfg_channels": partial(integer, optional=True),
    "eval.labels": partial(one_of, allowed=("balanced", "uniform")),
    "eval.cfg_scale": partial(number, allowed=">= 1 (1 = no guidance)", test=lambda v: v >= 1),
    "eval.ddim_eta": partial(number, allowed=">= 0", test=lambda v: v >= 0),
    "eval.precision": partial(one_of, allowed=PRECISIONS),
    "eval.max_forward_batch": _forward_batch,
    "eval.val_timesteps": partial(integer, low=0),
    "eval.val_limit": partial(integer, low=2, optional=True),
    "eval.fid_resamples": _resamples,
    # The harness launchers: harness.sweep.schedulers.job_layout runs these, for check_grid before anything is submitted.
    "hydra.launcher.timeout_min": positive,
    "hydra.launcher.gpus_per_node": partial(integer, low=0, optional=True),
    "hydra.launcher.tasks_per_node": partial(integer, optional=True),
    "hydra.launcher.cpus_per_task": partial(integer, optional=True),
    "hydra.launcher.max_parallel": partial(integer, optional=True),
    "hydra.launcher.nodes": partial(integer, optional=True),
    "hydra.launcher.max_gpus_per_node": partial(integer, optional=True),
    "hydra.launcher.mem_gb": partial(number, allowed="> 0", test=lambda v: v > 0, optional=True),
    "hydra.launcher.signal_delay_s": partial(integer, low=0),
    "hydra.launcher.max_num_timeout": partial(integer, low=0),
    "hydra.launcher.wait_s": partial(number, allowed=">= 0 (seconds)", test=lambda v: v >= 0),
    "hydra.launcher.poll_s": partial(number, allowed="> 0 (seconds)", test=lambda v: v > 0),
    "hydra.launcher.stderr_to_stdout": flag,
    "hydra.launcher.setup": _strings,
}


def check_values(node: DictConfig, section: str, skip: tuple[str, ...] = ()) -> None:
    """Run the RULES of `section`'s keys (`""`: the top-level ones) on `node`, that section of a config."""
    for dotted, rule in RULES.items():
        parent, _, key = dotted.rpartition(".")
        if parent == section and key not in skip:
            rule(node, key)


def rule_error(dotted: str, value) -> str | None:
    """The error line the rule of `dotted` gives for `value` (None: no rule, or the rule takes it)."""
    rule = RULES.get(dotted)
    if rule is None:
        return None
    holder = OmegaConf.create({})
    OmegaConf.update(holder, dotted, value, force_add=True)  # nested, so the line names the full key
    parent, _, key = dotted.rpartition(".")
    try:
        rule(OmegaConf.select(holder, parent) if parent else holder, key)
    except HarnessError as err:
        return str(err)
    return None


def check_eval_schedule(ev: DictConfig) -> None:
    """eval.every and eval.fid_every: FID is sampled only at evaluations, so fid_every must be a multiple of every."""
    every = RULES["eval.every"](ev, "every")
    fid_every = RULES["eval.fid_every"](ev, "fid_every")
    require(not (every and fid_every) or fid_every % every == 0,
            f"eval.fid_every={fid_every} must be a multiple of eval.every={every} (FID is sampled at evaluations), "
            "0 (only at the last step) or null (at every evaluation)")


def check_eval_values(ev: DictConfig, num_timesteps: int) -> None:
    """The `eval` values that need no files (sample counts, labels, guidance, sampler); the extractor and its
    weights are checked by `harness.evaluate.fid.check_eval_config`."""
    check_values(ev, "eval", skip=("every", "fid_every"))
    # torch (via harness.diffusion) only here: reading a config (status, report) must not import it.
    from harness.diffusion import parse_sampler

    parse_sampler(str(ev.sampler), num_timesteps, key="eval.sampler")
