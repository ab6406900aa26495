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
      checkpoints/step_NNNNNNN/   training checkpoints (CHECKPOINT_KEYS): torch.distributed.checkpoint
                                  directories, one part per rank plus .metadata (older runs: step_NNNNNNN.pt)
      samples/step_NNNNNNN.png    sample grids (and .npz) of each evaluation
      overwritten-<time>/         an older run that on_config_change=overwrite moved aside

"Which checkpoint is the newest readable one" is decided here (`newest_checkpoint`,
`load_newest_checkpoint`): a cheap check (every part a checkpoint directory's .metadata names is there; a
file's zip directory reads) for planning and status, a load for resuming, over the same candidates in the
same order. A checkpoint directory is written as `.step_NNNNNNN.tmp/` and renamed once every rank's part
and the metadata are on disk, so a kill mid-save leaves only a temp dir, which is never read.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from harness.config import to_yaml, with_keys_added_later
from harness.errors import HarnessError, first_line
from harness.io import append_jsonl, atomic_write_json, atomic_write_text, read_json, read_jsonl, read_yaml

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

# A training checkpoint holds these keys (`read_checkpoint` returns them as one dict). In a checkpoint directory
# "rng" maps "rank<r>" to each rank's RNG states; an older .pt file holds the one process's states.
CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "rng", "data_state", "config", "meta")
# A metrics.jsonl row: the logging window's mean losses and throughput.
METRICS_COLUMNS = ("step", "loss", "mse", "vb", "lr", "images_per_s", "tflops_per_device", "mfu", "peak_mem_gb", "time")

# Keys that may change between restarts of one run without making it a different run.
RUN_CONTROL_KEYS = ("trainer.max_steps", "trainer.ckpt_every", "trainer.ckpt_milestones", "trainer.keep_last",
                    "trainer.log_every", "trainer.device", "trainer.gpus", "trainer.gpu_memory_gib", "trainer.compile_tuning",
                    "trainer.parallel", "trainer.async_checkpoint",
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
    # Null in a row of the validation loss only (eval.fid_every): no samples, no FID.
    fid: float | None
    fid_name: str | None
    feature_extractor: str | None
    num_samples: int | None
    sampler: str | None
    cfg_scale: float | None
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
    # A decaying lr schedule ends at max_steps, so there max_steps sets every step's lr: it is part of what is trained.
    decays = OmegaConf.select(cfg, "trainer.lr_schedule", default="constant") != "constant"
    for dotted in RUN_CONTROL_KEYS:
        if decays and dotted == "trainer.max_steps":
            continue
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
    """The step of a checkpoint (`step_0001000` or `step_0001000.pt` -> 1000)."""
    return int(Path(path).name[len("step_"):].removesuffix(".pt"))


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is a checkpoint directory (named `step_<digits>` or holding a .metadata), not a run dir."""
    path = Path(path)
    return path.is_dir() and (path.name[len("step_"):].isdigit() and path.name.startswith("step_")
                              or (path / ".metadata").exists())


def checkpoint_problem(path: Path, parts: bool = True) -> str | None:
    """Why a checkpoint cannot be read, found cheaply (None: it looks whole). A directory: its .metadata and (with
    `parts`, which reads the metadata and so imports torch) every part file the metadata names, long enough for
    the bytes it points into; a file: its zip directory."""
    path = Path(path)
    if not path.is_dir():
        return None if zipfile.is_zipfile(path) else "its zip directory does not read (truncated?)"
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    if not parts:
        return None
    from torch.distributed.checkpoint import FileSystemReader  # heavy: see read_checkpoint

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001 - a damaged .metadata is one line for the user
        return f"{path / '.metadata'} does not read ({type(err).__name__}: {first_line(err)})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        part = path / name
        if not part.is_file():
            return f"its part {part} is missing"
        if part.stat().st_size < size:
            return f"its part {part} is truncated ({part.stat().st_size} of {size} bytes)"
    return None


def read_checkpoint(path: Path, keys: set[str] | None = None) -> dict:
    """A training checkpoint (or a released DiT .pt) read whole into this process, or only `keys` (top-level
    keys such as "step", or dotted ones such as "rng.rank0"): a checkpoint directory through
    torch.distributed.checkpoint's no-process-group reader (what its format_utils.dcp_to_torch_save does), a
    file through torch.load. Raises whatever the readers raise on an unreadable checkpoint."""
    import torch  # heavy: only the callers that open checkpoints pay for it (the report and status do not)

    path = Path(path)
    if not path.is_dir():
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if keys is None or not isinstance(blob, dict):
            return blob
        return {k: v for k, v in blob.items() if k in {key.split(".")[0] for key in keys}}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    problem = checkpoint_problem(path)
    if problem is not None:
        raise HarnessError(f"checkpoint {path} cannot be read: {problem}")
    state: dict = {}
    # no_dist: every process reads for itself, with or without a process group (eval, tools, tests).
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return state


def read_checkpoint_config(path: Path) -> DictConfig | None:
    """The config a training checkpoint carries (keys added later filled in), without loading its tensors;
    None for a file without one (a released DiT .pt). Raises whatever reading raises on an unreadable one."""
    blob = read_checkpoint(path, keys={"config"})
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
        """The checkpoint directory of `step` (older runs saved `step_NNNNNNN.pt` files; `checkpoints()` finds both)."""
        return self.checkpoints_dir / f"step_{int(step):07d}"

    def sample_file(self, step: int, suffix: str) -> Path:
        """`samples/step_NNNNNNN.<suffix>` (png: the grid, npz: the samples)."""
        return self.path / SAMPLES / f"step_{int(step):07d}.{suffix}"

    def started(self) -> bool:
        """Whether a run began here: a trainer wrote its config, state or checkpoints, or a launched job's Hydra
        wrote its records (.hydra/) before the trainer got that far."""
        return any(p.exists() for p in (self.config_file, self.state_file, self.checkpoints_dir, self.path / ".hydra"))

    # --- checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoints of the run, oldest first: `step_<digits>/` directories and older runs' `step_<digits>.pt`
        files (anything named otherwise, temp dirs and set-aside ones included, is not a checkpoint)."""
        found = [p for p in self.checkpoints_dir.glob("step_*") if p.name.removesuffix(".pt")[len("step_"):].isdigit()]
        return sorted(found, key=lambda p: (checkpoint_step(p), p.is_dir()))

    def newest_checkpoint(self) -> Path | None:
        """The newest checkpoint that looks whole (a directory's .metadata is there, a file's zip directory reads):
        what a resume would start from unless it turns out damaged too. A few bytes per checkpoint, without torch
        (status and sweep plans call this), where loading would read gigabytes."""
        return next((p for p in reversed(self.checkpoints()) if checkpoint_problem(p, parts=False) is None), None)

    def check_checkpoints(self) -> None:
        """Refuse (one line naming the file) a newest checkpoint directory that lacks a part or its .metadata: a
        save only renames a directory into place once every part is written, so something outside the run
        damaged it, and resuming from an older one would silently drop its steps. Checked before a run writes
        anything; an older .pt that does not read is reported and skipped when resuming, as before."""
        for path in reversed(self.checkpoints()):
            problem = checkpoint_problem(path)
            if path.is_dir():
                if problem is not None:
                    raise HarnessError(f"checkpoint {path} is incomplete: {problem}; restore it, or move it out of "
                                       f"{self.checkpoints_dir} to resume from the one before")
                return
            if problem is None:
                return

    def load_newest_checkpoint(self, load: Callable[[Path], dict] | None = None,
                               say: Callable[[str], None] = print) -> dict | None:
        """`load(path)` (default `read_checkpoint`) of the newest checkpoint that loads; an unreadable newer .pt is
        reported and skipped, never deleted; an incomplete checkpoint directory is refused (`check_checkpoints`)."""
        self.check_checkpoints()
        paths = self.checkpoints()
        for path in reversed(paths):
            try:
                problem = checkpoint_problem(path)
                if problem is not None:
                    raise ValueError(problem)
                state = (load or read_checkpoint)(path)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a harness training checkpoint")
                return state
            except HarnessError:
                raise
            except Exception as err:  # a truncated or corrupt file: fall back to the previous one
                say(f"checkpoint {path} is unreadable ({type(err).__name__}: {first_line(err)})")
        if paths:
            say(f"no readable checkpoint in {self.checkpoints_dir}: starting from step 0")
        return None

    def checkpoint_temp_dir(self, step: int) -> Path:
        """Where the checkpoint of `step` is written before `commit_checkpoint` renames it into place."""
        return self.checkpoints_dir / f".step_{int(step):07d}.tmp"

    def commit_checkpoint(self, step: int) -> Path:
        """Rename the finished temp dir of `step` into place (every rank's part and the metadata are in it), with
        the directory entry fsynced: the checkpoint exists whole or not at all."""
        path = self.checkpoint_file(step)
        if path.exists():  # the same step saved again (a run resumed before it): the new one replaces it
            path.rename(path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
        self.checkpoint_temp_dir(step).rename(path)
        fd = os.open(self.checkpoints_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for replaced in self.checkpoints_dir.glob(f"{path.name}.replaced-*"):
            shutil.rmtree(replaced, ignore_errors=True)
        return path

    def prune_checkpoints(self, keep_last: int, milestones: set[int]) -> None:
        """Keep the newest `keep_last` checkpoints and every milestone; remove what saves a kill cut short (called
        between saves, when none is being written)."""
        for path in self.checkpoints()[:-keep_last]:
            if checkpoint_step(path) not in milestones:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.discard_partial_saves()

    def discard_partial_saves(self) -> None:
        """Remove the temp dirs (and older runs' temp files) of saves a kill cut short: never committed, never read."""
        for partial in self.checkpoints_dir.glob(".step_*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
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
        # A row of the validation loss only (fid_name null) gives way to an FID row of its step, which holds the loss too.
        sampled = {step for step, name in best if name is not None}
        return [row for (step, name), row in best.items() if name is not None or step not in sampled]

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
