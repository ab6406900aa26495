"""The demo benchmark: the claim read back from a report, and `make demo` run, timed and logged for one seed.

Whether the real demo holds its claim within 15 minutes is measured by running `harness demo-bench` (README,
docs/demo.md), never asserted here: these tests check that the benchmark measures and reports it correctly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.sweep import MAX_STEPS, make_fixture_sweep
from harness.cli import main
from harness.demo_bench import CLAIM, demo_claim, format_demo_bench, run_demo_bench
from harness.io import read_json, read_jsonl
from harness.report.collect import collect_results, rows_at_step
from harness.report.render import write_report
from test_report import _with_row_fields


@pytest.fixture(scope="module")
def claim_sweep(tmp_path_factory) -> Path:
    """The fixture sweep with a validation loss and a class accuracy on every row."""
    return _with_row_fields(make_fixture_sweep(tmp_path_factory.mktemp("claim") / "fixture"), lambda row: {
        "val_loss": 0.05 * row["gflops"] ** -0.1, "class_accuracy": min(1.0, 10.0 / row["fid"])})


@pytest.fixture(scope="module")
def fits(claim_sweep) -> dict:
    return read_json(write_report([claim_sweep], claim_sweep.parent / "report")["json"])


def test_the_report_states_the_claims_numbers_as_data(fits, claim_sweep):
    loss, accuracy = fits["val_loss_vs_gflops"], fits["class_accuracy"]
    assert loss["exponent"] == pytest.approx(-0.1) and loss["r"] == pytest.approx(-1.0)
    at = rows_at_step(collect_results(claim_sweep), MAX_STEPS)
    best = at.loc[at["fid"].idxmin()]
    assert accuracy["best_config"] == best["config"] and accuracy["best_fid"] == pytest.approx(best["fid"])
    assert accuracy["by_config"] == pytest.approx({row.config: min(1.0, 10.0 / row.fid) for row in at.itertuples()})
    assert accuracy["replicas"] == 1


def test_each_part_of_the_claim_is_checked_against_its_threshold(fits):
    fid_r = fits["fits"]["fid_digits"]["r"]
    best = fits["class_accuracy"]["best_accuracy"]
    verdict = demo_claim(fits, wall_s=600.0)
    claim = verdict["claim"]
    assert claim["fid_r"]["value"] == fid_r and claim["fid_r"]["holds"] == (fid_r <= CLAIM["max_r"])
    assert claim["val_loss_exponent"]["holds"] and claim["wall_s"]["holds"]
    assert claim["best_accuracy"]["value"] == best and claim["best_accuracy"]["holds"] == (best >= 0.9)
    assert verdict["holds"] == all(part["holds"] for part in claim.values())
    assert verdict["fid_r_ci"] == fits["fits"]["fid_digits"]["r_ci"] and verdict["headline"] == fits["headline"]

    slow = demo_claim(fits, wall_s=CLAIM["max_wall_s"] + 1)
    assert not slow["claim"]["wall_s"]["holds"] and not slow["holds"]
    worse = {**fits, "class_accuracy": {**fits["class_accuracy"], "best_accuracy": 0.899},
             "val_loss_vs_gflops": {**fits["val_loss_vs_gflops"], "exponent": 0.01}}
    verdict = demo_claim(worse, wall_s=600.0)
    assert not verdict["claim"]["best_accuracy"]["holds"] and not verdict["claim"]["val_loss_exponent"]["holds"]
    unfitted = demo_claim({"fits": {}, "val_loss_vs_gflops": None, "class_accuracy": None}, wall_s=600.0)
    assert [part["value"] for part in unfitted["claim"].values()] == [None, None, None, 600.0]
    assert not unfitted["holds"] and "not measured" in format_demo_bench(
        {**unfitted, "seed": 0, "commit": "abc", "dir": "/d", "wall_s": 600.0, "sweep_s": 590.0, "report_s": 10.0,
         "host_step_ms": {"before": None, "after": None}})


# Two tiny runs of the demo sweep (patch 8 and 4): the benchmark's plumbing, not the demo's recipe.
TINY_DEMO = ["model=custom", "model.patch_size=8,4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
             "trainer.max_steps=10", "eval.every=10", "eval.num_samples=20", "eval.batch_size=20"]


def test_the_demo_is_run_timed_and_logged_as_make_demo_runs_it(tmp_path, capsys):
    log = tmp_path / "bench" / "demo_log.jsonl"
    row = run_demo_bench(3, tmp_path / "demo", log, TINY_DEMO, host_probe=False, say=lambda line: None)
    assert read_jsonl(log) == [json.loads(json.dumps(row))]
    demo = tmp_path / "demo"
    assert sorted(p.name for p in demo.iterdir()) == ["report.log", "reports", "sweep.log", "sweeps_out"]
    runs = sorted(p.name for p in (demo / "sweeps_out" / "demo").iterdir() if (p / "run_state.json").exists())
    assert runs == ["digits-custom-d2-h32-4-adaln_zero-seed3", "digits-custom-d2-h32-8-adaln_zero-seed3"]
    assert all(read_json(demo / "sweeps_out" / "demo" / run / "run_state.json")["state"] == "done" for run in runs)
    assert row["seed"] == 3
    assert row["wall_s"] == pytest.approx(row["sweep_s"] + row["report_s"], abs=0.11) and row["report_s"] > 0
    assert row["host_step_ms"] == {"before": None, "after": None} and row["host"] is None and row["commit"]
    # Two configs are too few for a fit: the report says so, and the claim does not hold.
    assert row["claim"]["fid_r"]["value"] is None and not row["holds"]
    assert row["claim"]["best_accuracy"]["value"] is not None  # the digits CNN measured both runs' samples
    assert any("not fitted" in line for line in row["headline"])
    text = format_demo_bench(row)
    assert text.startswith("demo seed 3 (") and "the claim does NOT hold" in text and "FAIL fid_r = not measured" in text

    # The same directory again: refused in one line, before anything runs.
    assert main(["demo-bench", "--seed", "3", "--dir", str(demo), "--log", str(log), "--no-host-probe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"harness: error: --dir={demo} is not empty") and "\n" not in err
    assert len(read_jsonl(log)) == 1


def test_bad_overrides_are_the_sweeps_one_line_and_log_no_row(tmp_path, capsys):
    log = tmp_path / "demo_log.jsonl"
    assert main(["demo-bench", "--dir", str(tmp_path / "d"), "--log", str(log), "--no-host-probe",
                 "trainer.max_steps=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("harness: error: sweep demo: every run: trainer.max_steps must be a positive integer, got 0 "
                   "(nothing was submitted)")
    assert not log.exists() and not (tmp_path / "d" / "sweeps_out").exists()


def test_the_host_speed_reads_as_it_was_probed():
    row = {"seed": 0, "commit": "abc", "dir": "/d", "wall_s": 1.0, "sweep_s": 1.0, "report_s": 0.0, "holds": False,
           "error": "harness sweep exited with 1: see /d/sweep.log"}
    for probed, shown in [({"before": 101.4, "after": 98.6}, "host: mini-B/2 step 101 ms before, 99 ms after"),
                          ({"before": 101.4, "after": None}, "host: mini-B/2 step 101 ms before, ? ms after"),
                          ({"before": None, "after": None}, "host: not probed")]:
        text = format_demo_bench({**row, "host_step_ms": probed})
        assert shown in text and text.endswith("\n  harness sweep exited with 1: see /d/sweep.log")
        assert "\n  on " not in text
    cpu = "cpu (AMD EPYC, family 26 model 2; AVX512; 1 threads)"
    assert f"\n  on {cpu}\n" in format_demo_bench({**row, "host_step_ms": {"before": 64.0, "after": 65.0}, "host": cpu})


def test_an_override_that_moves_the_sweep_is_refused(tmp_path, capsys):
    assert main(["demo-bench", "--dir", str(tmp_path / "d"), f"hydra.sweep.dir={tmp_path}/elsewhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"harness: error: hydra.sweep.dir={tmp_path}/elsewhere: the demo benchmark reads the sweep")
    assert not (tmp_path / "d").exists()
