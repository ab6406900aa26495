"""Checkpointing a training run: save (keep-last plus milestones), resume, and the RNG state a checkpoint carries.

Only the main rank writes; every rank reads the same file on resume. Where the files live and which one is the
newest readable is the run directory's business (`harness.run_dir`).
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from harness.config import latent_geometry, to_yaml
from harness.errors import HarnessError, first_line
from harness.model import build_model
from harness.run_dir import RunDir
from harness.train.runtime import Dist


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _does_not_fit(path, err_text: str) -> HarnessError:
    return HarnessError(f"{path} does not fit this run's model ({err_text[:200]}); use another run dir or "
                        "on_config_change=overwrite")


def check_checkpoint_fits(cfg: DictConfig, run_dir: RunDir) -> None:
    """The newest checkpoint's weights have the names and shapes of `cfg`'s model: checked before a launch with
    on_config_change=resume writes anything, from a weightless (meta) model and the file's mmapped tensors."""
    path = run_dir.newest_checkpoint()
    if path is None:
        return
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("model", {})
    expected = build_model(cfg.model, latent_geometry(cfg), device="meta").state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [k for k in sorted(set(expected) & set(saved)) if tuple(expected[k].shape) != tuple(saved[k].shape)]
    if missing or unexpected or mismatched:
        key = (mismatched or missing or unexpected)[0]
        what = (f"{key}: {tuple(saved[key].shape)} in the file, {tuple(expected[key].shape)} in the model" if mismatched
                else f"missing {key}" if missing else f"unexpected {key}")
        raise _does_not_fit(path, what)


def resume_from_checkpoint(run_dir: RunDir, model, ema, opt, stream, tc: DictConfig,
                           say: Callable[[str], None] = print) -> int:
    """Load the newest readable checkpoint of `run_dir` into the model, EMA, optimizer, data stream and RNGs;
    the step to go on from (0 without one). The optimizer's settings come from the config, not the file."""
    state = run_dir.load_newest_checkpoint(say=say)
    if state is None:
        return 0
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise _does_not_fit(run_dir.checkpoint_file(int(state["step"])), first_line(err)) from None
    for group in opt.param_groups:
        group.update(lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    stream.load_state_dict(state["data_state"])
    set_rng_state(state["rng"])
    say(f"resumed {run_dir} from step {state['step']}")
    return int(state["step"])


class Checkpointer:
    """When and what a run saves: every `trainer.ckpt_every` steps, at each milestone and at the last step, the
    model, EMA, optimizer, data stream position, RNGs and config; the newest `keep_last` and every milestone
    are kept."""

    def __init__(self, run_dir: RunDir, cfg: DictConfig, dist: Dist, meta: dict):
        tc = cfg.trainer
        self.run_dir, self.dist, self.meta = run_dir, dist, meta
        self.config = to_yaml(cfg)
        self.every, self.keep_last, self.max_steps = int(tc.ckpt_every), int(tc.keep_last), int(tc.max_steps)
        self.milestones = {int(s) for s in tc.ckpt_milestones}

    def is_save_step(self, step: int) -> bool:
        return step % self.every == 0 or step in self.milestones or step == self.max_steps

    def save(self, step: int, model, ema, opt, stream) -> None:
        if self.dist.is_main:
            self.run_dir.save_checkpoint({
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng": rng_state(), "data_state": stream.state_dict(), "config": self.config, "meta": self.meta,
            })
            self.run_dir.prune_checkpoints(self.keep_last, self.milestones)
        self.dist.barrier()

    def resume(self, model, ema, opt, stream, tc: DictConfig, say: Callable[[str], None] = print) -> int:
        """Resume from the newest readable checkpoint (every rank); the main rank then sets aside the unreadable
        newer ones. The step to go on from."""
        step = resume_from_checkpoint(self.run_dir, model, ema, opt, stream, tc, say=say)
        self.dist.barrier()  # every rank has read its checkpoint
        if self.dist.is_main:
            self.run_dir.set_aside_unreadable(step)
        return step
