"""Where a run's numbers go: `metrics.jsonl` in the run dir, the terminal and `train.log`, and wandb.

wandb is offline unless `logger.mode` says otherwise, so a run never needs a connection; an offline
run is synced later with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.config import slug
from harness.io import append_lines, atomic_write_bytes
from harness.run_dir import SUPERSEDED_METRICS, RunDir


class Tracker:
    """Writes metric rows to `metrics.jsonl`, prints progress (to the terminal and `train.log`), and mirrors
    both to wandb when enabled."""

    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool = True):
        self.run_dir = RunDir(run_dir)
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = None
        self.wandb_run = None
        if enabled and cfg.logger.name == "wandb":
            self.wandb_run = _init_wandb(cfg, self.run_dir.path)

    def progress(self, step: int, total: int) -> None:
        """Advance the progress bar (interactive terminals only; logs get the periodic lines instead)."""
        if not self.interactive:
            return
        if self.bar is None:
            from tqdm import tqdm  # only an interactive terminal draws a progress bar

            self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
        self.bar.update(step - self.bar.n)

    def log_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        self.run_dir.append_metrics(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def resumed_at(self, step: int) -> None:
        """The run resumed from its checkpoint of `step`: rows past it were logged by a run killed after that
        checkpoint, and the steps are trained (and logged) again. They move to `metrics.superseded.jsonl`, so
        `metrics.jsonl` holds each step once; every other line stays as it was."""
        path = self.run_dir.metrics_file
        if not self.enabled or not path.exists():
            return
        keep, stale = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                row_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                row_step = None
            (stale if isinstance(row_step, int) and row_step > step else keep).append(line)
        if stale:
            # Aside first: a kill between the two writes leaves a row in both files, never in neither.
            append_lines(self.run_dir.superseded_metrics_file,
                         b"".join(line if line.endswith(b"\n") else line + b"\n" for line in stale))
            atomic_write_bytes(path, b"".join(keep))
            self.print(f"{len(stale)} metrics rows past step {step} moved to {SUPERSEDED_METRICS}")

    def log_result(self, row: dict) -> None:
        """An evaluation row (already in results.jsonl) mirrored to wandb."""
        if self.wandb_run is not None:
            numbers = {f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb_run.log(numbers, step=row["step"])

    def print(self, text: str) -> None:
        """`text` on the terminal and, time-stamped, in the run's `train.log`."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr if self.interactive else sys.stdout, flush=True)
        self.write_log(text)

    def write_log(self, text: str) -> None:
        """`text`, time-stamped, in `train.log` only."""
        if self.enabled:
            with open(self.run_dir.log_file, "a") as log:
                log.write("".join(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n" for line in text.splitlines()))

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> None:
        self.close_bar()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def run_id(cfg: DictConfig, run_dir: str | os.PathLike) -> str:
    """A stable id of a run: its name and a hash of its directory (also its wandb run id)."""
    return f"{slug(cfg.run_name)}-{hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]}"


def _init_wandb(cfg: DictConfig, run_dir: Path):
    import wandb  # heavy (a second or more) and optional: runs with logger=none never import it

    logger = cfg.logger
    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir = Path(logger.dir) if logger.dir else run_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=logger.project,
        entity=logger.entity,
        mode=logger.mode,
        group=logger.group,
        name=cfg.run_name,
        id=run_id(cfg, run_dir),  # one wandb run per run dir, resumed across restarts and requeues
        resume="allow",
        dir=str(wandb_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        settings=wandb.Settings(console="off"),
    )

