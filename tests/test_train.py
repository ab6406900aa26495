"""The train app: exact resume after SIGKILL, corrupt-checkpoint fallback, DDP equivalence, bad input."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HARNESS, REPO, TINY, harness_env, run_harness
from harness.config import compose, resolve_device
from harness.config.checks import validate
from harness.errors import HarnessError
from harness.io import read_jsonl
from harness.sweep.status import newest_checkpoint_step
from harness.run_dir import RunDir, checkpoint_step, read_checkpoint
from harness.train.loop import train
from harness.train.runtime import achieved_tflops
from harness.train.step import LOGGED_LOSSES, step_draws, step_generator


def final_weights(run_dir: Path) -> dict:
    state = read_checkpoint(RunDir(run_dir).checkpoints()[-1])
    return {"step": state["step"], "model": state["model"], "ema": state["ema"]}


def checkpoint_bytes(run_dir: Path) -> dict:
    """Every file of the run's checkpoints (their directories' parts and metadata), by path: what a change shows in."""
    return {p.relative_to(run_dir): p.read_bytes() for p in (Path(run_dir) / "checkpoints").rglob("*") if p.is_file()}


def as_older_pt(path: Path, **changes) -> Path:
    """Rewrite the checkpoint directory `path` as an older run's single file (`step_N.pt`: the optimizer state
    keyed by parameter index, one process's RNGs), with `changes` to its entries (None: left out)."""
    state = read_checkpoint(path)
    names = [name for group in state["opt"]["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    state["opt"] = {"state": {index[k]: v for k, v in state["opt"]["state"].items()},
                    "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["opt"]["param_groups"]]}
    state["rng"] = state["rng"]["rank0"]
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    shutil.rmtree(path)
    torch.save(state, path.with_name(path.name + ".pt"))
    return path.with_name(path.name + ".pt")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for which in ("model", "ema"):
        assert a[which].keys() == b[which].keys()
        for key in a[which]:
            assert torch.equal(a[which][key], b[which][key]), f"{which}.{key} differs"


def train_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *TINY, f"trainer.max_steps={steps}", "trainer.ckpt_every=10", f"hydra.run.dir={run_dir}", *extra]


def start_and_signal_after_first_checkpoint(run_dir: Path, steps: int, signum: int, *extra: str) -> tuple[int, str]:
    """Starts a training run, sends `signum` once its first checkpoint is on disk: (exit status, stderr)."""
    proc = subprocess.Popen([*HARNESS, *train_args(run_dir, steps, *extra)], cwd=REPO, env=harness_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not RunDir(run_dir).checkpoints() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signum)
    stderr = proc.communicate(timeout=120)[1]
    return proc.returncode, stderr


def test_resume_after_sigkill_or_sigterm_is_bitwise_exact(tmp_path):
    steps = 60
    schedule = ("trainer.warmup_steps=15", "trainer.lr_schedule=cosine")  # the lr of a step is the step's alone
    reference = tmp_path / "uninterrupted"
    done = run_harness(train_args(reference, steps, *schedule))
    assert done.returncode == 0, done.stderr[-2000:]

    # SIGKILL, as the OOM killer or a lost node: whatever the last checkpoint holds survives.
    killed = tmp_path / "killed"
    start_and_signal_after_first_checkpoint(killed, steps, signal.SIGKILL, *schedule)
    saved = [checkpoint_step(p) for p in RunDir(killed).checkpoints()]
    assert saved and max(saved) < steps, f"the run was not killed mid-way (checkpoints {saved})"

    # SIGTERM, as `kill` or torchrun stopping its workers: the step it lands in is saved, then exit 143.
    stopped = tmp_path / "stopped"
    status, stderr = start_and_signal_after_first_checkpoint(stopped, steps, signal.SIGTERM, *schedule)
    state = json.loads((stopped / "run_state.json").read_text())
    newest = checkpoint_step(RunDir(stopped).checkpoints()[-1])
    assert status == 143, stderr[-2000:]
    assert (state["state"], state["step"]) == ("preempted", newest) and newest < steps
    assert "SIGTERM: stopping at the end of this step" in stderr

    for run_dir in (killed, stopped):
        resumed = run_harness(train_args(run_dir, steps, *schedule))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resumed {run_dir} from step" in resumed.stdout + resumed.stderr
        assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
        logged = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
        assert logged == sorted(set(logged)) and logged[-1] == steps  # each step once, in order, to the end
        log = (run_dir / "train.log").read_text()  # the run's own log holds both segments
        assert log.count("training custom") == 2 and f"resumed {run_dir} from step" in log and "done at step 60" in log


def test_one_process_at_a_time_trains_a_run_dir_and_a_killed_one_holds_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from harness.run_dir import RunDir\n"
                               "with RunDir(Path(sys.argv[1])).lock():\n    print(flush=True); time.sleep(120)",
                               str(tmp_path)], cwd=REPO, env=harness_env(), stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the run dir now, and says so as a trainer does
        state = json.dumps({"state": "running", "step": 3, "pid": holder.pid, "host": os.uname().nodename})
        (tmp_path / "run_state.json").write_text(state)
        second = run_harness(train_args(tmp_path, 10))
        assert second.returncode == 2
        assert second.stderr.strip() == (f"harness: error: {tmp_path} is being trained by pid {holder.pid} on "
                                         f"{os.uname().nodename}: wait for it to end or stop it, then launch again")
        assert (tmp_path / "run_state.json").read_text() == state  # nothing of the run touched or added
        assert {p.name for p in tmp_path.iterdir()} == {"run_state.json"}  # not even Hydra's .hydra/ records
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.communicate()
    assert train(compose([*TINY, "trainer.max_steps=10", "trainer.ckpt_every=10"]), tmp_path)["step"] == 10


def test_a_resumed_run_moves_the_metrics_rows_it_trains_again_aside(tmp_path):
    from harness.tracking import SUPERSEDED_METRICS, Tracker

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (5, 10, 15, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines[:2]) + "not json\n" + "".join(lines[2:]) + '{"step": 25')
    tracker = Tracker(compose(TINY), tmp_path)
    tracker.resumed_at(10)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2]) + 'not json\n{"step": 25'  # the rest stays
    assert (tmp_path / SUPERSEDED_METRICS).read_text() == "".join(lines[2:])
    assert "2 metrics rows past step 10 moved to metrics.superseded.jsonl" in (tmp_path / "train.log").read_text()
    tracker.resumed_at(10)  # resumed again from the same checkpoint: nothing more to move
    assert (tmp_path / SUPERSEDED_METRICS).read_text() == "".join(lines[2:])
    tracker.log_metrics({"step": 15, "loss": 0.5})
    with pytest.warns(UserWarning, match="is not a JSON object row"):  # the bad lines, kept as they were
        assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [5, 10, 15]


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=20", "trainer.ckpt_every=10", "trainer.keep_last=3"])
    train(cfg, tmp_path)
    newest = [as_older_pt(p) for p in RunDir(tmp_path).checkpoints()][-1]  # an older run's files
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a kill during a non-atomic write
    assert newest_checkpoint_step(tmp_path) == 10  # what a sweep's plan and status say a relaunch resumes from
    messages = []
    state = RunDir(tmp_path).load_newest_checkpoint(say=messages.append)
    assert state["step"] == 10
    assert any(str(newest) in m and "unreadable" in m for m in messages)
    assert newest.exists(), "a corrupt checkpoint is reported, never deleted"

    truncated = newest.read_bytes()
    partial = newest.parent / f".{newest.name}.k1ll3d.tmp"  # what a kill during an older run's save leaves
    partial.write_bytes(b"half a checkpoint")
    partial_dir = newest.parent / ".step_0000030.tmp"  # and during a save now: a temp dir without .metadata
    partial_dir.mkdir()
    (partial_dir / "__0_0.distcp").write_bytes(b"half a part")
    cfg = compose([*TINY, "trainer.max_steps=20", "trainer.ckpt_every=10", "trainer.keep_last=3"])
    result = train(cfg, tmp_path)
    assert result["step"] == 20
    assert RunDir(tmp_path).load_newest_checkpoint()["step"] == 20
    (kept,) = newest.parent.glob(f"{newest.name}.unreadable-*")  # retraining step 20 did not overwrite it
    assert kept.read_bytes() == truncated
    assert not partial.exists() and not partial_dir.exists()


def test_an_unreadable_checkpoint_is_set_aside_and_keep_last_counts_only_readable_ones(tmp_path, capsys):
    train(compose([*TINY, "trainer.max_steps=20", "trainer.ckpt_every=10", "trainer.keep_last=2"]), tmp_path)
    first, newest = [as_older_pt(p) for p in RunDir(tmp_path).checkpoints()]  # an older run's files
    newest.write_bytes(newest.read_bytes()[:100])
    truncated = newest.read_bytes()
    # Resumed from step 10, the next save is step 30: pruning to two must keep 10, not the unreadable 20.
    train(compose([*TINY, "trainer.max_steps=30", "trainer.ckpt_every=1000", "trainer.keep_last=2"]), tmp_path)
    assert [checkpoint_step(p) for p in RunDir(tmp_path).checkpoints()] == [10, 30]
    assert RunDir(tmp_path).load_newest_checkpoint()["step"] == 30 and torch.load(first, weights_only=False)["step"] == 10
    (kept,) = newest.parent.glob(f"{newest.name}.unreadable-*")
    assert kept.read_bytes() == truncated
    capsys.readouterr()
    train(compose([*TINY, "trainer.max_steps=20", "trainer.ckpt_every=1000", "trainer.keep_last=2"]), tmp_path)
    assert "already at step 30, trainer.max_steps=20: nothing to train" in capsys.readouterr().out
    assert [checkpoint_step(p) for p in RunDir(tmp_path).checkpoints()] == [10, 30]
    for path in RunDir(tmp_path).checkpoints():  # every checkpoint unreadable: said, and training starts over
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(b"")
    messages = []
    assert RunDir(tmp_path).load_newest_checkpoint(say=messages.append) is None
    assert messages[-1] == f"no readable checkpoint in {tmp_path / 'checkpoints'}: starting from step 0"


def test_a_run_saved_before_a_key_existed_resumes_and_evaluates(tmp_path):
    """Keys added to the configs later (KEYS_ADDED_LATER) read as the value the older run trained with."""
    from omegaconf import OmegaConf

    from harness.config import KEYS_ADDED_LATER, to_yaml
    from harness.evaluate.run import checkpoint_config

    cfg = compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2"])
    train(cfg, tmp_path)
    older = OmegaConf.load(tmp_path / "config.yaml")
    for key in KEYS_ADDED_LATER:
        parent, leaf = key.rsplit(".", 1)
        del OmegaConf.select(older, parent)[leaf]
    (tmp_path / "config.yaml").write_text(to_yaml(older))
    assert RunDir(tmp_path).difference(cfg) == ""
    bf16 = compose([*TINY, "trainer.max_steps=2", "trainer.residual_precision=bf16"])
    assert RunDir(tmp_path).difference(bf16) == "trainer.residual_precision: 'fp32' -> 'bf16'"
    (tmp_path / "config.yaml").unlink()  # the checkpoint's own config, written without the keys
    path = as_older_pt(RunDir(tmp_path).checkpoints()[-1], config=to_yaml(older))
    assert RunDir(tmp_path).difference(cfg) == ""
    merged, _ = checkpoint_config(path)
    assert merged.trainer.residual_precision == "fp32" and merged.trainer.compile_tuning is False


def test_a_checkpoint_of_another_model_is_refused_before_anything_is_written(tmp_path):
    train(compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2"]), tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")  # no config.yaml beside them
    with pytest.raises(HarnessError, match=r"different config \(model.hidden_size: 32 -> 64\)"):
        train(compose([*TINY, "trainer.max_steps=4", "model.hidden_size=64"]), tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoints"]
    # A checkpoint without its config (another tool's, say) is caught when its weights do not load.
    as_older_pt(tmp_path / "b" / "checkpoints" / "step_0000002", config=None)
    with pytest.raises(HarnessError, match=r"step_0000002.pt does not fit this run's model \(.* in the file, .* in the model\)"):
        train(compose([*TINY, "trainer.max_steps=4", "model.hidden_size=64"]), tmp_path / "b")


def test_a_refused_run_dir_keeps_its_hydra_records(tmp_path):
    run = tmp_path / "run"
    assert run_harness(["train", *TINY, "trainer.max_steps=2", "trainer.ckpt_every=2", f"hydra.run.dir={run}"]).returncode == 0
    records = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    result = run_harness(["train", *TINY, "trainer.max_steps=2", "model.depth=3", f"hydra.run.dir={run}"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds a run with a different config (model.depth: 2 -> 3)" in result.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == records  # Hydra never started


def test_two_gloo_ranks_match_one_process(tmp_path):
    steps = 10
    single = tmp_path / "single"
    assert run_harness(train_args(single, steps)).returncode == 0
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "harness.cli", *train_args(ddp, steps)],
        cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(single), final_weights(ddp)
    assert a["step"] == b["step"] == steps
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    # Throughput is per device: the global images/s over the world size.
    gflops = read_checkpoint(RunDir(ddp).checkpoints()[-1], keys={"meta"})["meta"]["gflops"]
    logged = {}
    for run_dir, world in ((single, 1), (ddp, 2)):
        first, last = logged[world] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert (first["step"], last["step"]) == (5, 10)
        assert last["tflops_per_device"] == pytest.approx(achieved_tflops(gflops, last["images_per_s"] / world))
        # The last window is 5 steps of the global batch (80 images over all ranks), timed between the rows.
        assert 0.75 * 80 < last["images_per_s"] * (last["time"] - first["time"]) < 1.4 * 80
    # The logged losses are the global batch's, not rank 0's half of it.
    for one, two in zip(logged[1], logged[2]):
        assert [two[k] for k in LOGGED_LOSSES] == pytest.approx([one[k] for k in LOGGED_LOSSES], rel=1e-4)


def test_step_draws_timesteps_noise_and_label_dropout_rate():
    cpu = torch.device("cpu")
    t, noise, drop = step_draws(step_generator(0, 1, cpu), 20_000, slice(None), (1, 2, 2), 1000, 0.1, cpu)
    assert t.min() == 0 and t.max() == 999 and 450 < t.float().mean() < 550
    assert 0.09 < drop.float().mean() < 0.11
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    again = step_draws(step_generator(0, 1, cpu), 20_000, slice(100, 200), (1, 2, 2), 1000, 0.1, cpu)
    assert torch.equal(again[0], t[100:200]) and torch.equal(again[2], drop[100:200])  # a rank's slice of the same draw


def test_the_lr_warms_up_then_holds_or_falls_along_a_half_cosine_to_zero():
    from harness.train.step import learning_rate

    def schedule(kind):
        tc = compose([*TINY, "trainer.max_steps=100", "trainer.lr=1e-3", "trainer.warmup_steps=10",
                      f"trainer.lr_schedule={kind}"]).trainer
        return [learning_rate(tc, step) for step in range(100)]

    constant, cosine = schedule("constant"), schedule("cosine")
    assert constant[:10] == cosine[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])  # linear warm-up
    assert constant[10:] == [1e-3] * 90
    assert cosine[10] == 1e-3 and cosine[55] == pytest.approx(5e-4) and 0 < cosine[99] < 1e-6
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:]))
    no_warmup = compose([*TINY, "trainer.lr=1e-3"]).trainer  # the paper's: constant from the first step
    assert learning_rate(no_warmup, 0) == learning_rate(no_warmup, 10**6) == 1e-3


def test_checkpoints_keep_the_last_n_and_every_milestone(tmp_path):
    train(compose([*TINY, "trainer.max_steps=10", "trainer.ckpt_every=2", "trainer.keep_last=2",
                   "trainer.ckpt_milestones=[3,4]"]), tmp_path)
    assert [checkpoint_step(p) for p in RunDir(tmp_path).checkpoints()] == [3, 4, 8, 10]


def test_digits_training_lowers_the_loss(tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=150", "trainer.ckpt_every=150", "trainer.log_every=25",
                   "trainer.lr=2e-3"])
    train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], rows
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert state["state"] == "done" and state["step"] == 150


def test_wandb_offline_run_logs_metrics(tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=10", "trainer.ckpt_every=10", "logger=wandb"])
    env_before = os.environ.get("WANDB_MODE")
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run directory is written under the run dir"
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())
    assert os.environ.get("WANDB_MODE") == env_before


def test_run_dir_with_a_different_config_is_refused(tmp_path):
    train(compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2"]), tmp_path)
    with pytest.raises(HarnessError, match=r"different config \(model.depth: 2 -> 3\).*on_config_change"):
        train(compose([*TINY, "model.depth=3", "trainer.max_steps=2"]), tmp_path)
    # Extending the run is the same run; so is one whose config predates a speed switch (compile_tuning).
    config = tmp_path / "config.yaml"
    assert "compile_tuning: false" in config.read_text()
    config.write_text(config.read_text().replace("  compile_tuning: false\n", ""))
    assert train(compose([*TINY, "trainer.max_steps=4", "trainer.ckpt_every=2"]), tmp_path)["step"] == 4
    # Overwrite moves the old run aside instead of deleting it; Hydra's records, logs and earlier overwrites stay.
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("log")
    (tmp_path / "overwritten-earlier").mkdir()
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}
    train(compose([*TINY, "model.depth=3", "trainer.max_steps=2", "on_config_change=overwrite"]), tmp_path)
    assert {signum: signal.getsignal(signum) for signum in signals} == signals  # the handlers are put back
    (aside,) = [p for p in tmp_path.glob("overwritten-*") if p.name != "overwritten-earlier"]
    assert list((aside / "checkpoints").glob("step_*"))
    assert {"config.yaml", "run_state.json", "metrics.jsonl"} <= {p.name for p in aside.iterdir()}
    assert not {".hydra", "train.log", "overwritten-earlier"} & {p.name for p in aside.iterdir()}
    assert all((tmp_path / name).exists() for name in (".hydra", "train.log", "overwritten-earlier"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    train(compose([*TINY, "trainer.max_steps=4", "trainer.ckpt_every=2"]), tmp_path)
    before = checkpoint_bytes(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step [5-8] "):
        train(compose([*TINY, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.lr=1e30",
                       "on_config_change=resume"]), tmp_path)
    # Nothing from the diverged run reaches the disk: no new checkpoint, the old ones byte for byte.
    assert checkpoint_bytes(tmp_path) == before
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert state["state"] == "failed" and "non-finite loss at step" in state["error"]


def _nan_on_one_rank_worker(rank, port, out_dir):
    import copy

    from harness.config import latent_geometry
    from harness.diffusion import create_diffusion
    from harness.model import build_model
    from harness.train.runtime import Dist, autocast_forward, fast_path_settings
    from harness.train.step import NonFiniteWatch, build_optimizer, train_step

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = compose(TINY)
        torch.manual_seed(0)
        model = build_model(cfg.model, latent_geometry(cfg))
        ema = copy.deepcopy(model).requires_grad_(False)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        cpu = torch.device("cpu")
        forward = autocast_forward(ddp, model, fast_path_settings(cfg.trainer, cpu), cpu)
        opt = build_optimizer(model, cfg.trainer, cpu)
        watch = NonFiniteWatch(cpu)
        diffusion = create_diffusion(cfg.diffusion)
        messages = []
        for step in (1, 2):
            x = torch.randn(8, 1, 8, 8)
            if rank == 1 and step == 2:
                x[0, 0, 0, 0] = float("nan")  # one bad sample on one rank, at step 2
            losses = train_step(forward, diffusion, model, ema, opt, x, torch.zeros(8, dtype=torch.long),
                                torch.full((8,), 10), torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.bool),
                                cfg.trainer)
            watch.note(losses["loss"], step)
            try:
                watch.check(Dist(rank, 2, rank, cpu))
                messages.append(None)
            except FloatingPointError as err:
                messages.append(str(err))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"messages": messages, "own_loss_finite": bool(torch.isfinite(losses["loss"]).all())}))
    finally:
        torch.distributed.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_nan_on_one_rank_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["own_loss_finite"] and not results[1]["own_loss_finite"]
    for result in results:  # rank 0 stops on rank 1's word, naming the step
        assert result["messages"][0] is None
        assert result["messages"][1].startswith("non-finite loss at step 2 ")


def test_a_training_step_reads_nothing_back_to_the_host(monkeypatch):
    """A host read (item, bool, int, ...) in the step would leave a GPU idle while the CPU queues the next one."""
    import copy

    from harness.config import latent_geometry
    from harness.diffusion import create_diffusion
    from harness.model import build_model
    from harness.train.runtime import autocast_forward, fast_path_settings
    from harness.train.step import NonFiniteWatch, build_optimizer, train_step

    cfg = compose([*TINY, "trainer.fused_adamw=true", "trainer.grad_clip=1.0"])  # AdamW as on CUDA, clipping on
    cpu = torch.device("cpu")
    model = build_model(cfg.model, latent_geometry(cfg))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_optimizer(model, cfg.trainer, cpu)
    forward = autocast_forward(model, model, fast_path_settings(cfg.trainer, cpu), cpu)
    diffusion = create_diffusion(cfg.diffusion)
    watch = NonFiniteWatch(cpu)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def spy(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in (1, 2):
        losses = train_step(forward, diffusion, model, ema, opt, torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long),
                            torch.full((8,), 10), torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.bool), cfg.trainer)
        watch.note(losses["loss"], step)
    monkeypatch.undo()
    assert reads == []


def test_non_finite_watch_keeps_the_first_bad_step():
    from harness.train.runtime import Dist
    from harness.train.step import NonFiniteWatch

    watch = NonFiniteWatch(torch.device("cpu"))
    local = Dist(0, 1, 0, torch.device("cpu"))
    watch.note(torch.tensor([1.0, 2.0]), 1)
    watch.check(local)
    for step, loss in ((2, float("inf")), (3, 0.5), (4, float("nan"))):
        watch.note(torch.tensor([loss]), step)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 2 "):
        watch.check(local)


@pytest.mark.parametrize("override, message", [
    ("trainer.global_batch_size=0", "trainer.global_batch_size must be a positive integer"),
    ("trainer.max_steps=-1", "trainer.max_steps must be a positive integer"),
    ("model.conditioning=film", "conditioning"),
    ("model.patch_size=3", "patch"),
    ("model.num_heads=5", "num_heads"),
    ("trainer.precision=fp16", "trainer.precision='fp16' is not one of auto, fp32, bf16"),
    ("trainer.attention=xformers", "trainer.attention='xformers' is not one of auto, flash, efficient, cudnn, math"),
    ("trainer.attention=efficient", "trainer.attention=efficient needs CUDA; on CPU use auto, flash or math"),
    ("trainer.compile_mode=fast", "trainer.compile_mode='fast' is not one of auto, default, reduce-overhead"),
    ("trainer.compile_tuning=auto", "trainer.compile_tuning='auto' is not one of True, False"),
    ("trainer.ddp_bucket_mb=0", "trainer.ddp_bucket_mb must be a number > 0, got 0"),
    ("eval.every=100 eval.precision=fp16", "eval.precision='fp16' is not one of auto, fp32, bf16"),
    ("eval.every=100 eval.max_forward_batch=0", "eval.max_forward_batch must be auto or a positive integer"),
    ("trainer.lr=abc", "trainer.lr must be a number > 0, got 'abc'"),
    ("trainer.log_every=true", "trainer.log_every must be a positive integer, got True"),
    ("trainr.max_steps=2", "trainr.max_steps is not a config key (check its spelling; a new key is added as +trainr"),
    ("model=DiT-X/2", "model=DiT-X/2 is not one of DiT-5B/2, DiT-5B/4,"),
    ("experiment=imagenet_256", "experiment=imagenet_256 is not one of imagenet256, imagenet512"),
    ("autoencoder=sd-vae-ft-ema data.image_size=64", "data.channels=1: the sd-vae-ft-ema VAE encodes RGB images"),
    ("data=latents data.root=/nonexistent", "data.root='/nonexistent' is not a directory"),
])
def test_bad_train_config_is_one_line_exit_2(tmp_path, override, message):
    result = run_harness(["train", *TINY, *override.split(), f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    # Found before Hydra starts the run, except a kernel that needs the device the job lands on.
    assert not (tmp_path / "run").exists() or "needs CUDA" in message


def test_an_unknown_train_option_is_one_line(tmp_path):
    result = run_harness(["train", "--bogus", *TINY, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("harness: error: harness train: unknown option --bogus; Hydra's options are -m,")
    assert not (tmp_path / "run").exists()


def test_a_run_dir_made_of_hydra_values_still_trains(tmp_path):
    # ${hydra:...} resolves only inside the running app: the pre-Hydra run-dir check leaves it to train().
    run_dir = str(tmp_path) + "/${hydra:job.name}"
    result = run_harness(["train", *TINY, "trainer.max_steps=2", "trainer.ckpt_every=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("*/checkpoints/step_0000002/.metadata"))


def test_a_cache_dir_that_is_a_file_is_refused_before_the_run_starts(tmp_path):
    (tmp_path / "afile").write_text("")
    result = run_harness(["train", *TINY, "eval.every=2", f"hydra.run.dir={tmp_path / 'run'}"],
                         HARNESS_CACHE_DIR=str(tmp_path / "afile"))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"harness: error: eval.cache_dir (null: $HARNESS_CACHE_DIR/fid)={tmp_path}/afile/fid: "
        f"{tmp_path}/afile is a file, not a directory")
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    result = run_harness(["train", *TINY, f"hydra.run.dir={taken}"])
    assert result.returncode == 2 and result.stderr.strip() == (
        f"harness: error: hydra.run.dir={taken} is a file; give a directory path")
    assert taken.read_text() == "not a directory"


@pytest.mark.parametrize("override, message", [
    ("trainer.tf32=1", "trainer.tf32=1 is not one of True, False"),
    ("eval.every=abc", "eval.every must be an integer >= 0 or null, got 'abc'"),
    ("diffusion.num_timesteps=[1]", "diffusion.num_timesteps must be a positive integer, got [1]"),
    ("eval.num_samples=2.9", "eval.num_samples must be an integer >= 2 for FID, got 2.9"),
    ("trainer.gpus=-1", "trainer.gpus must be a positive integer, got -1"),
    ("trainer.device=tpu", "trainer.device='tpu' is not one of auto, cpu, cuda"),
    ("trainer.betas=[1,2]", "trainer.betas must be two numbers in [0, 1), got [1, 2]"),
    ("data.image_size=abc", "data.image_size must be a positive integer, got 'abc'"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay must be a number in [0, 1), got 1.0"),
    ("eval.cfg_scale=0.5", "eval.cfg_scale must be a number >= 1 (1 = no guidance), got 0.5"),
    ("trainer.ckpt_milestones=[0]", "trainer.ckpt_milestones must be a list of positive integers, got [0]"),
    ("eval.ddim_eta=-1", "eval.ddim_eta must be a number >= 0, got -1"),
    ("eval.fid_resamples=-1", "eval.fid_resamples must be auto or an integer >= 0 (0: no interval), got -1"),
    ("eval.sampler=euler50", "eval.sampler='euler50': unknown sampler 'euler'; "
                             "allowed: ddpm<N> | ddim<N> | <N> with 1 <= N <= 1000 (or comma-separated section counts)"),
    ("trainer.lr=true", "trainer.lr must be a number > 0, got True"),
    ("trainer.lr_schedule=linear", "trainer.lr_schedule='linear' is not one of constant, cosine"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps must be an integer >= 0, got -1"),
    ("eval.every=-5", "eval.every must be an integer >= 0 or null, got -5"),
    ("eval.fid_every=-1", "eval.fid_every must be an integer >= 0 or null, got -1"),
    ("eval.fid_every=3000", "eval.fid_every=3000 must be a multiple of eval.every=2000 (FID is sampled at "
                            "evaluations), 0 (only at the last step) or null (at every evaluation)"),
])
def test_a_value_of_the_wrong_type_or_range_names_its_key(override, message):
    with pytest.raises(HarnessError) as err:
        validate(compose([override]))
    assert str(err.value) == message


def test_device_settings_resolve_to_this_process_gpu_and_never_fall_back_silently(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "trainer.device") == resolve_device(None, "k") == torch.device("cpu")
    with pytest.raises(HarnessError, match=r"^trainer.device=cuda but no CUDA device is visible$"):
        resolve_device("cuda", "trainer.device")
    with pytest.raises(HarnessError, match=r"^extract.device='gpu' is not one of auto, cpu, cuda, cuda:N$"):
        resolve_device("gpu", "extract.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto", "k") == resolve_device("cuda", "k") == torch.device("cuda", 1)
    assert resolve_device("cuda:0", "k") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cpu"), "k") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "3")  # a SLURM task without torchrun: its node-local id, modulo the GPUs
    assert resolve_device("auto", "k") == torch.device("cuda", 1)


def test_batch_not_divisible_by_world_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
         "-m", "harness.cli", *train_args(tmp_path, 2, "trainer.global_batch_size=15")],
        cwd=REPO, env=harness_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "trainer.global_batch_size=15 is not divisible by the world size 2" in proc.stderr


def test_checkpoint_listing_takes_only_the_harness_names(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("step_0000010.pt", "step_0000002.pt", "step_final.pt", "step_0000030.pt.unreadable-20260101"):
        torch.save({}, tmp_path / "checkpoints" / name)
    for name in ("step_0000020", ".step_0000040.tmp", "step_0000050.unreadable-20260101"):  # checkpoint directories
        (tmp_path / "checkpoints" / name).mkdir()
    assert [checkpoint_step(p) for p in RunDir(tmp_path).checkpoints()] == [2, 10, 20]
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000020")  # an empty directory is no checkpoint to resume
    assert newest_checkpoint_step(tmp_path) == 10 and newest_checkpoint_step(tmp_path / "none") is None


def test_resume_takes_optimizer_settings_from_the_config_and_restores_the_rngs(tmp_path):
    from harness.data import BatchStream, build_dataset
    from harness.train.checkpoint import Checkpointer
    from harness.train.runtime import Dist
    from harness.train.step import build_training

    cfg = compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2"])
    train(cfg, tmp_path)
    saved = read_checkpoint(RunDir(tmp_path).checkpoints()[-1])
    changed = compose([*TINY, "trainer.lr=3e-3", "trainer.weight_decay=0.5", "trainer.betas=[0.5,0.6]"])
    model, ema, opt, _ = build_training(changed, torch.device("cpu"))
    stream = BatchStream(build_dataset(changed.data, "train"), 8)
    torch.manual_seed(123)
    checkpointer = Checkpointer(RunDir(tmp_path), changed, Dist(0, 1, 0, torch.device("cpu")), meta={})
    assert checkpointer.resume(model, ema, opt, stream, say=lambda text: None) == 2
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-3, 0.5, (0.5, 0.6))
    assert torch.equal(torch.get_rng_state(), saved["rng"]["rank0"]["torch"])
    assert stream.state_dict() == saved["data_state"]


def test_run_state_counts_slurm_requeues(tmp_path, monkeypatch):

    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    RunDir(tmp_path).write_state("running", 1, 2)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    RunDir(tmp_path).write_state("preempted", 2, 2)  # a later write without the variable keeps the count
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert (state["state"], state["requeues"], state["slurm_job_id"]) == ("preempted", 3, "77")


SIGNAL_SCRIPT = """
import os, signal, sys
from harness.train.preemption import PreemptionFlag
signal.signal(signal.SIGUSR2, lambda *a: print("requeue", flush=True))  # as submitit's handler would
flag = PreemptionFlag()
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
print("raised", flag.raised, flag.requeues, flush=True)
if sys.argv[2] == "again":
    os.kill(os.getpid(), signal.SIGTERM)
    print("still here", flush=True)
flag.requeue_or_exit(True if sys.argv[2] == "peer_usr2" else None)  # the job's decision: a peer rank got SIGUSR2
"""


@pytest.mark.parametrize("first, then, status, lines", [
    ("SIGUSR2", "exit", 0, ["raised True True", "requeue"]),           # preempted: submitit requeues
    ("SIGTERM", "exit", 143, ["raised True False"]),                    # stopped: no requeue
    ("SIGTERM", "again", -signal.SIGTERM, ["raised True False"]),       # a second SIGTERM stops at once
    ("SIGTERM", "peer_usr2", 0, ["raised True False", "requeue"]),     # another rank got SIGUSR2: requeue too
])
def test_preemption_flag_requeues_on_sigusr2_and_stops_on_sigterm(first, then, status, lines):
    done = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, first, then], cwd=REPO, env=harness_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout.splitlines() == lines


def test_a_logged_loss_is_the_mean_of_its_window(tmp_path):
    rows = {}
    for every in (1, 5):
        train(compose([*TINY, "trainer.max_steps=10", "trainer.ckpt_every=10", f"trainer.log_every={every}"]),
              tmp_path / str(every))
        rows[every] = [json.loads(line) for line in (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mse", "vb"):
        assert rows[5][1][key] == pytest.approx(np.mean([r[key] for r in rows[1][5:10]]), rel=1e-5)


def test_harness_train_flags_with_values_and_the_long_multirun_flag(tmp_path, monkeypatch):
    import harness.train.app as train_module
    from harness.train.app import hydra_train

    started = []
    monkeypatch.setattr(train_module, "_hydra_main", lambda: started.append(list(sys.argv)))
    assert hydra_train(["--config-name=train", *TINY, f"hydra.run.dir={tmp_path}"]) == 0 and len(started) == 1
    with pytest.raises(HarnessError) as err:  # every point checked before Hydra starts
        hydra_train(["--multirun", *TINY, "model=mini-S/8,nope"])
    assert "model=nope is not one of" in str(err.value) and len(started) == 1


def test_tracker_bar_only_on_a_terminal_rows_only_when_enabled_and_mirrored_to_wandb(tmp_path, monkeypatch):
    import io as std_io

    from harness.tracking import Tracker

    class Terminal(std_io.StringIO):
        def isatty(self):
            return True

    cfg = compose(TINY)
    for stream, bar in ((std_io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        tracker = Tracker(cfg, tmp_path / "bar")
        tracker.progress(1, 10)
        assert (tracker.bar is not None) == bar
        tracker.finish()
    monkeypatch.undo()
    Tracker(cfg, tmp_path / "off", enabled=False).log_metrics({"step": 1, "loss": 1.0})  # a rank other than 0
    assert not (tmp_path / "off" / "metrics.jsonl").exists()

    class FakeRun:
        logged = []

        def log(self, row, step):
            self.logged.append((row, step))

    tracker = Tracker(cfg, tmp_path / "on")
    tracker.wandb_run = FakeRun()
    tracker.log_metrics({"step": 5, "loss": 1.0})
    tracker.log_result({"step": 5, "fid": 12.5, "fid_name": "fid_digits"})
    assert FakeRun.logged == [({"train/loss": 1.0}, 5), ({"eval/fid": 12.5}, 5)]
    assert json.loads((tmp_path / "on" / "metrics.jsonl").read_text()) == {"step": 5, "loss": 1.0}


def test_a_refused_resume_leaves_the_run_dir_as_it_was(tmp_path):
    train(compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2"]), tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(HarnessError, match=r"step_0000002 does not fit this run's model"):
        train(compose([*TINY, "trainer.max_steps=4", "model.hidden_size=64", "on_config_change=resume"]), tmp_path)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after.keys() - {Path("train.log")} == before.keys() - {Path("train.log")}
    assert {k: v for k, v in after.items() if k.name != "train.log"} == {k: v for k, v in before.items()
                                                                        if k.name != "train.log"}


def test_the_first_step_prints_a_line_without_a_metrics_row(tmp_path, capsys):
    train(compose([*TINY, "trainer.max_steps=6", "trainer.ckpt_every=6", "trainer.log_every=5"]), tmp_path)
    printed = [line.split(" loss")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 1/6", "step 5/6", "step 6/6"]
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [5, 6]


def test_time_spent_paused_leaves_the_throughput_window(monkeypatch):
    from harness.train import loop

    clock = iter([0.0, 2.0, 102.0, 104.0])  # window opens; sampling 2 s -> 102 s; rate read at 104 s
    monkeypatch.setattr(loop.time, "time", lambda: next(clock))
    window = loop.ThroughputWindow()
    with window.paused():
        pass
    window.images = 40
    assert window.images_per_s() == 10.0  # 40 images over the 4 s of training, not over 104 s


def test_sigterm_while_sampling_says_it_stops_after_the_batch():
    script = ("import os, signal\nfrom harness.train.preemption import PreemptionFlag\n"
              "flag = PreemptionFlag()\nflag.sampling = True\nos.kill(os.getpid(), signal.SIGTERM)\nprint(flag.raised)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=harness_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "True"
    assert done.stderr == "SIGTERM: stopping after this sampling batch with a checkpoint (again to stop now)\n"


def test_checkpoints_and_metrics_rows_hold_the_records_run_dir_declares(tmp_path):
    from harness.run_dir import CHECKPOINT_KEYS, METRICS_COLUMNS

    train(compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.log_every=1"]), tmp_path)
    (path,) = RunDir(tmp_path).checkpoints()
    assert set(read_checkpoint(path)) == set(CHECKPOINT_KEYS)
    assert [set(row) for row in RunDir(tmp_path).read_metrics()] == [set(METRICS_COLUMNS)] * 2
