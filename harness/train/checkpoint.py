"""Checkpointing a training run: save (keep-last plus milestones, optionally in the background), resume, and the
RNG state a checkpoint carries.

A checkpoint is a torch.distributed.checkpoint (DCP) directory: every rank writes its own part (its FSDP shards;
under DDP the replicated tensors are split among the ranks) and rank 0 the .metadata, into a temp dir that rank 0
renames into place once all of it is on disk. On resume each rank reads only what its own shards need, at any
world size: DCP maps the saved pieces onto the new sharding. The same code serves one process, DDP and FSDP
(`torch.distributed.checkpoint.state_dict` gives each its state dict). Older runs' single-file `step_*.pt`
checkpoints still resume. Where checkpoints live and which one is the newest readable is the run directory's
business (`harness.run_dir`).
"""

from __future__ import annotations

import random
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from harness.config import latent_geometry, to_yaml
from harness.errors import HarnessError
from harness.model import build_model
from harness.run_dir import RunDir, read_checkpoint
from harness.train.runtime import Dist

# One process saves and loads without a process group, as intended: DCP's warning that it assumes so is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


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


def saved_model_shapes(path: Path) -> dict[str, tuple]:
    """The name and (global) shape of every model weight a checkpoint holds, without reading its tensors: a DCP
    directory's .metadata, or a .pt file's mmapped tensors."""
    if Path(path).is_dir():
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        return {key[len("model."):]: tuple(meta.size) for key, meta in metadata.items()
                if key.startswith("model.") and hasattr(meta, "size")}
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("model", {})
    return {key: tuple(value.shape) for key, value in saved.items()}


def check_fits(path: Path, cfg_model: DictConfig, geometry) -> None:
    """The checkpoint's model weights have the names and shapes of `cfg_model`'s, compared against a weightless
    (meta) model: one line naming the first difference."""
    saved = saved_model_shapes(path)
    expected = {k: tuple(v.shape) for k, v in build_model(cfg_model, geometry, device="meta").state_dict().items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [k for k in sorted(set(expected) & set(saved)) if expected[k] != saved[k]]
    if missing or unexpected or mismatched:
        key = (mismatched or missing or unexpected)[0]
        what = (f"{key}: {saved[key]} in the file, {expected[key]} in the model" if mismatched
                else f"missing {key}" if missing else f"unexpected {key}")
        raise _does_not_fit(path, what)


def check_checkpoint_fits(cfg: DictConfig, run_dir: RunDir) -> None:
    """The newest checkpoint's weights fit `cfg`'s model: checked before a launch with on_config_change=resume
    writes anything."""
    path = run_dir.newest_checkpoint()
    if path is not None:
        check_fits(path, cfg.model, latent_geometry(cfg))


def _fqn_keyed(model: torch.nn.Module, opt_state: dict) -> dict:
    """An older .pt checkpoint's optimizer state (keyed by parameter index, torch's Optimizer.state_dict) keyed by
    parameter name instead, as torch.distributed.checkpoint.state_dict takes it for any sharding."""
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: s for i, s in opt_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}


class Checkpointer:
    """When and what a run saves: every `trainer.ckpt_every` steps, at each milestone and at the last step, the
    model, EMA, optimizer, data stream position, each rank's RNGs and the config; the newest `keep_last` and
    every milestone are kept. With `trainer.async_checkpoint` a save copies the state to CPU memory and writes
    it in a background thread (DCP's async_save) while training goes on; the checkpoint is committed (renamed
    into place, then pruning) as soon as the write finishes, and `wait()` (before the next save, before the run
    ends or is requeued) returns once it is."""

    def __init__(self, run_dir: RunDir, cfg: DictConfig, dist: Dist, meta: dict):
        tc = self.tc = cfg.trainer
        self.run_dir, self.dist, self.meta = run_dir, dist, {**meta, "world_size": dist.world_size,
                                                             "parallel": str(tc.parallel)}
        self.cfg_model, self.geometry = cfg.model, latent_geometry(cfg)
        self.config = to_yaml(cfg)
        self.every, self.keep_last, self.max_steps = int(tc.ckpt_every), int(tc.keep_last), int(tc.max_steps)
        self.milestones = {int(s) for s in tc.ckpt_milestones}
        self.background = bool(tc.async_checkpoint)
        # DCP's own CPU (gloo) group: a background save's collectives must not interleave with training's.
        self.group = torch_dist.new_group(backend="gloo") if dist.world_size > 1 else None
        self.pending: tuple[Future, threading.Event] | None = None
        self.commit_error: BaseException | None = None

    def is_save_step(self, step: int) -> bool:
        return step % self.every == 0 or step in self.milestones or step == self.max_steps

    # ------------------------------------------------------------------------- saving

    def save(self, step: int, model, ema, opt, stream) -> None:
        """Write `step`'s checkpoint (every rank calls this): at once, or started in the background."""
        self.wait()  # one save in flight: the previous one is committed first
        model_state, opt_state = get_state_dict(model, opt)
        state = {"model": model_state, "ema": get_model_state_dict(ema), "opt": opt_state, "step": step,
                 "rng": {f"rank{self.dist.rank}": rng_state()}, "data_state": stream.state_dict(),
                 "config": self.config, "meta": self.meta}
        temp = self.run_dir.checkpoint_temp_dir(step)
        if not self.background:
            dcp.save(state, checkpoint_id=temp, process_group=self.group)
            self._commit(step)
            self.dist.barrier()
            return
        written = dcp.async_save(state, checkpoint_id=temp, process_group=self.group)
        committed = threading.Event()  # a future's result() may return before its callbacks have run

        def commit(future: Future) -> None:
            # Rank 0's write finishes after every rank's part and the metadata are written: commit then, not at
            # the next wait(), so a kill during a long evaluation keeps this checkpoint.
            try:
                if future.exception() is None:
                    self._commit(step)
            finally:
                committed.set()

        self.pending = (written, committed)
        written.add_done_callback(commit)

    def _commit(self, step: int) -> None:
        if not self.dist.is_main:
            return
        try:
            self.run_dir.commit_checkpoint(step)
            self.run_dir.prune_checkpoints(self.keep_last, self.milestones)
        except BaseException as err:  # in the background thread: raised by wait()
            if not self.background:
                raise
            self.commit_error = err

    def wait(self) -> None:
        """Return once a background save is committed (raising what it raised); at once without one."""
        if self.pending is None:
            return
        (written, committed), self.pending = self.pending, None
        written.result()
        committed.wait()
        if self.commit_error is not None:
            err, self.commit_error = self.commit_error, None
            raise err
        self.dist.barrier()  # rank 0 has committed it: every rank may report it saved

    # ------------------------------------------------------------------------- resuming

    def resume(self, model, ema, opt, stream, say: Callable[[str], None] = print) -> int:
        """Resume from the newest readable checkpoint (every rank); the main rank then sets aside the unreadable
        newer ones and removes the temp dirs of saves a kill cut short. The step to go on from (0 without one).
        The optimizer's settings come from the config, not the checkpoint."""
        state = self.run_dir.load_newest_checkpoint(load=lambda path: self._load(path, model, ema, opt), say=say)
        step = int(state["step"]) if state is not None else 0
        if state is not None:
            for group in opt.param_groups:
                group.update(lr=self.tc.lr, weight_decay=self.tc.weight_decay, betas=tuple(self.tc.betas))
            stream.load_state_dict(state["data_state"])
            rng = state["rng"]
            # This rank's RNGs; at another world size a new rank takes rank 0's (the training draws do not use
            # them: they come from (seed, step), see harness.train.step). An older .pt holds one process's.
            set_rng_state(rng if "python" in rng else rng.get(f"rank{self.dist.rank}", rng["rank0"]))
            say(f"resumed {self.run_dir} from step {step}")
        self.dist.barrier()  # every rank has read its checkpoint
        if self.dist.is_main:
            self.run_dir.set_aside_unreadable(step)
            self.run_dir.discard_partial_saves()
        return step

    def _load(self, path: Path, model, ema, opt) -> dict:
        """Load the checkpoint at `path` into the model, EMA and optimizer in place; its small entries (step, data
        position, RNGs) returned."""
        check_fits(path, self.cfg_model, self.geometry)
        if not path.is_dir():  # an older run's single file: the whole state, as one process saved it
            state = read_checkpoint(path)
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=whole)
            set_model_state_dict(ema, state["ema"], options=whole)
            set_optimizer_state_dict(model, opt, _fqn_keyed(model, state["opt"]), options=whole)
            return state
        # Each rank reads the small entries for itself, and its own RNGs (rank 0's if it had none).
        state = read_checkpoint(path, keys={"step", "data_state", "rng.rank0", f"rng.rank{self.dist.rank}"})
        model_state, opt_state = get_state_dict(model, opt)
        shards = {"model": model_state, "ema": get_model_state_dict(ema), "opt": opt_state}
        dcp.load(shards, checkpoint_id=path, process_group=self.group)  # each rank reads what its shards need
        set_state_dict(model, opt, model_state_dict=shards["model"], optim_state_dict=shards["opt"])
        set_model_state_dict(ema, shards["ema"])
        return state
