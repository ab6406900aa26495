"""The run directory: where each file of a run lives, and the records a run writes and reads.

Every module that touches a run (training, evaluation, sweeps, status, the report, tracking) goes
through `RunDir`, so the layout and the record formats have one owner:

    <run dir>/
      config.yaml                 what the run trains (written when a trainer claims the dir)
      run_state.json              RunState: running | preempted | done | failed, step, job, host, pid
      metrics.jsonl               training rows (METRICS_COLUMNS), each step once
      metrics.superseded.jsonl    rows of steps a resumed run trained again
      results.jsonl               ResultRow per evaluation (FID and the run's compute so far)
      train.log                   what the run printed, time-stamped, across restarts
      checkpoints/step_NNNNNNN.pt training checkpoints (CHECKPOINT_KEYS)
      samples/step_NNNNNNN.png    sample grids (and .npz) of each evaluation
      overwritten-<time>/         an older run that on_config_change=overwrite moved aside

"Which checkpoint is the newest readable one" is decided here (`newest_checkpoint`,
`load_newest_checkpoint`): a cheap check of the file's zip directory for planning and status, a full
load for resuming, over the same candidates in the same order.
"""

from __future__ import annotations

import fcntl
import os
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from harness.config import to_yaml, with_keys_added_later
from harness.errors import HarnessError, first_line
from harness.io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, read_json, read_jsonl, read_yaml

CONFIG = "config.yaml"
RUN_STATE = "run_state.json"
METRICS = "metrics.jsonl"
SUPERSEDED_METRICS = "metrics.superseded.jsonl"
RESULTS = "results.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
OVERWRITTEN_PREFIX = "overwritten-"
# What marks a directory as a run dir, for `find_run_dirs` and a sweep's status.
RUN_MARKERS = (RESULTS, RUN_STATE)

# A training checkpoint is a dict with these keys (torch.save).
CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "rng", "data_state", "config", "meta")
# A metrics.jsonl row: the logging window's mean losses and throughput.
METRICS_COLUMNS = ("step", "loss", "mse", "vb", "lr", "images_per_s", "tflops_per_device", "mfu", "peak_mem_gb", "time")

# Keys that may change between restarts of one run without making it a different run.
RUN_CONTROL_KEYS = ("trainer.max_steps", "trainer.ckpt_every", "trainer.ckpt_milestones", "trainer.keep_last",
                    "trainer.log_every", "trainer.device", "trainer.gpus", "trainer.gpu_memory_gib", "trainer.compile_tuning",
                    "eval", "logger",
                    "on_config_change", "sweep_name")


# ----------------------------------------------------------------------------- records


@dataclass
class ResultRow:
    """One `results.jsonl` row: the run's config, its compute so far, and one evaluation's numbers."""

    run_id: str
    run_dir: str
    sweep: str | None
    model: str
    size: str
    patch: int
    conditioning: str
    depth: int
    hidden_size: int
    num_heads: int
    tokens: int
    params: int
    gflops: float
    step: int
    global_batch_size: int
    images_seen: int
    train_compute_flops: float
    fid: float
    fid_name: str
    feature_extractor: str
    num_samples: int
    sampler: str
    cfg_scale: float
    cfg_channels: int | None
    seed: int
    dataset: str
    image_size: int
    eval_wall_s: float
    timestamp: float
    # Optional: written only when computed.
    isc: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid_floor: float | None = None
    # The validation loss (harness.evaluate.val_loss): absent without a held-out split or with eval.val_timesteps=0.
    val_loss: float | None = None
    val_loss_se: float | None = None
    val_vb_bpd: float | None = None
    val_vb_bpd_se: float | None = None
    val_images: int | None = None
    val_timesteps: int | None = None
    # The FID's own uncertainty (harness.evaluate.fid.fid_bootstrap): bootstrap standard error over the samples and
    # the fid_ci_level normal interval; absent in rows written before it existed.
    fid_se: float | None = None
    fid_lo: float | None = None
    fid_hi: float | None = None
    fid_ci_level: float | None = None
    # Share of samples the extractor classifies as the class they were conditioned on (the digits CNN on digits only).
    class_accuracy: float | None = None

    OPTIONAL = ("isc", "precision", "recall", "fid_floor", "val_loss", "val_loss_se", "val_vb_bpd", "val_vb_bpd_se",
                "val_images", "val_timesteps", "fid_se", "fid_lo", "fid_hi", "fid_ci_level", "class_accuracy")

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k in self.OPTIONAL and v is None)}


RESULT_COLUMNS = tuple(f.name for f in fields(ResultRow))


@dataclass
class RunState:
    """`run_state.json`: what `harness status` and sweep relaunches read."""

    state: str                  # running | preempted | done | failed
    step: int
    max_steps: int
    slurm_job_id: str | None = None
    requeues: int = 0
    error: str | None = None
    updated: str | None = None
    host: str | None = None
    pid: int | None = None

    @classmethod
    def from_json(cls, raw) -> RunState | None:
        """The record in a parsed run_state.json (None for anything else); keys it does not know are ignored."""
        if not isinstance(raw, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{"state": None, "step": None, "max_steps": None, **{k: v for k, v in raw.items() if k in known}})


# ----------------------------------------------------------------------------- run identity


def run_identity(cfg: DictConfig) -> dict:
    """The part of a config that defines what a run trains (see RUN_CONTROL_KEYS for what it leaves out)."""
    # Without the hydra node: outside a running Hydra app it holds values that only exist at run time.
    identity = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)
    for dotted in RUN_CONTROL_KEYS:
        *parents, leaf = dotted.split(".")
        node = identity
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return identity


def first_difference(old, new, prefix="") -> str:
    """The first key (dotted, sorted order) where two nested dicts differ, as `key: old -> new` ("" if none)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file (`step_0001000.pt` -> 1000)."""
    return int(Path(path).stem[len("step_"):])


def read_checkpoint_config(path: Path) -> DictConfig | None:
    """The config a training checkpoint carries (keys added later filled in), without loading its tensors (mmap);
    None for a file without one (a released DiT .pt). Raises whatever torch.load raises on an unreadable file."""
    import torch  # heavy: only the callers that open checkpoints pay for it (the report and status do not)

    blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if isinstance(blob, dict) and isinstance(blob.get("config"), str):
        return with_keys_added_later(OmegaConf.create(blob["config"]))
    return None


# ----------------------------------------------------------------------------- the run directory


class RunDir:
    """One run's directory and every file in it (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # --- paths
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def state_file(self) -> Path:
        return self.path / RUN_STATE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def superseded_metrics_file(self) -> Path:
        return self.path / SUPERSEDED_METRICS

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_file(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{int(step):07d}.pt"

    def sample_file(self, step: int, suffix: str) -> Path:
        """`samples/step_NNNNNNN.<suffix>` (png: the grid, npz: the samples)."""
        return self.path / SAMPLES / f"step_{int(step):07d}.{suffix}"

    def started(self) -> bool:
        """Whether a run began here: a trainer wrote its config, state or checkpoints, or a launched job's Hydra
        wrote its records (.hydra/) before the trainer got that far."""
        return any(p.exists() for p in (self.config_file, self.state_file, self.checkpoints_dir, self.path / ".hydra"))

    # --- checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoints of the run, oldest first (`step_<digits>.pt`; files named otherwise are not the harness's)."""
        return sorted(p for p in self.checkpoints_dir.glob("step_*.pt") if p.stem[len("step_"):].isdigit())

    def newest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose zip directory reads: what a resume would start from unless its tensors turn
        out damaged too. A few bytes per file, where loading to be sure would read gigabytes."""
        return next((p for p in reversed(self.checkpoints()) if zipfile.is_zipfile(p)), None)

    def load_newest_checkpoint(self, say: Callable[[str], None] = print) -> dict | None:
        """The newest checkpoint that loads; an unreadable newer one is reported and skipped, never deleted."""
        import torch  # heavy: see read_checkpoint_config

        paths = self.checkpoints()
        for path in reversed(paths):
            try:
                if not zipfile.is_zipfile(path):
                    raise ValueError("its zip directory does not read (truncated?)")
                state = torch.load(path, map_location="cpu", weights_only=False)
                if not isinstance(state, dict) or "step" not in state or "model" not in state:
                    raise ValueError("not a harness training checkpoint")
                return state
            except Exception as err:  # a truncated or corrupt file: fall back to the previous one
                say(f"checkpoint {path} is unreadable ({type(err).__name__}: {first_line(err)})")
        if paths:
            say(f"no readable checkpoint in {self.checkpoints_dir}: starting from step 0")
        return None

    def save_checkpoint(self, state: dict) -> Path:
        """Write a training checkpoint (a dict of CHECKPOINT_KEYS) atomically as the file of its step."""
        path = self.checkpoint_file(int(state["step"]))
        atomic_torch_save(state, path)
        return path

    def prune_checkpoints(self, keep_last: int, milestones: set[int]) -> None:
        """Keep the newest `keep_last` checkpoints and every milestone; remove the temp files of saves a kill cut
        short (only the main rank saves, one checkpoint at a time, so none is being written now)."""
        for path in self.checkpoints()[:-keep_last]:
            if checkpoint_step(path) not in milestones:
                path.unlink(missing_ok=True)
        for partial in self.checkpoints_dir.glob(".step_*.pt.*.tmp"):
            partial.unlink(missing_ok=True)

    def set_aside_unreadable(self, resumed_step: int) -> None:
        """Checkpoints newer than the one a run resumed from could not be read. Each is renamed
        `<name>.unreadable-<time>`: kept for inspection, but no longer counted by keep-last pruning (which would
        otherwise delete the readable one) or overwritten by the next save of its step."""
        for path in self.checkpoints():
            if checkpoint_step(path) > resumed_step:
                path.rename(path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"))

    # --- run state
    def read_state(self) -> RunState | None:
        return RunState.from_json(read_json(self.state_file, None))

    def write_state(self, state: str, step: int, max_steps: int, error: str | None = None) -> None:
        previous = self.read_state()
        requeues = int(os.environ.get("SLURM_RESTART_COUNT", (previous.requeues if previous else 0) or 0))
        atomic_write_json(self.state_file, asdict(RunState(
            state=state, step=step, max_steps=max_steps,
            slurm_job_id=os.environ.get("SLURM_JOB_ID", previous.slurm_job_id if previous else None),
            requeues=requeues, error=error, updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            host=os.uname().nodename, pid=os.getpid())))

    # --- results and metrics
    def read_results(self) -> list[dict]:
        return read_jsonl(self.results_file)

    def results(self) -> list[dict]:
        """The run's evaluations, one row per step and FID kind: a step evaluated twice keeps the row from the most
        samples (the most precise: `harness eval` with FID-50K after training with FID-5K), the latest among
        equals (a re-evaluation after a requeue, say). `harness status` and the report both read this."""
        def samples(row: dict) -> float:
            value = row.get("num_samples")
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else -1

        best: dict[tuple, dict] = {}
        for row in self.read_results():  # file order: a later row is a newer evaluation
            key = (row.get("step"), row.get("fid_name"))
            if key not in best or samples(row) >= samples(best[key]):
                best[key] = row
        return list(best.values())

    def append_result(self, row: ResultRow) -> dict:
        record = row.to_json()
        append_jsonl(self.results_file, record)
        return record

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def append_metrics(self, row: dict) -> None:
        append_jsonl(self.metrics_file, row)

    # --- config and identity
    def stored_config(self) -> DictConfig | None:
        """What the run trains: its config.yaml, else the config its newest checkpoint carries (None: no run here,
        or only an unreadable checkpoint, which resuming reports and skips)."""
        if self.config_file.exists():
            return with_keys_added_later(read_yaml(self.config_file))
        found = self.checkpoints()
        try:
            return read_checkpoint_config(found[-1]) if found else None
        except Exception:  # noqa: BLE001 - an unreadable newest checkpoint is reported (and skipped) when resuming
            return None

    def difference(self, cfg: DictConfig) -> str:
        """The first difference between what `cfg` trains and what this run dir holds ("" if none or no run)."""
        stored = self.stored_config()
        return first_difference(run_identity(stored), run_identity(cfg)) if stored is not None else ""

    def check_claim(self, cfg: DictConfig) -> str:
        """The first difference between `cfg` and the run held here ("" if none); one error line if that is a
        different run and on_config_change=refuse. Writes nothing."""
        difference = self.difference(cfg)
        if difference and cfg.on_config_change == "refuse":
            raise HarnessError(f"{self.path} holds a run with a different config ({difference}); "
                               "set on_config_change=resume to continue it or on_config_change=overwrite to start over")
        return difference

    def claim(self, cfg: DictConfig) -> None:
        """Make room for `cfg`'s run: refuse a different run unless told to resume it or start over (the old run then
        moves aside: starting over never deletes). config.yaml is written once the run has resumed
        (`write_config`), so a resume that fails leaves the dir as it was."""
        if self.check_claim(cfg) and cfg.on_config_change == "overwrite":
            aside = self.path / f"{OVERWRITTEN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for item in self.path.iterdir():
                if item != aside and not item.name.startswith((OVERWRITTEN_PREFIX, ".hydra")) and not item.name.endswith(".log"):
                    item.rename(aside / item.name)

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.config_file, to_yaml(cfg))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """This process trains the dir alone: a second trainer of it (a duplicate launch, a second terminal) stops
        with one line before writing anything. The lock is the kernel's (flock on the directory itself), so it
        leaves no file and a killed run holds nothing; on a file system without flock (Lustre mounted without it,
        say) the run goes on unlocked. Re-entrant within a process: `harness train` takes it before Hydra writes
        into the dir, and the trainer Hydra then runs holds it already."""
        key = self.path.resolve()
        if key in _HELD:
            yield
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                state = self.read_state()
                holder = (f"pid {state.pid} on {state.host}" if state and state.state == "running" and state.pid
                          else "another process")
                raise HarnessError(f"{self.path} is being trained by {holder}: wait for it to end or stop it, "
                                   "then launch again") from None
            except OSError:
                pass
            _HELD.add(key)
            yield
        finally:
            _HELD.discard(key)
            os.close(fd)


_HELD: set[Path] = set()  # run dirs this process holds the lock of


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Every run dir under `root` (itself included): a dir holding results.jsonl or run_state.json, except the old
    runs that on_config_change=overwrite moved aside (history, not runs of the sweep)."""
    root = Path(root)
    found = {p.parent for name in RUN_MARKERS for p in root.rglob(name)}
    return sorted(d for d in found if not any(part.startswith(OVERWRITTEN_PREFIX) for part in d.relative_to(root).parts))
