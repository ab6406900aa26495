"""Sharded checkpoints (torch.distributed.checkpoint) and FSDP: two gloo processes on CPU.

Each rank writes its own part of a checkpoint directory; resuming maps the saved parts onto any world size; a
kill mid-save leaves only a temp dir, and the previous checkpoint is used; FSDP trains like DDP (within a stated
tolerance) and resumes exactly; a background (async) save is committed whole and resumes exactly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, harness_env, run_harness
from harness.config import compose
from harness.io import read_jsonl
from harness.run_dir import RunDir, checkpoint_step, read_checkpoint
from harness.train.loop import train
from harness.train.step import LOGGED_LOSSES

STEPS = 10
# FSDP vs DDP on CPU in fp32 (trainer.precision=auto): the same math, with gradients reduce-scattered instead of
# all-reduced. Measured with two gloo processes over 10 steps of the tiny model: losses and weights bitwise equal
# (a sum of two gradients rounds the same either way); with more ranks the summation order may differ, so the
# test allows float32 rounding over 10 steps.
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5", f"hydra.run.dir={run_dir}", *extra]


def torchrun(run_dir: Path, *extra: str, port: int) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", "harness.cli", *train_args(run_dir, *extra)],
                          cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(run_dir: Path, step: int = STEPS) -> dict:
    state = read_checkpoint(RunDir(run_dir).checkpoint_file(step))
    assert state["step"] == step
    return {which: state[which] for which in ("model", "ema")}


def assert_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    for which in ("model", "ema"):
        assert a[which].keys() == b[which].keys()
        for key in a[which]:
            if atol == 0.0:
                assert torch.equal(a[which][key], b[which][key]), f"{which}.{key} differs"
            else:
                torch.testing.assert_close(a[which][key], b[which][key], rtol=0, atol=atol, msg=f"{which}.{key}")


def losses(run_dir: Path) -> list[list[float]]:
    return [[row[k] for k in LOGGED_LOSSES] for row in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def resumed_from(run_dir: Path, step: int, source: Path) -> Path:
    """A run dir holding only `source`'s checkpoint of `step` (and its config): what a kill after that save leaves."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(RunDir(source).checkpoint_file(step), RunDir(run_dir).checkpoint_file(step))
    shutil.copy(source / "config.yaml", run_dir / "config.yaml")
    return run_dir


def test_fsdp_trains_like_ddp_and_its_checkpoints_resume_at_two_and_at_one_process(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    evaluation = ("eval.every=10", "eval.num_samples=24", "eval.batch_size=8", "eval.sampler=ddpm4")  # at the end
    torchrun(ddp, *evaluation, port=29531)
    torchrun(fsdp, "trainer.parallel=fsdp", *evaluation, port=29532)
    # Each rank wrote its own part: the FSDP shards of rank 0 and of rank 1, and rank 0 the metadata.
    parts = sorted(p.name for p in RunDir(fsdp).checkpoint_file(STEPS).iterdir())
    assert parts == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [checkpoint_step(p) for p in RunDir(fsdp).checkpoints()] == [5, 10]
    for a, b in zip(losses(ddp), losses(fsdp), strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert_weights(weights(fsdp), weights(ddp), atol=WEIGHT_ATOL)
    # Sampled from the gathered EMA, the evaluation is DDP's (the samples' noise is drawn outside the model).
    (ddp_row,), (fsdp_row,) = read_jsonl(ddp / "results.jsonl"), read_jsonl(fsdp / "results.jsonl")
    assert fsdp_row["fid"] == pytest.approx(ddp_row["fid"], rel=LOSS_RTOL)

    # Killed after step 5 and resumed by two processes (here with background saves): bitwise the same run.
    again = resumed_from(tmp_path / "again", 5, fsdp)
    done = torchrun(again, "trainer.parallel=fsdp", "trainer.async_checkpoint=true", port=29533)
    assert f"resumed {again} from step 5" in done.stdout + done.stderr
    assert_weights(weights(again), weights(fsdp))
    assert not list((again / "checkpoints").glob(".step_*"))  # every background save committed

    # Saved by two FSDP processes, resumed by one: the shards map onto whole tensors, the run goes on.
    one = resumed_from(tmp_path / "one", 5, fsdp)
    result = run_harness(train_args(one))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {one} from step 5" in result.stdout + result.stderr
    assert_weights(weights(one), weights(fsdp), atol=WEIGHT_ATOL)
    assert losses(one)[-1] == pytest.approx(losses(fsdp)[-1], rel=LOSS_RTOL)


# A training run whose save of step 10 stalls after writing its part, before the metadata: the moment to kill it.
STALLED_SAVE = """
import sys, time
import torch.distributed.checkpoint.filesystem as fs
from harness.config import compose
from harness.train.loop import train

finish = fs._FileSystemWriter.finish
def stalled(self, metadata, results):
    if "step_0000010" in str(self.path):
        time.sleep(300)
    return finish(self, metadata, results)
fs._FileSystemWriter.finish = stalled
train(compose(sys.argv[2:]), sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_used(tmp_path):
    overrides = [*TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5"]
    reference = tmp_path / "reference"
    train(compose(overrides), reference)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_SAVE, str(killed), *overrides], cwd=REPO, env=harness_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = RunDir(killed).checkpoint_temp_dir(STEPS)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial / "__0_0.distcp").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()  # SIGKILL while saving step 10: its part is written, its .metadata is not
    proc.communicate()
    assert (partial / "__0_0.distcp").exists() and not (partial / ".metadata").exists()
    assert RunDir(killed).newest_checkpoint() == RunDir(killed).checkpoint_file(5)
    result = train(compose(overrides), killed)
    assert result["step"] == STEPS
    assert f"resumed {killed} from step 5" in (killed / "train.log").read_text()
    assert [checkpoint_step(p) for p in RunDir(killed).checkpoints()] == [5, 10] and not partial.exists()
    assert_weights(weights(killed), weights(reference))


def test_background_saves_are_committed_whole_and_resume_exactly(tmp_path):
    reference = tmp_path / "reference"
    train(compose([*TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5"]), reference)
    background = tmp_path / "background"
    args = [*TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=2", "trainer.keep_last=2",
            "trainer.ckpt_milestones=[5]", "trainer.async_checkpoint=true"]
    train(compose(args), background)
    # keep-last 2 plus the milestone, every one committed (no temp dir), the last one equal to a blocking save's
    assert [checkpoint_step(p) for p in RunDir(background).checkpoints()] == [5, 8, 10]
    assert not list((background / "checkpoints").glob(".step_*"))
    assert_weights(weights(background), weights(reference))
    resumed = resumed_from(tmp_path / "resumed", 5, background)
    train(compose(args), resumed)
    assert_weights(weights(resumed), weights(reference))


def test_an_older_single_file_checkpoint_still_resumes_exactly(tmp_path):
    from test_train import as_older_pt

    reference = tmp_path / "reference"
    train(compose([*TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5"]), reference)
    older = resumed_from(tmp_path / "older", 5, reference)
    path = as_older_pt(RunDir(older).checkpoint_file(5))
    assert RunDir(older).checkpoints() == [path]
    train(compose([*TINY, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5"]), older)
    assert_weights(weights(older), weights(reference))


def test_a_stop_waits_for_the_background_save_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM with trainer.async_checkpoint: the step it lands in is saved and committed before the exit (143)."""
    import json
    import os
    import signal

    from conftest import HARNESS

    reference = tmp_path / "reference"
    steps = 30
    train(compose([*TINY, f"trainer.max_steps={steps}", "trainer.ckpt_every=10"]), reference)
    stopped = tmp_path / "stopped"
    args = ["train", *TINY, f"trainer.max_steps={steps}", "trainer.ckpt_every=10", "trainer.async_checkpoint=true",
            f"hydra.run.dir={stopped}"]
    proc = subprocess.Popen([*HARNESS, *args], cwd=REPO, env=harness_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not RunDir(stopped).checkpoints() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-2000:]
    state = json.loads((stopped / "run_state.json").read_text())
    newest = checkpoint_step(RunDir(stopped).checkpoints()[-1])
    assert (state["state"], state["step"]) == ("preempted", newest) and newest < steps
    assert not list((stopped / "checkpoints").glob(".step_*"))  # committed, not left half-way
    resumed = run_harness(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_weights(weights(stopped, steps), weights(reference, steps))
