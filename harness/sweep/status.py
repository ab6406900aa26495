"""`harness status SWEEP_DIR`: each run's place in its life, from its run dir, the sweep's records and the queue.

A run is

    not-submitted  no launch has submitted it, and no trainer has written its state
    pending        its job waits in the queue
    running        its job (or a trainer started by hand on this host) runs
    requeued       its job waits in the queue again, after a preemption or a time limit
    interrupted    its job is gone without finishing (killed, cancelled): launching again resumes it
    failed         training raised, or the job ended with an error before training started
    done           training reached max_steps

and, while squeue does not answer, `<saved state> (queue unknown)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from harness.errors import HarnessError, require
from harness.io import read_yaml, text_table
from harness.run_dir import RunDir, RunState, checkpoint_step
from harness.sweep import schedulers

SWEEP_RECORD = "sweep.yaml"          # the sweep's name, grid and resolved config, in the sweep dir
ERROR_TAIL_LINES = 6


def read_sweep_record(sweep_dir: Path) -> DictConfig | None:
    """The sweep dir's `sweep.yaml` (written by the last launch that submitted something), None if there is none."""
    path = Path(sweep_dir) / SWEEP_RECORD
    return read_yaml(path) if path.exists() else None


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step a relaunch resumes from: the newest checkpoint whose zip directory reads."""
    newest = RunDir(run_dir).newest_checkpoint()
    return checkpoint_step(newest) if newest is not None else None


def sweep_status(sweep_dir: str | os.PathLike) -> list[dict]:
    """One row per run of a sweep dir: state, job, progress, last FID (its interval, class accuracy), log and (if
    failed) the error."""
    sweep_dir = Path(sweep_dir).absolute()
    require(sweep_dir.is_dir(), f"{sweep_dir} is not a directory")
    require(not RunDir(sweep_dir).state_file.exists(),
            f"{sweep_dir} is a run dir, not a sweep dir: give the sweep dir above it ({sweep_dir.parent})")
    record = read_sweep_record(sweep_dir) or {}
    submissions = schedulers.last_submissions(sweep_dir)
    names = {p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and RunDir(p).started()}
    names |= set((record.get("grid") or {}).keys()) | set(submissions)
    require(names, f"{sweep_dir} holds no runs (no run dirs, {SWEEP_RECORD} or {schedulers.SUBMISSIONS})")
    needs_queue = any(s.get("executor") == "slurm" for s in submissions.values())
    queue = schedulers.slurm_queue(strict=False) if needs_queue else None
    return [_run_row(RunDir(sweep_dir / name), submissions.get(name) or {}, queue, needs_queue)
            for name in sorted(names)]


def run_state(saved: RunState | None, queued: str | None, queue_unknown: bool, submitted: bool,
              job_left_errors: bool, checkpointed: bool = False) -> str:
    """The run's state (see the module docstring) from what its trainer saved last, what the scheduler says of its
    job (`queued`: its squeue state, "" if gone, None if not asked), whether a launch submitted it and its job
    left an error log, and whether it has a checkpoint (a run with one trained, whatever saved its state)."""
    saved_state = saved.state if saved else None
    if saved_state == "done":
        return "done"
    if queued:
        if queued in schedulers.RUNNING_QUEUE_STATES:
            return "running"
        requeued = saved_state == "preempted" or int((saved.requeues if saved else 0) or 0) > 0
        return "requeued" if requeued else "pending"
    if saved_state == "failed":
        return "failed"
    if queued is None and queue_unknown:
        return f"{saved_state or 'submitted'} (queue unknown)"
    if submitted and not saved_state:  # its job ended before training started: an error, or cancelled while queued
        return "failed" if job_left_errors else "interrupted"
    if saved_state in ("running", "preempted") or (checkpointed and not saved_state):
        return "interrupted"
    return "not-submitted"


def _run_row(run: RunDir, submission: dict, queue: dict | None, needs_queue: bool) -> dict:
    saved = run.read_state()
    with_fid = [row for row in run.results() if row.get("fid") is not None]
    last = max(with_fid, key=lambda row: row.get("step") or 0) if with_fid else {}
    checkpoint = newest_checkpoint_step(run.path)
    job_errors = _tail(submission.get("stderr"))
    executor = submission.get("executor")
    job_id = str(submission.get("job_id") or (saved.slurm_job_id if saved else None) or "") or None
    queued = None
    if executor == "local":
        queued = "RUNNING" if schedulers.local_job_alive(submission) else ""
    elif queue is not None and job_id:
        queued = queue.get(job_id, {}).get("state", "")
    if not queued and schedulers.trainer_alive(saved):
        queued = "RUNNING"
    status = run_state(saved, queued, needs_queue, bool(submission), bool(job_errors), checkpoint is not None)
    log = submission.get("stdout")
    if not log or not Path(log).exists():
        log = str(run.log_file) if run.log_file.exists() else log
    error = []
    if status in ("failed", "interrupted"):
        if saved and saved.error:
            error += str(saved.error).strip().splitlines()[-ERROR_TAIL_LINES:]
        elif submission and not (saved and saved.state):
            error.append(f"job {job_id} ended before training started"
                         + ("" if status == "failed" else ", its error log empty (cancelled while queued?)"))
        error += [f"| {line}" for line in job_errors]
    if saved is None and run.state_file.exists():
        error.insert(0, f"{run.state_file} is not readable JSON: the state shown is a guess")
    return {
        "run": run.path.name, "run_dir": str(run.path), "state": status, "job_id": job_id,
        "queue_state": queued or None, "step": _last_step(run, saved, checkpoint),
        "max_steps": saved.max_steps if saved else _configured_max_steps(run), "checkpoint": checkpoint,
        "requeues": saved.requeues if saved else None,
        "fid": last.get("fid"), "fid_step": last.get("step"), "fid_name": last.get("fid_name"),
        "fid_lo": last.get("fid_lo"), "fid_hi": last.get("fid_hi"), "class_accuracy": last.get("class_accuracy"),
        "log": log, "error": error,
    }


def _configured_max_steps(run: RunDir) -> int | None:
    """trainer.max_steps from the run's config.yaml, for a run without a run_state.json."""
    try:
        return int(read_yaml(run.config_file).trainer.max_steps) if run.config_file.exists() else None
    except (HarnessError, AttributeError, TypeError, ValueError):
        return None


def _tail(path: str | Path | None, lines: int = ERROR_TAIL_LINES) -> list[str]:
    if not path:
        return []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _last_step(run: RunDir, saved: RunState | None, checkpoint: int | None) -> int | None:
    """The furthest step a run is known to have reached: its state is only saved at start and end."""
    metrics = run.read_metrics()
    steps = [s for s in (saved.step if saved else None, metrics[-1].get("step") if metrics else None, checkpoint)
             if s is not None]
    return max(steps) if steps else None


def format_status(rows: list[dict]) -> str:
    """The status rows as a table, then the error lines of failed or interrupted runs."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    header = ["run", "state", "job", "step", "checkpoint", "requeues", "last FID [95%] (step)", "class acc.", "log"]
    body = []
    for r in rows:
        step = "" if r["step"] is None else f"{r['step']}/{'?' if r['max_steps'] is None else r['max_steps']}"
        interval = "" if r["fid_lo"] is None else f" [{r['fid_lo']:.1f}, {r['fid_hi']:.1f}]"
        fid = "" if r["fid"] is None else f"{r['fid']:.2f}{interval} ({r['fid_step']}) {r['fid_name'] or ''}".rstrip()
        accuracy = "" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}%"
        checkpoint = "" if r["checkpoint"] is None else str(r["checkpoint"])  # where a relaunch resumes
        body.append([r["run"], r["state"], r["job_id"] or "", step, checkpoint, str(r["requeues"] or 0), fid,
                     accuracy, r["log"] or ""])
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [f"{len(rows)} run{'' if len(rows) == 1 else 's'}: {summary}",
             *text_table(header, body, left=range(len(header)))]
    for r in rows:
        if r["error"]:
            lines += ["", f"{r['run']} ({r['state']}):", *(f"  {line}" for line in r["error"])]
    return "\n".join(lines)
