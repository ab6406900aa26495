"""Sweeps on a real single-node SLURM (tests/slurm/slurm-local.sh): submit, preempt, requeue, kill, relaunch.

One scenario, run once for the module (it is the slow part: every job starts Python, trains and
evaluates), on the demo sweep shrunk to a tiny DiT and 1,500 fast steps:

1. sweep P (patch 4) and sweep S (patch 8 and 4) are submitted with launcher=slurm and no waiting;
2. P's job gets `scancel --signal=USR2` mid-run: it must checkpoint, requeue itself and finish; its
   final weights must equal those of S's patch-4 run, trained without interruption;
3. S's patch-8 job is killed (`scancel --signal=KILL`) after its first checkpoint; launching S again
   must resubmit only that run, which resumes from its checkpoint; launching S once more submits nothing.

A second, smaller scenario runs one config as a two-task job (two gloo processes on the node's two CPUs,
joined through submitit's TorchDistributedEnvironment): preempted with USR2 mid-run on both tasks, requeued,
and its final weights equal to those of the same two-task job run without interruption.

Without SLURM (and no root to start it) the tests skip; under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_harness
from harness.io import read_jsonl
from harness.run_dir import RunDir, checkpoint_step, read_checkpoint
from harness.sweep.schedulers import SUBMISSIONS, last_submissions
from harness.sweep.status import sweep_status

pytestmark = pytest.mark.slurm

STEPS = 1500  # long enough (about a minute) that the preemption and the kill land mid-run on an idle machine
TINY = [
    "launcher=slurm", "model=custom", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
    "trainer.global_batch_size=16", f"trainer.max_steps={STEPS}", "trainer.ckpt_every=40", "trainer.log_every=10",
    "eval.every=0", "eval.num_samples=20", "eval.sampler=ddim5", "eval.batch_size=20",
    "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30", "hydra.launcher.poll_s=2",
]
RUN = "digits-custom-d2-h32-{}-adaln_zero"
SCENARIO_TIMEOUT_S = 420


def slurm_or_skip() -> None:
    """Start the local cluster (idempotent); a missing or broken SLURM skips, or fails under CI=true."""
    ci = os.environ.get("CI", "").lower() == "true"
    try:
        out = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "slurm-local.sh"), "start"],
                             capture_output=True, text=True, timeout=600)
        problem = None if out.returncode == 0 else ((out.stderr or out.stdout).strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as err:
        problem = str(err)
    if problem is not None:
        message = f"no local SLURM: tests/slurm/slurm-local.sh start failed ({problem})"
        if ci:
            pytest.fail(message)
        pytest.skip(message)


def sweep(sweep_dir: Path, *overrides: str, wait_s: int = 0, tiny: tuple = tuple(TINY)) -> subprocess.CompletedProcess:
    out = run_harness(["sweep", "demo", *tiny, *overrides, f"hydra.sweep.dir={sweep_dir}",
                       f"hydra.launcher.wait_s={wait_s}"], timeout=wait_s + 120)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out


def job_of(sweep_dir: Path, run: str) -> str:
    return last_submissions(sweep_dir)[run]["job_id"]


def last_logged_step(run_dir: Path) -> int:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


def queued(*sweep_dirs: Path) -> set[str]:
    """The jobs of these sweeps still in SLURM's queue."""
    ours = {r["job_id"] for d in sweep_dirs for r in read_jsonl(d / SUBMISSIONS)}
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60)
    return ours & set(out.stdout.split())


def wait_until(condition, what: str, deadline: float, poll_s: float = 0.3):
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def final_weights(run_dir: Path) -> dict:
    """The newest checkpoint's step, model and EMA, a single file or a sharded directory alike."""
    return read_checkpoint(RunDir(run_dir).checkpoints()[-1], keys={"step", "model", "ema"})


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    slurm_or_skip()
    root = tmp_path_factory.mktemp("slurm-sweeps")
    p_dir, s_dir = root / "P", root / "S"
    seen: dict = {}
    try:
        first = sweep(p_dir, "model.patch_size=4")
        seen["first_launch"] = first.stdout
        sweep(s_dir, "model.patch_size=8,4")
        deadline = time.time() + SCENARIO_TIMEOUT_S
        p_run, killed_run, twin_run = p_dir / RUN.format(4), s_dir / RUN.format(8), s_dir / RUN.format(4)

        # Preempt P (USR2) mid-run and kill S's patch-8 run once it has a checkpoint; see P pending
        # again after its requeue.
        p_job = preempted = killed = None
        while not (killed and preempted):
            assert time.time() < deadline, f"timed out: preempted={preempted} killed={killed}"
            if p_job is None and 20 <= last_logged_step(p_run) < STEPS - 150:
                p_job = job_of(p_dir, p_run.name)
                subprocess.run(["scancel", "--signal=USR2", p_job], check=True, timeout=60)
            if not killed and RunDir(killed_run).checkpoints():
                assert last_logged_step(killed_run) < STEPS - 100, "S/patch 8 ran too far to be killed mid-run"
                # SIGKILL, as a crashed node or the OOM killer would: no checkpoint, no requeue.
                subprocess.run(["scancel", "--signal=KILL", job_of(s_dir, killed_run.name)], check=True, timeout=60)
                killed = True
            if p_job is not None and not preempted:
                preempted = next((r for r in sweep_status(p_dir) if r["state"] == "requeued"), None)
            time.sleep(0.3)
        seen.update(p_job=p_job, requeued_status=preempted)
        wait_until(lambda: not queued(p_dir, s_dir), "the jobs to leave the queue", deadline, poll_s=1.0)
        seen["after_kill"] = {r["run"]: r for r in sweep_status(s_dir)}
        seen["killed_checkpoint"] = max(checkpoint_step(p) for p in RunDir(killed_run).checkpoints())

        relaunch = sweep(s_dir, "model.patch_size=8,4", wait_s=150)
        seen["relaunch"] = relaunch.stdout
        seen["again"] = sweep(s_dir, "model.patch_size=8,4").stdout
        seen["queue_after_again"] = queued(p_dir, s_dir)
        seen.update(p_dir=p_dir, s_dir=s_dir, p_run=p_run, killed_run=killed_run, twin_run=twin_run)
        yield seen
    finally:
        cancel_jobs(p_dir, s_dir)


def cancel_jobs(*sweep_dirs: Path) -> None:
    """Never leave jobs of this module behind."""
    for sweep_dir in sweep_dirs:
        ids = [r["job_id"] for r in read_jsonl(sweep_dir / SUBMISSIONS)]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def test_every_run_finishes_with_checkpoints_and_results(scenario):
    assert "1 of 1 runs to submit (slurm)" in scenario["first_launch"]
    for run_dir in (scenario["p_run"], scenario["killed_run"], scenario["twin_run"]):
        state = json.loads((run_dir / "run_state.json").read_text())
        assert (state["state"], state["step"]) == ("done", STEPS)
        assert checkpoint_step(RunDir(run_dir).checkpoints()[-1]) == STEPS
        rows = read_jsonl(run_dir / "results.jsonl")
        assert rows and rows[-1]["step"] == STEPS and rows[-1]["fid"] > 0 and rows[-1]["fid_name"] == "fid_digits"
    rows = {r["run"]: r for r in sweep_status(scenario["s_dir"])}
    assert {r["state"] for r in rows.values()} == {"done"}
    assert all(Path(r["log"]).exists() for r in rows.values())


def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(scenario):
    requeued = scenario["requeued_status"]
    assert requeued["job_id"] == scenario["p_job"]
    state = json.loads((scenario["p_run"] / "run_state.json").read_text())
    assert state["requeues"] >= 1 and state["slurm_job_id"] == scenario["p_job"]   # the same job, requeued
    log = Path(requeued["log"]).read_text()
    assert "preempted at step" in log and "resumed" in log
    preempted, uninterrupted = final_weights(scenario["p_run"]), final_weights(scenario["twin_run"])
    assert preempted["step"] == uninterrupted["step"] == STEPS
    for which in ("model", "ema"):
        for key, value in uninterrupted[which].items():
            assert torch.equal(preempted[which][key], value), (which, key)


def test_relaunch_resumes_only_the_killed_run(scenario):
    killed = scenario["after_kill"][scenario["killed_run"].name]
    assert killed["state"] == "interrupted" and killed["step"] < STEPS
    assert scenario["after_kill"][scenario["twin_run"].name]["state"] == "done"
    text = scenario["relaunch"]
    assert "1 of 2 runs to submit (slurm)" in text
    assert f"{scenario['killed_run'].name}: submit (resume from step {scenario['killed_checkpoint']})" in text
    assert f"{scenario['twin_run'].name}: skip (done at step {STEPS})" in text
    submitted = [r["run_name"] for r in read_jsonl(scenario["s_dir"] / SUBMISSIONS)]
    assert submitted.count(scenario["killed_run"].name) == 2 and submitted.count(scenario["twin_run"].name) == 1


def test_relaunch_after_completion_submits_nothing(scenario):
    assert "0 of 2 runs to submit (slurm)" in scenario["again"]
    assert len(read_jsonl(scenario["s_dir"] / SUBMISSIONS)) == 3
    assert not scenario["queue_after_again"]


# One run, two tasks: the demo's mini-S/8 with 300 fast steps (~15 s of training on two gloo processes), no FID.
TWO_TASK_STEPS = 300
TWO_TASKS = (
    "launcher=slurm", "model=mini-S/8", "trainer.global_batch_size=16", f"trainer.max_steps={TWO_TASK_STEPS}",
    "trainer.ckpt_every=50", "trainer.log_every=10", "eval.every=null",
    "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30",
)
TWO_TASK_RUN = "digits-mini-S-8-adaln_zero"
TWO_TASK_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """Sweep Q's two-task job is preempted (USR2 to both tasks) mid-run; sweep R's identical job runs through. The
    node's two CPUs hold one such job at a time, so R runs before or after Q's requeued second half."""
    slurm_or_skip()
    root = tmp_path_factory.mktemp("slurm-two-tasks")
    q_dir, r_dir = root / "Q", root / "R"
    seen: dict = {}
    try:
        sweep(q_dir, tiny=TWO_TASKS)
        sweep(r_dir, tiny=TWO_TASKS)
        deadline = time.time() + TWO_TASK_TIMEOUT_S
        q_run = q_dir / TWO_TASK_RUN
        wait_until(lambda: 20 <= last_logged_step(q_run), "Q's first steps", deadline)
        assert last_logged_step(q_run) < TWO_TASK_STEPS - 100, "Q ran too far to be preempted mid-run"
        q_job = job_of(q_dir, TWO_TASK_RUN)
        subprocess.run(["scancel", "--signal=USR2", q_job], check=True, timeout=60)  # every task of the job
        seen["requeued_status"] = wait_until(
            lambda: next((r for r in sweep_status(q_dir) if r["state"] == "requeued"), None), "Q's requeue", deadline)
        wait_until(lambda: not queued(q_dir, r_dir), "the jobs to leave the queue", deadline, poll_s=1.0)
        seen.update(q_job=q_job, q_run=q_run, r_run=r_dir / TWO_TASK_RUN)
        yield seen
    finally:
        cancel_jobs(q_dir, r_dir)


def test_a_two_task_job_preempted_on_both_tasks_requeues_and_matches_an_uninterrupted_one(two_tasks):
    q_run, r_run = two_tasks["q_run"], two_tasks["r_run"]
    for run_dir in (q_run, r_run):
        state = json.loads((run_dir / "run_state.json").read_text())
        assert (state["state"], state["step"]) == ("done", TWO_TASK_STEPS)
        assert "on cpu x2" in (run_dir / "train.log").read_text()  # one process group of two ranks
    state = json.loads((q_run / "run_state.json").read_text())
    assert state["requeues"] >= 1 and state["slurm_job_id"] == two_tasks["q_job"]  # the same job, requeued
    log = (q_run / "train.log").read_text()
    assert "preempted at step" in log and "resumed" in log
    # Both tasks ran, each time: submitit logs each task's rank.
    logs = sorted(Path(two_tasks["requeued_status"]["log"]).parent.glob("*_log.out"))
    assert [p.name.split("_")[1] for p in logs] == ["0", "1"]
    assert all(p.read_text().count("global_rank=") >= 2 for p in logs)  # started twice: before and after the requeue
    preempted, uninterrupted = final_weights(q_run), final_weights(r_run)
    assert preempted["step"] == uninterrupted["step"] == TWO_TASK_STEPS
    for which in ("model", "ema"):
        for key, value in uninterrupted[which].items():
            assert torch.equal(preempted[which][key], value), (which, key)
