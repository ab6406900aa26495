"""`harness demo-bench`: `make demo` for one seed, timed and checked against the claim it exists to show.

The demo promises a claim within a budget: on an idle 2-core CPU, FID falls as Gflops grow (r(log Gflops, log FID)
<= -0.8), so does the validation loss, and the digits CNN assigns at least 90% of the best config's samples to the
class they were conditioned on, all within 15 minutes, report included. Whether that holds is a measurement, not a
test, so it is made here: the two commands of `make demo` run in a fresh directory as a user runs them (`harness
sweep demo seed=N`, then `harness report`), the claim is read back from the report's fits.json, and one row goes to
a benchmark log with the host's speed before and after (a mini-B/2 training step on one thread), because the same
work on the same machine has taken 1.5x as long on another afternoon (docs/demo.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError, require
from harness.io import append_jsonl, check_output_path, read_json, read_jsonl

CLAIM = {"max_r": -0.8, "min_accuracy": 0.90, "max_wall_s": 15 * 60}
HOST_PROBE = ["--what", "train", "model=mini-B/2", "trainer.device=cpu", "trainer.global_batch_size=12"]
SWEEP_DIR, REPORT_DIR = Path("sweeps_out/demo"), Path("reports/demo")
# Overrides that would move the sweep's output away from where `make demo` (and this benchmark) reads it.
PLACED_KEYS = ("hydra.sweep.dir", "sweep_name")


def demo_claim(fits: dict, wall_s: float) -> dict:
    """Each part of the claim, from a demo report's fits.json and the demo's wall time: value, threshold, verdict."""
    fid_fit = next(iter(fits.get("fits", {}).values()), None)
    loss_fit, accuracy = fits.get("val_loss_vs_gflops"), fits.get("class_accuracy")
    checks = {
        "fid_r": (fid_fit and fid_fit["r"], f"<= {CLAIM['max_r']}",
                  fid_fit is not None and fid_fit["r"] <= CLAIM["max_r"]),
        "val_loss_exponent": (loss_fit and loss_fit["exponent"], "< 0: falling as Gflops grow",
                              loss_fit is not None and loss_fit["exponent"] < 0),
        "best_accuracy": (accuracy and accuracy["best_accuracy"], f">= {CLAIM['min_accuracy']:.0%}",
                          accuracy is not None and accuracy["best_accuracy"] >= CLAIM["min_accuracy"]),
        "wall_s": (wall_s, f"<= {CLAIM['max_wall_s']} s", wall_s <= CLAIM["max_wall_s"]),
    }
    claim = {name: {"value": value, "needs": needs, "holds": bool(holds)} for name, (value, needs, holds) in checks.items()}
    return {"claim": claim, "holds": all(part["holds"] for part in claim.values()),
            "fid_r_ci": fid_fit and fid_fit["r_ci"], "best_config": accuracy and accuracy["best_config"],
            "accuracy_by_config": accuracy and accuracy["by_config"], "headline": fits.get("headline", [])}


def run_demo_bench(seed: int, workdir: str | os.PathLike, log: str | os.PathLike, overrides: list[str] = (),
                   host_probe: bool = True, say: Callable[[str], None] = print) -> dict:
    """Run the demo for `seed` in the empty `workdir`, time it, check the claim and append the row to `log`."""
    workdir = Path(workdir).expanduser().absolute()
    placed = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in PLACED_KEYS]
    if placed:
        raise HarnessError(f"{placed[0]}: the demo benchmark reads the sweep where `make demo` writes it; give --dir "
                           "to place the whole demo instead")
    check_output_path(workdir, "--dir", kind="dir")
    require(not workdir.exists() or not any(workdir.iterdir()),
            f"--dir={workdir} is not empty: the demo is timed from nothing (runs already there would be resumed or "
            "skipped); give a new or empty directory")
    log = check_output_path(log, "--log").absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    harness, commit = _harness_command(), _commit()  # the code that runs, before anyone edits it
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    host_before = _host_probe(harness, workdir, say) if host_probe else None
    sweep_s, sweep_rc = _timed(harness + ["sweep", "demo", f"seed={seed}", *overrides], workdir, "sweep.log", say)
    if sweep_rc == 2:  # bad input: refused in one line before anything was submitted; no demo ran, no row
        lines = (workdir / "sweep.log").read_text().strip().splitlines() or [""]
        raise HarnessError(lines[-1].removeprefix("harness: error: "))
    report_s, report_rc = (_timed(harness + ["report", str(SWEEP_DIR), "-o", str(REPORT_DIR)], workdir, "report.log", say)
                           if sweep_rc == 0 else (0.0, None))
    host_after = _host_probe(harness, workdir, say) if host_probe else None
    probed = host_before or host_after
    row = {"timestamp": started, "commit": commit, "seed": seed,
           "overrides": list(overrides), "dir": str(workdir), "cores": os.cpu_count(),
           "host": probed and probed["device"],
           "host_step_ms": {when: probe and 1e3 * probe["train"]["step_s"]
                            for when, probe in (("before", host_before), ("after", host_after))},
           "sweep_s": round(sweep_s, 1), "report_s": round(report_s, 1), "wall_s": round(sweep_s + report_s, 1)}
    if sweep_rc or report_rc:
        failed = "sweep.log" if sweep_rc else "report.log"
        row.update(holds=False, error=f"{'harness sweep' if sweep_rc else 'harness report'} exited with "
                                      f"{sweep_rc or report_rc}: see {workdir / failed}")
    else:
        row.update(demo_claim(read_json(workdir / REPORT_DIR / "fits.json"), sweep_s + report_s))
    append_jsonl(log, row)
    return row


def format_demo_bench(row: dict) -> str:
    """The row as a reader wants it: the verdict, each part of the claim, the times and the host's speed."""
    before, after = (("?" if ms is None else f"{ms:.0f}") for ms in map(row["host_step_ms"].get, ("before", "after")))
    speed = "not probed" if before == after == "?" else f"mini-B/2 step {before} ms before, {after} ms after"
    lines = [f"demo seed {row['seed']} ({row['commit'] or 'no git commit'}): "
             f"{'the claim holds' if row['holds'] else 'the claim does NOT hold'}",
             f"  wall {row['wall_s']:.0f} s (sweep {row['sweep_s']:.0f} s, report {row['report_s']:.0f} s); host: {speed}"]
    if row.get("host"):
        lines.append(f"  on {row['host']}")
    if "error" in row:
        return "\n".join(lines + [f"  {row['error']}"])
    for name, part in row["claim"].items():
        value = part["value"]
        shown = ("not measured" if value is None else f"{value:.1%}" if name == "best_accuracy"
                 else f"{value:.0f} s" if name == "wall_s" else f"{value:.3g}")
        lines.append(f"  {'ok  ' if part['holds'] else 'FAIL'} {name} = {shown} (needs {part['needs']})")
    return "\n".join(lines + [f"  report: {Path(row['dir']) / REPORT_DIR / 'report.html'}"])


def _harness_command() -> list[str]:
    """This interpreter's `harness`: the one `make demo` runs from the same environment."""
    script = Path(sys.executable).with_name("harness")
    require(script.is_file(), f"{script} not found: run the demo benchmark from the environment `make setup` made")
    return [str(script)]


def _timed(command: list[str], workdir: Path, log_name: str, say) -> tuple[float, int]:
    """Seconds and exit status of `command` in `workdir`, its output in `workdir/log_name`."""
    say(f"harness {' '.join(command[1:])}  (output: {workdir / log_name})")
    with open(workdir / log_name, "wb") as out:
        began = time.monotonic()
        status = subprocess.run(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT).returncode
    return time.monotonic() - began, status


def _host_probe(harness: list[str], workdir: Path, say) -> dict | None:
    """`harness bench`'s row for one mini-B/2 training step on one thread: how fast the host is right now, and which CPU
    it is (the demo's numbers repeat exactly only on the same one). None if the probe failed (said, not raised: a
    failed probe after the demo must not lose the demo's row)."""
    probe_log = workdir / "host_speed.jsonl"
    say("probing the host's speed: a mini-B/2 training step on one thread")
    done = subprocess.run(harness + ["bench", *HOST_PROBE, "--log", str(probe_log)], cwd=workdir, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        say(f"the host probe `harness bench {' '.join(HOST_PROBE)}` failed: {done.stderr.strip()[-300:]}")
        return None
    return read_jsonl(probe_log)[-1]


def _commit() -> str | None:
    """The harness's git commit, with `+changes` when the working tree differs from it; None outside a checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
