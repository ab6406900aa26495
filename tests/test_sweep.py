"""Sweeps without a cluster: grid expansion, per-run resources, the dry run, bad input and status.

The launches against a real SLURM are in test_slurm.py.
"""

from __future__ import annotations

import csv
import time
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fixtures.sweep import expected_runs, make_fixture_sweep
from harness.sweep import launch, plan, schedulers, status
from harness.config import config_groups
from harness.errors import HarnessError
from harness.io import append_jsonl, read_json
from harness.run_dir import RunDir

# Two tiny CPU runs on the demo sweep (patch 8 and 4 on 16x16 digits).
TINY_GRID = [
    "model=custom", "model.patch_size=8,4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
    "trainer.global_batch_size=16", "trainer.max_steps=20", "eval.every=0", "eval.num_samples=20",
    "trainer.lr=1e-3", "trainer.lr_schedule=constant",  # the tests' own, not the demo's recipe
]


def grid(name: str, overrides: list[str]) -> list[plan.RunSpec]:
    with plan.hydra_context():
        _, specs = plan.expand_grid(name, overrides)
    return specs


@pytest.mark.parametrize("package", ["hydra-core", "hydra-submitit-launcher", "submitit"])
def test_the_scheduler_adapters_run_against_the_pinned_hydra_and_submitit(package):
    import importlib.metadata
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = dict(d.split("==", 1) for d in dependencies if "==" in d)
    installed = importlib.metadata.version(package)
    assert installed == pins.get(package), (
        f"{package} {installed} is installed, pyproject.toml pins {pins.get(package)}: harness/sweep/schedulers.py and "
        "hydra_plugins/harness_launcher/launchers.py use its internals, so re-check those adapters against the new "
        "version whenever its pin moves (and keep the pin exact)")


def test_every_sweep_expands_to_its_grid():
    assert {"paper_grid", "conditioning_ablation", "demo", "demo_long"} <= set(plan.available_sweeps())
    with plan.hydra_context():
        # The paper grid's 12 points are checked by the dry run below; here its recipe, on one point.
        paper = plan.expand_grid("paper_grid", ["model=DiT-B/4"])[1]
        ablation = plan.expand_grid("conditioning_ablation", [])[1]
        demo = plan.expand_grid("demo", [])[1]
        demo_long = plan.expand_grid("demo_long", [])[1]
    cfg = paper[0].cfg
    assert (cfg.data.name, cfg.autoencoder.name, cfg.data.image_size) == ("latents", "sd-vae-ft-ema", 256)
    assert (cfg.trainer.global_batch_size, cfg.trainer.max_steps) == (256, 400_000)
    assert (cfg.eval.every, cfg.eval.num_samples, cfg.eval.sampler, cfg.eval.cfg_scale) == (50_000, 50_000, "ddpm250", 1.0)
    assert paper[0].run_dir.parent.name == "paper_grid" and paper[0].run_name == "latents-DiT-B-4-adaln_zero"
    assert sorted(s.cfg.model.conditioning for s in ablation) == ["adaln", "adaln_zero", "cross_attention", "in_context"]
    assert {s.cfg.model.name for s in ablation} == {"DiT-XL/2"} and len({s.run_dir for s in ablation}) == 4
    assert sorted(s.cfg.model.name for s in demo) == sorted(f"mini-{m}/{p}" for m in ("S", "B") for p in (8, 4, 2))
    assert {s.cfg.data.name for s in demo} == {"digits"} and {s.cfg.trainer.device for s in demo} == {"cpu"}
    assert [s.cfg.model.name for s in demo_long] == [s.cfg.model.name for s in demo]
    demo_images, long_images = (s[0].cfg.trainer.max_steps * s[0].cfg.trainer.global_batch_size for s in (demo, demo_long))
    assert long_images > demo_images
    assert schedulers.executor_kind(paper[0].cfg) == "slurm" and schedulers.executor_kind(demo[0].cfg) == "local"


def test_paper_grid_requests_gpus_and_time_per_model_size():
    two = "model=DiT-S/8,DiT-XL/2"
    specs = {s.cfg.model.name: s for s in grid("paper_grid", [two])}
    small, large = (schedulers.slurm_parameters(specs[m].cfg) for m in ("DiT-S/8", "DiT-XL/2"))
    assert (small["gpus_per_node"], small["ntasks_per_node"], small["nodes"]) == (1, 1, 1)
    assert (large["gpus_per_node"], large["ntasks_per_node"], large["nodes"]) == (8, 8, 1)
    assert large["time"] > small["time"] and specs["DiT-XL/2"].cfg.trainer.gpus == 8
    # Overridable per size, and across nodes: 16 GPUs are two nodes of 8 tasks.
    specs = {s.cfg.model.name: s for s in grid("paper_grid", [two, "hydra.launcher.by_size.XL.gpus=16",
                                                              "hydra.launcher.partition=gpu", "hydra.launcher.qos=high",
                                                              "+hydra.launcher.additional_parameters.mail-type=END"])}
    params = schedulers.slurm_parameters(specs["DiT-XL/2"].cfg)
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["nodes"]) == (8, 8, 2)
    assert (params["partition"], params["qos"], params["additional_parameters"]) == ("gpu", "high", {"mail-type": "END"})
    assert specs["DiT-XL/2"].cfg.trainer.gpus == 16 and specs["DiT-S/8"].cfg.trainer.gpus == 1
    # CPU runs ask for no GPU and one task.
    demo = schedulers.slurm_parameters(grid("demo", ["launcher=slurm"])[0].cfg)
    assert "gpus_per_node" not in demo and demo["ntasks_per_node"] == 1 and demo["cpus_per_task"] == 1


def test_dry_run_of_the_paper_grid_prints_12_runs_with_the_papers_gflops(tmp_path):
    out_dir = tmp_path / "paper"
    text = plan.format_plan(launch.plan_sweep("paper_grid", [f"hydra.sweep.dir={out_dir}"]))
    with open(REPO / "harness" / "reference" / "paper_table4.csv") as f:
        paper = {row["model"]: float(row["gflops"]) for row in csv.DictReader(f)}
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("latents-DiT-")}
    assert len(lines) == 12
    for model, gflops in paper.items():
        cells = lines[f"latents-{model.replace('/', '-')}-adaln_zero"]
        assert cells[1] == model
        assert abs(float(cells[5]) - gflops) / gflops < 0.005, (model, cells[5], gflops)
        assert float(cells[6]) == gflops                      # the paper's number printed beside ours
    # Says where each run's estimate comes from.
    assert re.search(r"^  training estimated at an assumed \d+% MFU of 989 TFLOP/s: DiT-S/8, DiT-S/4, ", text, re.M)
    assert "#SBATCH --gpus-per-node=1" in text and "submitit.core._submit" in text
    assert not out_dir.exists()                               # nothing written, nothing submitted
    # Not the paper's architecture (MLP ratio 2): no paper number beside ours.
    planned = launch.plan_sweep("paper_grid", [f"hydra.sweep.dir={out_dir}", "model.mlp_ratio=2"])
    assert len(planned["rows"]) == 12 and all(row["paper_gflops"] is None for row in planned["rows"])


def test_unknown_sweep_lists_the_sweeps():
    with pytest.raises(HarnessError, match=r"unknown sweep 'nope'.*paper_grid"):
        launch.launch_sweep("nope", [])


def test_invalid_points_are_all_listed_before_anything_is_written(tmp_path):
    out_dir = tmp_path / "bad"
    overrides = [*TINY_GRID, "model.hidden_size=30,32", "model.num_heads=4", "model.patch_size=3,4",
                 f"hydra.sweep.dir={out_dir}"]
    with pytest.raises(HarnessError) as err:
        launch.launch_sweep("demo", overrides)
    lines = str(err.value).splitlines()
    assert "2 problems in a grid of 4 runs; nothing was submitted" in lines[0]
    errors = lines[1:]
    assert len(errors) == 2 and all(line.startswith("  - ") for line in errors)
    # One line per problem, naming every point it stops (both patch-3 points share one line).
    assert errors[0].startswith("  - model.patch_size=3 model.hidden_size=30 | model.patch_size=3 model.hidden_size=32: "
                                "model.patch_size=3 does not divide")
    assert errors[1].startswith("  - model.patch_size=4 model.hidden_size=30: model.hidden_size=30 is not divisible")
    assert not out_dir.exists()
    with pytest.raises(HarnessError) as err:  # a problem of every point is one line
        launch.launch_sweep("demo", [*TINY_GRID, "trainer.max_steps=0", f"hydra.sweep.dir={out_dir}"])
    assert str(err.value) == ("sweep demo: every run: trainer.max_steps must be a positive integer, got 0 "
                              "(nothing was submitted)")  # one problem: one line
    # A point that does not even compose is listed with the others.
    with pytest.raises(HarnessError) as err:
        launch.launch_sweep("demo", ["model=mini-S/4,no-such-model", "model.hidden_size=30", f"hydra.sweep.dir={out_dir}"])
    assert "2 problems in a grid of 2 runs" in str(err.value)
    assert "  - model=no-such-model: model=no-such-model is not one of DiT-5B/2," in str(err.value)
    assert "  - model=mini-S/4: model.hidden_size=30 is not divisible" in str(err.value)


def test_a_grid_whose_data_is_missing_is_refused_before_anything_is_submitted(tmp_path):
    out_dir = tmp_path / "nodata"
    overrides = [*TINY_GRID, "data=latents", f"data.root={tmp_path / 'no_cache'}", "eval.every=null",
                 "launcher=local", f"hydra.sweep.dir={out_dir}"]
    with pytest.raises(HarnessError) as err:
        launch.launch_sweep("demo", overrides)
    assert str(err.value) == (f"sweep demo: every run: data.root='{tmp_path / 'no_cache'}' is not a directory (a cache "
                              "written by harness extract-latents) (nothing was submitted)")
    assert not out_dir.exists()
    # A dry run plans it all the same (the data may live on the cluster) and says a launch here would refuse.
    text = plan.format_plan(launch.plan_sweep("demo", overrides))
    assert "not ready to launch here: 1 problem(s)" in text and "is not a directory" in text
    assert not out_dir.exists()


def test_train_multirun_checks_every_point_before_hydra_writes(tmp_path):
    out_dir = tmp_path / "multirun"
    with pytest.raises(HarnessError) as err:
        launch.check_multirun(["model=mini-S/8,no-such-model", "trainer.max_steps=0", f"hydra.sweep.dir={out_dir}"])
    assert str(err.value).splitlines()[1:] == [
        "  - model=mini-S/8: trainer.max_steps must be a positive integer, got 0",
        "  - model=no-such-model: model=no-such-model is not one of " + ", ".join(config_groups("model"))]
    launch.check_multirun(["model=mini-S/8,mini-S/4", f"hydra.sweep.dir={out_dir}"])  # a good grid passes
    assert not out_dir.exists()


def test_multirun_dir_is_named_after_the_sweep_or_multirun():
    from harness.config import compose

    # `harness train -m` without a sweep: sweep_name is null (its default is the config schema's, not train.yaml's).
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.sweep.dir == "sweeps_out/multirun"
    cfg.sweep_name = "demo"
    assert cfg.hydra.sweep.dir == "sweeps_out/demo"


def test_status_names_a_sweep_record_that_is_not_yaml(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    (tmp_path / "sweep.yaml").write_text("name: [unclosed\n")
    with pytest.raises(HarnessError, match=r"sweep.yaml is not readable YAML \(.*\); restore it or move it aside"):
        status.sweep_status(tmp_path)
    (tmp_path / "sweep.yaml").unlink()
    (tmp_path / "run" / "run_state.json").write_text("{not json")
    (row,) = status.sweep_status(tmp_path)
    assert row["error"][0] == f"{tmp_path / 'run' / 'run_state.json'} is not readable JSON: the state shown is a guess"


def test_no_sbatch_on_path_with_the_slurm_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # nothing on PATH
    with pytest.raises(HarnessError, match="launcher=slurm needs the SLURM commands sbatch"):
        launch.launch_sweep("demo", [*TINY_GRID, "launcher=slurm", f"hydra.sweep.dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_a_sweep_dir_of_another_sweep_is_refused_by_a_launch_and_listed_by_a_dry_run(tmp_path):
    (tmp_path / status.SWEEP_RECORD).write_text("name: paper_grid\n")
    with pytest.raises(HarnessError, match=r"holds the sweep 'paper_grid', not 'demo'"):
        launch.launch_sweep("demo", [*TINY_GRID, f"hydra.sweep.dir={tmp_path}"])
    assert os.listdir(tmp_path) == [status.SWEEP_RECORD]
    planned = launch.plan_sweep("demo", [*TINY_GRID, f"hydra.sweep.dir={tmp_path}"])
    assert len(planned["rows"]) == 2 and planned["problems"][-1].startswith(f"{tmp_path} holds the sweep 'paper_grid'")


def test_a_run_whose_config_changed_is_refused(tmp_path):
    from harness.config import to_yaml

    spec = grid("demo", [*TINY_GRID, f"hydra.sweep.dir={tmp_path}"])[0]
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "config.yaml").write_text(to_yaml(plan.task_config(spec.cfg)).replace("lr: 0.001", "lr: 0.002"))
    with pytest.raises(HarnessError, match=r"holds a run of sweep 'demo' with a different config \(.*: trainer.lr: 0.002 -> 0.001\); set"):
        launch.launch_sweep("demo", [*TINY_GRID, f"hydra.sweep.dir={tmp_path}"])
    text = plan.format_plan(launch.plan_sweep("demo", [*TINY_GRID, f"hydra.sweep.dir={tmp_path}"]))
    assert f"{spec.run_name}: trainer.lr: 0.002 -> 0.001" in text and "not ready to launch here: 1 problem(s)" in text


def test_plan_skips_done_and_queued_runs_and_resumes_the_rest(tmp_path):
    specs = grid("demo", [*TINY_GRID, "model.patch_size=8,4,2", "launcher=slurm", f"hydra.sweep.dir={tmp_path}"])
    done, queued, interrupted = specs
    for spec in specs:
        (spec.run_dir / "checkpoints").mkdir(parents=True)
    (done.run_dir / "run_state.json").write_text(json.dumps({"state": "done", "step": 20}))
    torch.save({}, (done.run_dir / "checkpoints" / "step_0000020.pt"))
    (queued.run_dir / "run_state.json").write_text(json.dumps({"state": "preempted", "step": 10, "slurm_job_id": "7"}))
    (interrupted.run_dir / "run_state.json").write_text(json.dumps({"state": "running", "step": 0, "slurm_job_id": "5"}))
    torch.save({}, (interrupted.run_dir / "checkpoints" / "step_0000010.pt"))
    queue = {"7": {"name": "x", "state": "PENDING", "command": ""}}
    decisions = plan.plan_runs(specs, "slurm", queue)
    assert [(d.submit, d.reason) for d in decisions] == [
        (False, "done at step 20"), (False, "job 7 is pending"), (True, "resume from step 10")]
    # A job submitted but never recorded is found by its name and script path.
    (queued.run_dir / "run_state.json").unlink()
    queue = {"9": {"name": schedulers.job_name(queued.cfg), "state": "RUNNING",
                   "command": str(tmp_path / schedulers.SUBMITIT_DIR / "9" / "submission.sh")}}
    assert plan.plan_runs(specs, "slurm", queue)[1].reason == "job 9 is running"
    # A run that failed before its first checkpoint is retried from scratch.
    (interrupted.run_dir / "checkpoints" / "step_0000010.pt").unlink()
    (interrupted.run_dir / "run_state.json").write_text(json.dumps({"state": "failed", "step": 3}))
    assert plan.plan_runs(specs, "slurm", {})[2].reason == "retry (failed before its first checkpoint)"
    # More steps than the finished run had: it continues.
    longer = grid("demo", [*TINY_GRID, "trainer.max_steps=40", f"hydra.sweep.dir={tmp_path}"])
    assert plan.plan_runs(longer[:1], "slurm", {})[0].reason == "resume from step 20"
    # A finished run whose config changed, under on_config_change=overwrite: started over, not skipped.
    from harness.config import to_yaml

    (done.run_dir / "config.yaml").write_text(to_yaml(plan.task_config(done.cfg)).replace("lr: 0.001", "lr: 0.002"))
    overwrite = grid("demo", [*TINY_GRID, "model.patch_size=8", "on_config_change=overwrite", f"hydra.sweep.dir={tmp_path}"])
    (decision,) = plan.plan_runs(overwrite, "slurm", {})
    assert decision.submit and decision.reason == ("start over: on_config_change=overwrite moves the old run aside "
                                                   "(trainer.lr: 0.002 -> 0.001)")


def test_status_of_a_sweep_dir(tmp_path):
    sweep_dir = make_fixture_sweep(tmp_path / "fixture")
    rows = {r["run"]: r for r in status.sweep_status(sweep_dir)}
    expected = expected_runs()
    assert rows.keys() == expected.keys()
    for name, (state, last_step) in expected.items():
        row = rows[name]
        assert row["fid_step"] == last_step and row["fid"] > 0
        assert row["state"] == {"done": "done", "failed": "failed", "running": "interrupted"}[state]
    text = status.format_status(list(rows.values()))
    assert "6 runs: 4 done, 1 failed, 1 interrupted" in text
    assert "RuntimeError: CUDA error: an illegal memory access" in text   # a failed run shows its error
    with pytest.raises(HarnessError, match="holds no runs"):
        status.sweep_status(tmp_path)


@pytest.mark.parametrize("queue_state, saved, requeues, expected", [
    ("PENDING", "preempted", 1, "requeued"), ("PENDING", "running", 0, "pending"), ("RUNNING", "running", 0, "running"),
    (None, "preempted", 1, "interrupted"), (None, "failed", 0, "failed"), (None, "done", 0, "done"),
])
def test_status_of_a_slurm_run_from_its_state_and_the_queue(tmp_path, monkeypatch, queue_state, saved, requeues,
                                                             expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_state.json").write_text(json.dumps({"state": saved, "step": 5, "slurm_job_id": "7",
                                                     "requeues": requeues}))
    (tmp_path / schedulers.SUBMISSIONS).write_text(json.dumps({"run_name": "run", "executor": "slurm", "job_id": "7"}) + "\n")
    queue = {"7": {"name": "run", "state": queue_state, "command": ""}} if queue_state else {}
    monkeypatch.setattr(schedulers, "slurm_queue", lambda strict=True: queue)
    (row,) = status.sweep_status(tmp_path)
    assert row["state"] == expected


def test_a_job_that_ended_before_training_failed_only_if_it_left_an_error(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    stderr = tmp_path / "7.err"
    (tmp_path / schedulers.SUBMISSIONS).write_text(json.dumps({"run_name": "run", "executor": "slurm", "job_id": "7",
                                                          "stderr": str(stderr)}) + "\n")
    monkeypatch.setattr(schedulers, "slurm_queue", lambda strict=True: {})  # the job has left the queue
    (row,) = status.sweep_status(tmp_path)  # no error log: cancelled while pending, say
    assert row["state"] == "interrupted" and "cancelled while queued?" in row["error"][0]
    stderr.write_text("ImportError: no module named harness\n")
    (row,) = status.sweep_status(tmp_path)
    assert row["state"] == "failed" and row["error"] == ["job 7 ended before training started",
                                                         "| ImportError: no module named harness"]


@pytest.mark.parametrize("states, exit_status", [(["done", "running", "pending"], 0), (["done", "interrupted"], 1),
                                            (["failed", "done"], 1)])
def test_harness_sweep_exits_1_when_a_run_failed_or_was_interrupted(monkeypatch, capsys, states, exit_status):
    from harness.cli import main

    rows = [{"run": f"run-{i}", "run_dir": "", "state": state, "job_id": None, "queue_state": None, "step": 3,
             "max_steps": 5, "checkpoint": None, "requeues": 0, "fid": None, "fid_step": None, "fid_name": None,
             "fid_lo": None, "fid_hi": None, "class_accuracy": None, "log": None, "error": []} for i, state in enumerate(states)]
    monkeypatch.setattr(launch, "launch_sweep", lambda name, overrides: rows)
    assert main(["sweep", "demo"]) == exit_status
    assert f"{len(states)} runs: " in capsys.readouterr().out


def test_two_points_sharing_a_run_dir_are_refused():
    specs = grid("demo", [*TINY_GRID, "run_name=same"])
    with pytest.raises(HarnessError, match="share the run dir .*/same; put the swept key into run_name"):
        plan.check_grid("demo", specs, "local", inputs=False)


def test_gpu_hours_wall_hours_and_requeues_of_a_planned_run(tmp_path):
    (spec,) = grid("paper_grid", ["model=DiT-XL/2", f"hydra.sweep.dir={tmp_path}"])
    table = {"device": "H100", "devices": {"H100": {"peak_tflops": 1000.0, "train_mfu": 0.5, "sample_mfu": 0.25}},
             "measured": {}, "bench_log": None}
    row = plan.plan_row(spec, table)
    train_rate = 1000e12 * 0.5 / (2 * 3 * row["gflops"] * 1e9)
    sample_rate = 1000e12 * 0.25 / (2 * row["gflops"] * 1e9)
    assert row["train_gpu_hours"] == pytest.approx(400_000 * 256 / train_rate / 3600)
    assert row["eval_gpu_hours"] == pytest.approx(8 * 50_000 * 250 / sample_rate / 3600)  # 8 evaluations, no guidance
    assert row["gpus"] == 8 and row["wall_hours"] == pytest.approx(row["gpu_hours"] / 8)
    assert row["requeues_needed"] == math.ceil(row["wall_hours"] * 60 / row["timeout_min"]) - 1
    (spec,) = grid("paper_grid", ["model=DiT-XL/2", "eval.fid_every=200000", f"hydra.sweep.dir={tmp_path}"])
    fewer = plan.plan_row(spec, table)  # every evaluation scores the loss; FID-50K only at 200K and 400K
    assert fewer["evaluations"] == 8 and fewer["eval_gpu_hours"] == pytest.approx(row["eval_gpu_hours"] * 2 / 8)


def test_local_runs_share_the_cores(monkeypatch):
    monkeypatch.setattr(schedulers.os, "cpu_count", lambda: 16)
    (gpu_run,) = grid("demo", ["model=mini-S/8", "trainer.device=cuda", "hydra.launcher.cpus_per_task=null"])
    assert schedulers.local_parallelism(gpu_run.cfg) == (1, 16)      # GPU runs one at a time
    (cpu_run,) = grid("demo", ["model=mini-S/8", "hydra.launcher.cpus_per_task=4"])
    assert schedulers.local_parallelism(cpu_run.cfg) == (4, 4)      # CPU runs side by side, 4 threads each


def test_throughput_comes_from_the_table_the_bench_log_or_an_assumed_mfu(tmp_path):
    table = {"device": "H100", "devices": {"H100": {"peak_tflops": 1000.0, "train_mfu": 0.5, "sample_mfu": 0.25}},
             "measured": {}, "bench_log": str(tmp_path / "bench.jsonl")}
    rate, source = plan.throughput(table, "DiT-B/2", 10.0, "train")
    assert rate == pytest.approx(1000e12 * 0.5 / (2 * 3 * 10e9)) and "assumed 50% MFU" in source
    rate, _ = plan.throughput(table, "DiT-B/2", 10.0, "sample", guided=True)
    assert rate == pytest.approx(1000e12 * 0.25 / (2 * 10e9) / 2)
    rows = [{"device": "NVIDIA H100 80GB HBM3", "model": "DiT-B/2", "train": {"images_per_s": 900.0},
             "sample": {"no_guidance": {"images_per_s": 5000.0}, "cfg_1.5": {"images_per_s": 2600.0}}}]
    Path(table["bench_log"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plan.throughput(table, "DiT-B/2", 10.0, "train")[0] == 900.0
    assert plan.throughput(table, "DiT-B/2", 10.0, "sample", guided=True)[0] == 2600.0
    assert "harness bench" in plan.throughput(table, "DiT-B/2", 10.0, "train")[1]
    assert "assumed" in plan.throughput(table, "DiT-S/2", 10.0, "train")[1]    # no row for that model
    table["measured"] = {"H100": {"DiT-B/2": {"train_images_per_s": 700.0}}}
    assert plan.throughput(table, "DiT-B/2", 10.0, "train") == (700.0, "training measured (throughput.yaml)")
    no_log = {**table, "measured": {}, "bench_log": None}  # a throughput.yaml without a bench log
    assert "assumed" in plan.throughput(no_log, "DiT-B/2", 10.0, "train")[1]


def test_local_launcher_waits_boundedly_and_skips_runs_that_are_running_or_done(tmp_path, capsys):
    args = [*TINY_GRID, "model.patch_size=8", "trainer.max_steps=40", "trainer.ckpt_every=20",
            f"hydra.sweep.dir={tmp_path}", "hydra.launcher.wait_s=1", "hydra.launcher.poll_s=0.2"]
    run_dir = tmp_path / "digits-custom-d2-h32-8-adaln_zero"
    assert [r["state"] for r in launch.launch_sweep("demo", args)] == ["running"]  # back after ~1 s, the run going on
    out = capsys.readouterr().out
    assert "1 of 1 runs to submit (local)" in out and "stopped waiting after 1 s" in out
    record = json.loads((tmp_path / schedulers.SUBMISSIONS).read_text())
    assert (record["run_name"], record["executor"], record["reason"]) == (run_dir.name, "local", "new")
    assert record["run_dir"] == str(run_dir) and Path(record["stdout"]).parent.parent == tmp_path / schedulers.SUBMITIT_DIR
    pid = record["job_id"]
    launch.launch_sweep("demo", args)
    assert f"skip (job {pid} is running)" in capsys.readouterr().out
    deadline = time.time() + 120
    while (read_json(run_dir / "run_state.json", {}) or {}).get("state") != "done":
        assert time.time() < deadline, "the local run did not finish"
        time.sleep(0.5)
    record = (tmp_path / status.SWEEP_RECORD).read_text()
    rows = launch.launch_sweep("demo", [*args, "eval.num_samples=30"])  # eval settings may change between launches
    assert "skip (done at step 40)" in capsys.readouterr().out
    assert "1 run: 1 done" in status.format_status(rows) and rows[0]["checkpoint"] == 40  # where a relaunch resumes
    assert len((tmp_path / schedulers.SUBMISSIONS).read_text().splitlines()) == 1
    assert (tmp_path / status.SWEEP_RECORD).read_text() == record  # nothing submitted: the record stays
    with pytest.raises(HarnessError, match=f"^{run_dir} is a run dir, not a sweep dir: give the sweep dir above it"):
        status.sweep_status(run_dir)


class FakeJob:
    """A submitit job handle that finishes after `polls` calls of done()."""

    def __init__(self, job_id: int, polls: int = 2):
        self.job_id, self.polls = job_id, polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def fake_launcher(kind, monkeypatch, wait_s: float, poll_s: float = 0.2, running_elsewhere=()):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from hydra_plugins.harness_launcher import launchers

    launcher = getattr(launchers, kind).__new__(getattr(launchers, kind))
    launcher.config = OmegaConf.create({"hydra": {"launcher": {"wait_s": wait_s, "poll_s": poll_s}}})
    started, unfinished_at_start = [], []

    def submit(decision, sweep_dir):
        unfinished_at_start.append(sum(job.polls >= 0 for job in started))
        started.append(FakeJob(len(started)))
        started[-1].run_name = decision.spec.run_name
        return started[-1]

    launcher._submit = submit
    monkeypatch.setattr(schedulers, "local_parallelism", lambda cfg: (2, 1))
    monkeypatch.setattr(schedulers, "live_local_runs", lambda sweep_dir, besides: [n for n in running_elsewhere
                                                                             if n not in besides])
    todo = [SimpleNamespace(spec=SimpleNamespace(cfg=None, run_name=f"run-{i}")) for i in range(5)]
    return launcher, todo, started, unfinished_at_start


def test_the_local_launcher_keeps_max_parallel_runs_going_until_all_are_done(tmp_path, monkeypatch):
    launcher, todo, started, unfinished_at_start = fake_launcher("HarnessLocalLauncher", monkeypatch, wait_s=30)
    begin = time.time()
    launcher._run(todo, tmp_path)
    assert len(started) == 5 and max(unfinished_at_start) < 2 and time.time() - begin < 10
    # Without time to wait, the first runs still start (and go on); the rest wait for the next launch.
    launcher, todo, started, _ = fake_launcher("HarnessLocalLauncher", monkeypatch, wait_s=0)
    launcher._run(todo, tmp_path)
    assert len(started) == 2


def test_runs_an_earlier_launch_still_runs_hold_slots_of_max_parallel(tmp_path, monkeypatch, capsys):
    launcher, todo, started, unfinished_at_start = fake_launcher("HarnessLocalLauncher", monkeypatch, wait_s=30,
                                                                  running_elsewhere=["run-x"])
    launcher._run(todo, tmp_path)
    assert len(started) == 5 and max(unfinished_at_start) == 0  # one slot of two is taken: one run at a time
    assert "1 already running from an earlier launch: run-x" in capsys.readouterr().out
    launcher, todo, started, _ = fake_launcher("HarnessLocalLauncher", monkeypatch, wait_s=0,
                                               running_elsewhere=["run-x", "run-y"])
    launcher._run(todo, tmp_path)
    assert started == []  # no slot free and no time to wait: the next launch starts them
    # A run of this launch's plan that a concurrent launch started meanwhile is left to it.
    launcher, todo, started, unfinished_at_start = fake_launcher("HarnessLocalLauncher", monkeypatch, wait_s=30,
                                                                  running_elsewhere=["run-3"])
    launcher._run(todo, tmp_path)
    assert [job.run_name for job in started] == ["run-0", "run-1", "run-2", "run-4"]
    assert max(unfinished_at_start) == 0 and "run-3: skip (started meanwhile by another launch)" in capsys.readouterr().out


def test_a_run_trained_by_hand_into_the_sweep_dir_is_running_while_its_process_lives(tmp_path):
    import socket
    import subprocess
    import sys

    (spec,) = grid("demo", [*TINY_GRID, "model.patch_size=8", f"hydra.sweep.dir={tmp_path}"])
    spec.run_dir.mkdir(parents=True)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", "harness"],
                               stdout=subprocess.PIPE)
    trainer.stdout.readline()
    (spec.run_dir / "run_state.json").write_text(json.dumps({"state": "running", "step": 3, "max_steps": 20,
                                                             "host": socket.gethostname(), "pid": trainer.pid}))
    try:
        assert [r["state"] for r in status.sweep_status(tmp_path)] == ["running"]
        (decision,) = plan.plan_runs([spec], "local", None)
        assert (decision.submit, decision.reason) == (False, f"job {trainer.pid} is running")
    finally:
        trainer.kill()
        trainer.communicate()
    assert [r["state"] for r in status.sweep_status(tmp_path)] == ["interrupted"]  # gone without finishing
    (decision,) = plan.plan_runs([spec], "local", None)
    assert (decision.submit, decision.reason) == (True, "new")


def test_live_local_runs_are_the_submissions_whose_process_is_alive(tmp_path):
    import socket
    import subprocess
    import sys

    alive = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", "submitit"],
                             stdout=subprocess.PIPE)
    alive.stdout.readline()  # exec'd: until then /proc shows the parent's command line
    try:
        rows = [{"run_name": "alive", "executor": "local", "job_id": alive.pid, "host": socket.gethostname()},
                {"run_name": "mine", "executor": "local", "job_id": alive.pid, "host": socket.gethostname()},
                {"run_name": "gone", "executor": "local", "job_id": 2 ** 22 + 1, "host": socket.gethostname()},
                {"run_name": "elsewhere", "executor": "local", "job_id": alive.pid, "host": "another-host"},
                {"run_name": "slurm", "executor": "slurm", "job_id": alive.pid, "host": socket.gethostname()}]
        (tmp_path / schedulers.SUBMISSIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert schedulers.live_local_runs(tmp_path, besides={"mine"}) == ["alive"]
    finally:
        alive.kill()
        alive.communicate()
    assert schedulers.live_local_runs(tmp_path, besides=set()) == []


def test_the_slurm_launcher_waits_for_its_jobs_but_not_past_wait_s(tmp_path, monkeypatch):
    launcher, todo, started, _ = fake_launcher("HarnessSlurmLauncher", monkeypatch, wait_s=1.5, poll_s=1.0)
    monkeypatch.setattr(schedulers, "slurm_queue", lambda strict=True: {})   # the jobs have left the queue
    begin = time.time()
    launcher._run(todo, tmp_path)
    assert len(started) == 5 and time.time() - begin < 0.5
    monkeypatch.setattr(schedulers, "slurm_queue", lambda strict=True: None)  # squeue does not answer: keep waiting
    begin = time.time()
    launcher._run(todo, tmp_path)
    assert 1.4 < time.time() - begin < 5


def test_status_reads_a_run_without_a_state_file_and_picks_the_fid_as_the_report_does(tmp_path):
    run = RunDir(tmp_path / "sweep" / "digits-mini-S-2-adaln_zero")
    run.path.mkdir(parents=True)
    run.config_file.write_text("trainer:\n  max_steps: 400\n")
    run.checkpoints_dir.mkdir()
    torch.save({"step": 130, "model": {}}, run.checkpoint_file(130))  # a checkpoint, no run_state.json
    for step, fid, samples in ((100, 50.0, 500), (100, 70.0, 50), (100, 40.0, 500)):  # the last of most samples
        append_jsonl(run.results_file, {"step": step, "fid": fid, "fid_name": "fid_digits", "num_samples": samples})
    (row,) = status.sweep_status(tmp_path / "sweep")
    assert (row["state"], row["step"], row["max_steps"], row["fid"]) == ("interrupted", 130, 400, 40.0)
    assert [r["fid"] for r in run.results()] == [40.0]
    assert "130/400" in status.format_status([row])
    append_jsonl(run.results_file, {"step": 130, "fid": 30.0, "fid_name": "fid_digits", "num_samples": 500,
                                    "fid_lo": 27.5, "fid_hi": 32.5, "class_accuracy": 0.625})
    (row,) = status.sweep_status(tmp_path / "sweep")
    assert "30.00 [27.5, 32.5] (130) fid_digits" in status.format_status([row]) and "62.5%" in status.format_status([row])
    row_without_config = {**row, "max_steps": None}
    assert "130/?" in status.format_status([row_without_config])


def test_seed_is_a_sweep_axis_with_a_run_dir_per_replica(tmp_path):
    specs = grid("demo", ["model=mini-S/8", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"])
    assert [spec.run_dir.name for spec in specs] == [
        "digits-mini-S-8-adaln_zero", "digits-mini-S-8-adaln_zero-seed1", "digits-mini-S-8-adaln_zero-seed2"]
    assert [int(spec.cfg.seed) for spec in specs] == [0, 1, 2] and {int(s.cfg.eval.seed) for s in specs} == {0}
    with plan.hydra_context():
        plan.check_grid("demo", specs, "local", inputs=False)  # no two replicas share a run dir
