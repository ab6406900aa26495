"""Evaluating a run: its in-memory EMA model during training, or a checkpoint file; one results row each.

An evaluation scores the held-out split (`harness.evaluate.val_loss`), samples (`harness.evaluate.sampling`), takes
the FID (`harness.evaluate.fid`) and appends a `harness.run_dir.ResultRow` to the run dir: the run's config, its
compute so far and the evaluation's numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from harness.autoencoders import run_autoencoder
from harness.config import compose, latent_geometry, resolve_device, slug
from harness.config.checks import validate
from harness.errors import HarnessError, require
from harness.evaluate.fid import check_eval_config, compute_fid, reference_floor
from harness.evaluate.sampling import generate_samples, sample_labels, save_grid, save_npz
from harness.evaluate.val_loss import validation_loss
from harness.flops import count_flops, training_compute_flops
from harness.model import build_model, count_params, load_weights
from harness.progress import Say, to_stderr
from harness.run_dir import (CHECKPOINTS, RUN_CONTROL_KEYS, ResultRow, RunDir, first_difference, is_checkpoint_dir,
                             read_checkpoint, read_checkpoint_config, run_identity)
from harness.tracking import Tracker, run_id
from harness.train.runtime import inference_forward, setup_distributed


def evaluated_before(run_dir: str | os.PathLike, step: int, eval_cfg: DictConfig, fid: bool = True) -> bool:
    """Whether the run's results.jsonl already holds `step` evaluated as `eval_cfg` would (extractor, number of
    samples, sampler, guidance, seed; without `fid`, the validation loss over as many timesteps): a run launched
    again after it finished, or resumed from before an evaluation it had done, need not spend the sampling time
    again (FID-50K of XL/2: hours)."""
    if not fid:
        return any(row.get("step") == step and row.get("val_loss") is not None
                   and row.get("val_timesteps") == int(eval_cfg.val_timesteps) for row in RunDir(run_dir).read_results())
    protocol = {"feature_extractor": str(eval_cfg.feature_extractor), "num_samples": int(eval_cfg.num_samples),
                "sampler": str(eval_cfg.sampler), "cfg_scale": float(eval_cfg.cfg_scale),
                "cfg_channels": eval_cfg.cfg_channels, "seed": int(eval_cfg.seed)}
    return any(row.get("step") == step and all(row.get(k) == v for k, v in protocol.items())
               for row in RunDir(run_dir).read_results())


def result_row(cfg: DictConfig, step: int, run_dir: str | os.PathLike, fid: dict | None, params: int, gflops: float,
               eval_wall_s: float, fid_floor: float | None = None, val: dict | None = None) -> ResultRow:
    """The results row of one evaluation: the run's config, its compute so far, and the evaluation's numbers
    (`fid`: compute_fid's, with its bootstrap interval and class accuracy where it has them, None for an
    evaluation of the validation loss only: its FID and sampling keys are null; `val`:
    harness.evaluate.val_loss.validation_loss's, None without one)."""
    m, ev, batch = cfg.model, cfg.eval, int(cfg.trainer.global_batch_size)
    sampled = fid is not None
    fid = fid or {"fid": None, "fid_name": None, "feature_extractor": None, "num_samples": None}
    return ResultRow(
        run_id=run_id(cfg, run_dir), run_dir=str(Path(run_dir).resolve()), sweep=cfg.get("sweep_name"),
        model=m.name, size=m.size, patch=int(m.patch_size), conditioning=m.conditioning,
        depth=int(m.depth), hidden_size=int(m.hidden_size), num_heads=int(m.num_heads),
        tokens=latent_geometry(cfg).tokens(int(m.patch_size)), params=int(params), gflops=float(gflops),
        step=int(step), global_batch_size=batch, images_seen=batch * int(step),
        train_compute_flops=training_compute_flops(float(gflops), batch, int(step)),
        fid=fid["fid"], fid_name=fid["fid_name"], feature_extractor=fid["feature_extractor"],
        num_samples=fid["num_samples"], sampler=str(ev.sampler) if sampled else None,
        cfg_scale=float(ev.cfg_scale) if sampled else None, cfg_channels=ev.cfg_channels if sampled else None,
        seed=int(ev.seed), dataset=cfg.data.name,
        image_size=int(cfg.data.image_size), eval_wall_s=round(eval_wall_s, 3), timestamp=time.time(),
        isc=fid.get("isc"), precision=fid.get("precision"), recall=fid.get("recall"), fid_floor=fid_floor,
        fid_se=fid.get("fid_se"), fid_lo=fid.get("fid_lo"), fid_hi=fid.get("fid_hi"),
        fid_ci_level=fid.get("fid_ci_level"), class_accuracy=fid.get("class_accuracy"), **(val or {}),
    )


def evaluate_model(model: nn.Module, cfg: DictConfig, step: int, run_dir: str | os.PathLike, dist=None,
                   flops: dict | None = None, params: int | None = None, cache_dir: str | os.PathLike | None = None,
                   log_fn: Callable[[dict], None] | None = None, forward: nn.Module | None = None,
                   stop: Callable[[], bool] | None = None, say: Say = to_stderr, fid: bool = True) -> dict | None:
    """Evaluate the in-memory EMA `model` of a run at `step`: validation loss, sample, FID, append the row to
    results.jsonl. Without `fid`, only the validation loss: a row with a null FID (none if there is no loss to
    score: eval.val_timesteps 0, or no held-out split).

    The validation loss (`eval.val_timesteps`; harness.evaluate.val_loss) comes first, from generators of its
    own, so it changes no sample and no FID. Called by every rank of a job (`dist`: an object with rank,
    world_size, device, e.g. harness.train.Dist; None: one process on `trainer.device`). All ranks sample their
    share; rank 0 computes FID and the reference floor, saves the grid/.npz (`eval.save_grid`, `eval.save_npz`) as
    the run dir's sample files, appends the row atomically, calls `log_fn(row)` (e.g. a wandb hook) and returns
    it; other ranks return None. `flops`/`params` avoid recounting (harness.flops.count_flops /
    harness.model.count_params); `forward`, `model`'s sampling forward (harness.train.inference_forward), is kept
    by a caller that evaluates repeatedly, so its compiled graph and learned call size carry over. `stop`, asked
    between sampling batches on every rank, ends the evaluation early with SamplingStopped (nothing written).
    Rank 0 says each phase through `say` (sampling with its rate and ETA, then FID), e.g. a run's `Tracker.print`.
    """
    start = time.perf_counter()
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    device = dist.device if dist is not None else resolve_device(cfg.trainer.get("device"), "trainer.device")
    check_eval_config(cfg.eval, cfg.data)  # fail before sampling, not after
    geometry = latent_geometry(cfg)
    val = validation_loss(model, cfg, device, dist=dist, say=say)
    run, scores, floor = RunDir(run_dir), None, None
    if fid:
        images = generate_samples(forward or inference_forward(model, cfg, device), cfg.diffusion,
                                  run_autoencoder(cfg, device), cfg.eval, geometry, device, rank=rank,
                                  world_size=world_size, stop=stop, say=say)
        if rank != 0:
            return None
        if cfg.eval.save_grid:
            save_grid(images, run.sample_file(step, "png"))
        if cfg.eval.save_npz:
            save_npz(images, run.sample_file(step, "npz"))
        # The labels the samples were conditioned on: the digits CNN's class accuracy compares its predictions with them.
        scores = compute_fid(images, cfg.eval, cfg.data, cache_dir=cache_dir, device=device, say=say,
                             labels=sample_labels(cfg.eval, geometry))
        floor = reference_floor(cfg.eval, cfg.data, cache_dir=cache_dir, device=device, say=say)
    elif rank != 0 or val is None:
        return None
    else:
        say(f"step {step}: val loss {val['val_loss']:.4g} (se {val['val_loss_se']:.2g}); no FID here (eval.fid_every)")
    if flops is None:
        flops = count_flops(cfg.model, geometry, say=say)
    if params is None:
        params = count_params(model)
    row = run.append_result(result_row(cfg, step, run.path, scores, params, flops["gflops"],
                                       time.perf_counter() - start, floor, val))
    if log_fn is not None:
        log_fn(row)
    return row


def checkpoint_config(ckpt: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, dict]:
    """The config to evaluate `ckpt` (a file, or a run dir: its newest checkpoint) with, and what the file says
    about itself ({"ours", "path", "step", "run_dir"}).

    Our checkpoints carry their config: overrides may change only what does not define the trained model
    (eval.*, logger, trainer.device, ...; harness.run_dir.RUN_CONTROL_KEYS); anything else that differs is
    "a checkpoint from another config". A released DiT .pt is a bare state_dict: its config comes from the
    overrides (e.g. model=DiT-XL/2 experiment=imagenet256), checked by the strict weight loading.
    """
    path = Path(ckpt).expanduser()
    if path.is_dir() and not is_checkpoint_dir(path):  # a run dir: its newest checkpoint
        found = RunDir(path).checkpoints()
        require(bool(found), f"ckpt={path} is a directory without {CHECKPOINTS}/step_*")
        path = found[-1]
    require(path.exists(), f"ckpt={path}: no such file")
    try:
        stored = read_checkpoint_config(path)
    except HarnessError:  # a checkpoint directory missing a part or its .metadata: the line names the file
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise HarnessError(f"ckpt={path} cannot be read ({type(err).__name__}); expected a checkpoint of "
                           "harness train or a released DiT .pt") from None
    requested = compose(overrides)
    if stored is None:
        return requested, {"ours": False, "path": path, "step": None, "run_dir": None}
    merged = stored.copy()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        value = OmegaConf.select(requested, key, default=None)
        OmegaConf.update(merged, key, value, force_add=True, merge=False)
    difference = first_difference(run_identity(stored), run_identity(merged))
    require(not difference, f"ckpt={path} was trained with another config ({difference}); only "
                            f"{', '.join(RUN_CONTROL_KEYS)} may be overridden")
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
    return merged, {"ours": True, "path": path, "step": _saved_step(path), "run_dir": run_dir}


def _saved_step(path: Path) -> int:
    """The step one of our checkpoints was saved at, whatever the file is named now."""
    # Only the step is read (a file is mmapped): reading it must not load a multi-GB checkpoint's tensors.
    return int(read_checkpoint(path, keys={"step"}).get("step", 0))


def evaluate_checkpoint(ckpt: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                        run_dir: str | os.PathLike | None = None, step: int | None = None,
                        cache_dir: str | os.PathLike | None = None, say: Say = to_stderr) -> dict | None:
    """Evaluate a checkpoint (ours, a run dir's newest, or a released DiT .pt); append the row to `run_dir`'s results.

    `run_dir` defaults to the checkpoint's run dir (ours) or `runs/eval-<file name>` (released files);
    `step` to the checkpoint's step (released files: 0). Runs under torchrun as a distributed job too.
    Rank 0 says each phase through `say` (see `evaluate_model`).
    """
    cfg, info = checkpoint_config(ckpt, overrides)
    path = info["path"]
    validate(cfg, evaluates=True)
    check_eval_config(cfg.eval, cfg.data)  # before loading weights that may take minutes to sample from
    step = int(step if step is not None else info["step"] or 0)
    run_dir = Path(run_dir or info["run_dir"] or Path("runs") / f"eval-{slug(path.stem)}")
    dist = setup_distributed(str(cfg.trainer.get("device", "auto")))
    if dist.is_main:
        say(f"loading the EMA weights of {path} ...")
    model = build_model(cfg.model, latent_geometry(cfg), init_weights=False)
    load_weights(path, model, which="ema")
    model = model.to(dist.device).requires_grad_(False)
    tracker = Tracker(cfg, run_dir, enabled=dist.is_main)
    try:
        return evaluate_model(model, cfg, step, run_dir, dist=dist, cache_dir=cache_dir, log_fn=tracker.log_result,
                              say=say)
    finally:
        tracker.finish()
