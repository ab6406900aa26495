"""harness.report: the results table, fits, figures and report of a (synthetic) sweep."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from conftest import run_harness
from fixtures.sweep import BATCH, MAX_STEPS, SLOPE, STEPS, expected_runs, make_fixture_sweep, make_replica_sweep
from harness.errors import HarnessError
from harness.report import render
from harness.report.collect import (RUN_COLUMNS, SAMPLE_BOOTSTRAP, _config_labels, aggregate_replicas, collect_results,
                                    default_step, last_samples, load_paper_table4, pick_step, rows_at_step)
from harness.report.figures import plot_fid_vs_gflops, plot_fid_vs_steps, plot_sample_grid
from harness.report.laws import predict_config, predict_held_out
from harness.report.render import write_report, write_results_csv
from harness.report.stats import BOOTSTRAP_RESAMPLES, compute_frontier, fit_power_law, predict_fid
from harness.run_dir import RESULT_COLUMNS, RunDir, find_run_dirs

FIGURES = ("fid_vs_gflops", "fid_vs_steps", "fid_vs_compute", "samples")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_fixture_sweep(tmp_path_factory.mktemp("sweep") / "fixture")


@pytest.fixture(scope="module")
def df(sweep):
    return collect_results(sweep)


@pytest.fixture(scope="module")
def inception_sweep(tmp_path_factory):
    return make_fixture_sweep(tmp_path_factory.mktemp("inception") / "imagenet", fid_name="fid_inception")


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory):
    return write_report([sweep], tmp_path_factory.mktemp("report"))


# ---- results table ---------------------------------------------------------------------------


def test_results_table_rows_columns_and_states(df):
    runs = expected_runs()
    assert set(RESULT_COLUMNS + RUN_COLUMNS) <= set(df.columns)
    # One row per run x evaluated step; the torn last line of the running run is skipped.
    assert len(df) == sum(last // 1000 for _, last in runs.values()) == 15
    assert not (df["run_id"] == "torn by a kill").any()
    per_run = df.groupby(df["run_path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert {name: (g["state"].iloc[0], int(g["step"].max())) for name, g in per_run} == runs
    assert set(df["state"]) == {"done", "running", "failed"}
    failed = df[df["state"] == "failed"]
    assert failed["error"].str.contains("illegal memory access").all()
    assert df.duplicated(["run_path", "step"]).sum() == 0
    np.testing.assert_allclose(df["train_compute_flops"], df["gflops"] * 1e9 * BATCH * df["step"] * 3)
    assert df["config"].iloc[0] == "mini-S/4"  # smallest model, largest patch first


def test_a_step_evaluated_twice_keeps_the_fid_from_the_most_samples(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    results = next(p for p in sorted(copy.rglob("results.jsonl")) if p.read_text().endswith("\n"))
    last = json.loads(results.read_text().splitlines()[-1])
    more = last["num_samples"] * 10
    with open(results, "a") as f:
        for fid, samples in ((1.5, more), (2.5, more), (99.0, 20)):  # FID-50K twice after training, then a quick look
            f.write(json.dumps({**last, "fid": fid, "num_samples": samples}) + "\n")
    df = collect_results(copy)
    row = df[(df["run_path"] == str(results.parent)) & (df["step"] == last["step"])]
    assert len(row) == 1 and (row["fid"].item(), row["num_samples"].item()) == (2.5, more)


def test_a_run_moved_aside_by_overwrite_is_not_a_run_of_the_sweep(sweep, df, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    run = Path(df["run_path"].iloc[0].replace(str(sweep), str(copy)))
    shutil.copytree(run, run / "overwritten-20260101-000000", ignore=shutil.ignore_patterns("overwritten-*"))
    assert find_run_dirs(copy) == sorted(Path(p.replace(str(sweep), str(copy))) for p in df["run_path"].unique())
    assert len(collect_results(copy)) == len(df)


def test_results_csv_round_trip(df, tmp_path):
    path = write_results_csv(df, tmp_path / "out" / "results.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(df.columns) and len(back) == len(df)
    np.testing.assert_allclose(back["fid"], df["fid"])


def test_runs_without_state_or_results_are_listed(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    (copy / "digits-mini-S-4-adaln_zero" / "run_state.json").unlink()
    # A run preempted before its first evaluation: only a config and a state file.
    early = copy / "digits-mini-B-8-adaln_zero"
    early.mkdir()
    (early / "config.yaml").write_text("model:\n  name: mini-B/8\n  size: mini-B\n  patch_size: 8\n"
                                       "  conditioning: adaln_zero\n")
    (early / "run_state.json").write_text(json.dumps({"state": "preempted", "step": 200, "max_steps": 3000}))
    df = collect_results(copy)
    assert set(df.loc[df["config"] == "mini-S/4", "state"]) == {"unknown"}
    row = df[df["config"] == "mini-B/8"]
    assert len(row) == 1 and row["state"].iloc[0] == "preempted" and row["fid"].isna().all()
    assert row["patch"].iloc[0] == 8
    # Neither the unknown-state run nor the unevaluated one counts as finished for the default step.
    assert default_step(df)[0] == MAX_STEPS


def test_a_re_evaluated_step_keeps_the_latest_row(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    results = copy / "digits-mini-B-2-adaln_zero" / "results.jsonl"
    last = json.loads(results.read_text().splitlines()[-1])
    del last["train_compute_flops"]  # an older row format: computed from gflops, batch and step
    with open(results, "a") as f:
        f.write(json.dumps({**last, "fid": 1.25}) + "\n")
    df = collect_results(copy)
    rows = df[(df["config"] == "mini-B/2") & (df["step"] == MAX_STEPS)]
    assert list(rows["fid"]) == [1.25]
    assert rows["train_compute_flops"].iloc[0] == pytest.approx(last["gflops"] * 1e9 * BATCH * MAX_STEPS * 3)


def test_a_value_that_is_not_a_number_is_missing_with_a_warning(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    results = copy / "digits-mini-B-2-adaln_zero" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows[0]["fid"], rows[1]["fid"] = "12.5x", [3.0]
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning) as caught:
        df = collect_results(copy)
    messages = [str(w.message) for w in caught]
    assert any(f"{results}: fid='12.5x' is not a number" in m for m in messages), messages
    assert any(f"{results}: fid=[3.0] is not a number" in m for m in messages), messages
    run = df[df["config"] == "mini-B/2"]
    assert run["fid"].isna().sum() == 2 and run["fid"].notna().sum() == len(rows) - 2
    # The CLI says it in one line.
    done = run_harness(["report", str(copy), "-o", str(tmp_path / "report")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"harness: warning: {results}: fid='12.5x' is not a number; read as missing\n" in done.stderr


def test_default_and_chosen_step(df):
    step, why = default_step(df)
    assert step == MAX_STEPS and "finished" in why
    assert len(rows_at_step(df, MAX_STEPS)) == 4  # the done runs
    assert len(rows_at_step(df, STEPS[0])) == 6
    assert pick_step(df, 2000)[0] == 2000


# ---- fits --------------------------------------------------------------------------------------


def test_fit_recovers_a_known_power_law():
    rng = np.random.default_rng(1)
    gflops = np.geomspace(0.3, 120, 12)
    slope, intercept, sigma = -0.36, 2.1, 0.05
    x = np.log10(gflops)
    fid = 10 ** (intercept + slope * x + rng.normal(0, sigma, x.size))
    fit = fit_power_law(gflops, fid, seed=0)
    r_true = slope * x.std() / np.sqrt(slope**2 * x.var() + sigma**2)
    assert fit.n == 12 and fit.n_boot == BOOTSTRAP_RESAMPLES
    assert abs(fit.slope - slope) < 0.03 and abs(fit.intercept - intercept) < 0.05
    assert abs(fit.r - r_true) < 0.03 and fit.r2 == pytest.approx(fit.r**2)
    assert fit.slope_ci[0] < slope < fit.slope_ci[1]
    assert fit.r_ci[0] < r_true < fit.r_ci[1] and fit.r_ci[0] < fit.r < fit.r_ci[1]
    assert re.fullmatch(r"Gflops vs FID: r = -0\.9\d{2} \[-[01]\.\d{3}, -0\.9\d{2}\], slope = -0\.3\d{2}", fit.summary())
    # Seeded: the same seed gives the same interval.
    assert fit_power_law(gflops, fid, seed=0).r_ci == fit.r_ci


def test_fit_of_an_exact_power_law_is_exact():
    gflops = np.array([0.5, 2.0, 8.0, 30.0])
    fit = fit_power_law(gflops, 50 * gflops**-0.5, n_boot=200)
    assert fit.slope == pytest.approx(-0.5) and 10**fit.intercept == pytest.approx(50)
    assert fit.r == pytest.approx(-1.0) and fit.resid_std == pytest.approx(0, abs=1e-9)


def test_predict_fid_interval_covers_the_truth_and_widens_outside_the_grid():
    rng = np.random.default_rng(2)
    gflops = np.geomspace(1, 100, 10)
    fid = 80 * gflops**-0.4 * 10 ** rng.normal(0, 0.03, gflops.size)
    fit = fit_power_law(gflops, fid)
    mid, lo, hi = predict_fid(fit, 10.0)
    assert lo < mid < hi and lo < 80 * 10**-0.4 < hi
    _, far_lo, far_hi = predict_fid(fit, 1e4)
    assert np.log(far_hi / far_lo) > np.log(hi / lo)
    arr = predict_fid(fit, np.array([5.0, 50.0]))
    assert all(a.shape == (2,) for a in arr)
    with pytest.raises(HarnessError, match="positive"):
        predict_fid(fit, 0.0)


def test_prediction_interval_and_bootstrap_by_hand():
    """The interval is the t-based regression prediction interval; the CIs are scipy's BCa bootstrap."""
    from scipy import stats

    rng = np.random.default_rng(3)
    gflops = np.geomspace(0.5, 80, 9)
    fid = 60 * gflops**-0.3 * 10 ** rng.normal(0, 0.05, gflops.size)
    fit = fit_power_law(gflops, fid, n_boot=500, seed=4)
    x, y = np.log10(gflops), np.log10(fid)
    n, s = len(x), np.sqrt(((y - (fit.intercept + fit.slope * x)) ** 2).sum() / (len(x) - 2))
    assert fit.resid_std == pytest.approx(s, rel=1e-12)
    x0 = np.log10(200.0)
    half = stats.t.ppf(0.975, n - 2) * s * np.sqrt(1 + 1 / n + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    y0 = fit.intercept + fit.slope * x0
    assert predict_fid(fit, 200.0) == pytest.approx((10**y0, 10 ** (y0 - half), 10 ** (y0 + half)), rel=1e-9)
    # The slope's CI is scipy's BCa bootstrap of np.polyfit's slope over the same seeded pair resamples.
    boot = stats.bootstrap((x, y), lambda a, b: np.polyfit(a, b, 1)[0], n_resamples=500, paired=True,
                           vectorized=False, method="BCa", rng=np.random.default_rng(4))
    ci = boot.confidence_interval
    assert fit.slope_ci == pytest.approx((ci.low, ci.high), rel=1e-6)
    assert fit.interval.startswith("95% BCa bootstrap") and fit.boot_dropped == 0


def test_default_step_is_the_last_every_finished_run_reached():
    rows = [{"run_path": run, "state": "done", "step": step, "fid": 10.0 - step / 10}
            for run, steps in (("a", (10, 20)), ("b", (10, 20, 40))) for step in steps]
    assert default_step(pd.DataFrame(rows))[0] == 20


def test_labels_of_one_model_in_two_sweeps_name_the_sweep():
    df = pd.DataFrame([{"run_path": f"/s/{sweep}/run", "model": "mini-S/4", "conditioning": "adaln_zero",
                        "sweep": sweep, "sweep_dir": f"/s/{sweep}"} for sweep in ("a", "b")])
    assert list(_config_labels(df)) == ["mini-S/4 (a)", "mini-S/4 (b)"]


def test_frontier_per_fid_kind_keeps_the_best_of_equal_budgets():
    rows = [{"train_compute_flops": c, "fid": f, "fid_name": kind, "config": f"{kind}-{c}-{f}", "step": 1}
            for kind, points in (("fid_digits", [(1e12, 5.0), (1e12, 3.0), (2e12, 4.0), (3e12, 2.0)]),
                                 ("fid_inception", [(1e12, 50.0), (4e12, 30.0)]))
            for c, f in points]
    front = compute_frontier(pd.DataFrame(rows))
    digits, inception = (front[front["fid_name"] == k] for k in ("fid_digits", "fid_inception"))
    assert list(zip(digits["train_compute_flops"], digits["fid"])) == [(1e12, 3.0), (3e12, 2.0)]
    assert list(zip(inception["train_compute_flops"], inception["fid"])) == [(1e12, 50.0), (4e12, 30.0)]


@pytest.mark.parametrize("gflops, fid, match", [
    ([1.0, 2.0], [10.0, 5.0], "at least 3"),
    ([1.0, 2.0, -3.0], [10.0, 5.0, 3.0], "positive"),
    ([2.0, 2.0, 2.0], [10.0, 5.0, 3.0], "same Gflops"),
])
def test_fit_refuses_bad_input(gflops, fid, match):
    with pytest.raises(HarnessError, match=match):
        fit_power_law(gflops, fid)


def test_compute_frontier(df):
    front = compute_frontier(df)
    assert front["train_compute_flops"].is_monotonic_increasing and front["fid"].is_monotonic_decreasing
    for row in front.itertuples():
        within = df[df["train_compute_flops"] <= row.train_compute_flops]
        assert row.fid == within["fid"].min()
    cheapest = df.loc[df["train_compute_flops"].idxmin()]
    assert front.iloc[0]["config"] == cheapest["config"]
    assert front.iloc[-1]["fid"] == df["fid"].min()


# ---- figures and the report --------------------------------------------------------------------


def test_every_figure_is_written_as_png_and_svg(written):
    for name in FIGURES:
        png, svg = written[f"{name}.png"], written[f"{name}.svg"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert "<svg" in svg.read_text()[:2000] and svg.stat().st_size > 10_000


def test_report_holds_the_table_the_fits_and_the_figures(written, df):
    md, html = written["md"].read_text(), written["html"].read_text()
    summary = r"Gflops vs FID: r = -[01]\.\d{3} \[-[01]\.\d{3}, -[01]\.\d{3}\], slope = -0\.\d{3}"
    for text in (md, html):
        assert re.search(summary, text)
        assert all(config in text for config in df["config"].unique())
        assert "fid_digits" in text and "NOT Inception FID" in text
        assert "step 3,000, the last step every finished run reached" in text
        assert "Compute frontier" in text and "prediction interval" in text
        assert "failed" in text and "running" in text
    assert "| config | size | patch |" in md
    assert all(f"](figures/{name}.png)" in md for name in FIGURES)
    # Self-contained: the table as HTML and every figure embedded, nothing loaded from elsewhere.
    assert "<table" in html and "<th>config</th>" in html
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', html)
    fits = json.loads(written["json"].read_text())
    assert fits["step"] == MAX_STEPS and fits["fits"]["fid_digits"]["n"] == 4
    assert fits["fits"]["fid_digits"]["slope"] == pytest.approx(SLOPE, abs=0.1)
    assert pd.read_csv(written["csv"]).shape[0] == len(df)


def test_report_without_samples_skips_the_grid(sweep, tmp_path):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    for png in copy.glob("*/samples/*.png"):
        png.unlink()
    df = collect_results(copy)
    assert last_samples(df) == {}
    with pytest.raises(HarnessError, match="samples"):
        plot_sample_grid(df)
    written = write_report(copy, tmp_path / "out")
    assert "samples.png" not in written and "fid_vs_gflops.png" in written


def test_a_report_is_replaced_whole_or_not_at_all(sweep, tmp_path, monkeypatch):
    out = tmp_path / "report"
    write_report(sweep, out)
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()

    def killed(*args, **kwargs):  # as a kill would, once results.csv, the figures and report.md are written
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "render_html", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(sweep, out, step=STEPS[0])
    assert files() == before
    monkeypatch.undo()
    written = write_report(sweep, out, step=STEPS[0])
    assert f"at step {STEPS[0]:,}" in written["md"].read_text() and written["md"] == out / "report.md"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # the killed run's staging directory is gone
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HarnessError, match=r"-o=.*report holds files that are not part of a report \(notes.txt\)"):
        write_report(sweep, out)


def test_a_directory_swap_killed_between_its_renames_is_finished_next_time(tmp_path):
    from harness.io import replace_dir, staging_dir

    target = tmp_path / "report"
    target.mkdir()
    (target / "report.md").write_text("old")
    target.rename(tmp_path / ".report.old-123")  # killed after the first rename: no target, the old one aside
    staged = staging_dir(target)
    assert (target / "report.md").read_text() == "old"  # put back before anything else happens
    (staged / "report.md").write_text("new")
    replace_dir(staged, target)
    assert (target / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_overlay_of_the_paper_points_on_an_inception_sweep(inception_sweep):
    df = collect_results(inception_sweep)
    fig = plot_fid_vs_gflops(df, overlay_paper=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlim()[1] > 118.64  # the paper's DiT-XL/2 is on the axis
    assert "Inception" in ax.get_ylabel()
    assert len(load_paper_table4()) == 12


# ---- bad input -------------------------------------------------------------------------------


def test_a_sweep_dir_without_results_is_refused(tmp_path):
    empty = tmp_path / "empty_sweep"
    (empty / "some_run").mkdir(parents=True)
    (empty / "some_run" / "results.jsonl").write_text("")
    with pytest.raises(HarnessError, match="empty_sweep.*no results"):
        collect_results(empty)
    with pytest.raises(HarnessError, match="does not exist"):
        collect_results(tmp_path / "missing")


def test_mixed_feature_extractors_are_refused_unless_asked(sweep, inception_sweep, tmp_path):
    df = collect_results([sweep, inception_sweep])
    with pytest.raises(HarnessError, match=r"fid_digits \(digits-cnn\), fid_inception \(inception-v3-compat\)"):
        plot_fid_vs_gflops(df)
    with pytest.raises(HarnessError, match="mix"):
        write_report([sweep, inception_sweep], tmp_path / "out")
    fig = plot_fid_vs_steps(df, mix_extractors=True)
    assert "mixed" in fig.axes[0].get_ylabel()
    assert df["config"].nunique() == 12  # the same models in two sweeps keep distinct names


def test_a_step_no_run_reached_is_refused(df, sweep, tmp_path):
    with pytest.raises(HarnessError, match="step 2,500.*steps available: 1,000, 2,000, 3,000"):
        plot_fid_vs_gflops(df, step=2500)
    with pytest.raises(HarnessError, match="steps available"):
        write_report(sweep, tmp_path / "out", step=10**6)


def test_the_paper_overlay_is_refused_for_digits_fid(df):
    with pytest.raises(HarnessError, match="overlay_paper.*fid_digits"):
        plot_fid_vs_gflops(df, overlay_paper=True)


def test_cli_report_reports_bad_input_in_one_line(sweep, tmp_path, capsys):
    from harness.cli import main

    (tmp_path / "nothing").mkdir()
    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: sweep dir") and "\n" not in err
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["report", str(tmp_path / "nothing"), "-o", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"harness: error: -o={taken} is a file; give a directory path"
    # A directory this process cannot write is refused before the report is built, naming it.
    assert main(["report", str(sweep), "-o", "/proc/harness-report"]) == 2
    assert capsys.readouterr().err.strip() == ("harness: error: -o=/proc/harness-report: cannot write /proc "
                                               "(No such file or directory)")
    # Usage errors are one line too (argparse would print its usage block).
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "harness: error: the following arguments are required: -o/--out (see harness report --help)")


def test_runs_of_one_model_in_one_sweep_are_named_by_their_run_dirs(sweep, tmp_path):
    copy = tmp_path / "seeds"
    shutil.copytree(sweep, copy)
    for seed in (1, 10):  # "#10" would sort before "#2" as text; run dir names say which run is which
        shutil.copytree(copy / "digits-mini-S-4-adaln_zero", copy / f"digits-mini-S-4-seed{seed}")
    labels = set(collect_results(copy)["config"])
    assert {"mini-S/4 (digits-mini-S-4-adaln_zero)", "mini-S/4 (digits-mini-S-4-seed1)",
            "mini-S/4 (digits-mini-S-4-seed10)"} <= labels
    assert not any("#" in label for label in labels)
    one = collect_results(sweep)
    fig = plot_fid_vs_gflops(one[one["config"] == "mini-S/4"], step=MAX_STEPS)
    assert fig.axes[0].get_title().endswith("(1 run)")


# ---- held-out prediction, headline lines, replicas ---------------------------------------------------------


def test_held_out_prediction_recovers_the_left_out_config(df):
    (fid,) = predict_held_out(df, "mini-S/2")  # the fixture has no val_loss: FID only
    assert fid.quantity == "FID" and fid.step == MAX_STEPS and "mini-S/2" not in fid.fit_configs
    assert set(fid.fit_configs) == {"mini-S/4", "mini-B/4", "mini-B/2"}  # the failed mini-S/1 has no FID at 3,000
    measured = df[(df["config"] == "mini-S/2") & (df["step"] == MAX_STEPS)]["fid"].item()
    lo, hi = fid.interval
    assert fid.measured == measured and lo <= measured <= hi and fid.inside
    assert fid.error == pytest.approx(measured - fid.predicted)
    assert fid.line().startswith("held-out mini-S/2: predicted FID") and "error" in fid.line()
    (outside,) = predict_config(df, 0.02)
    assert outside.measured is None and len(outside.fit_configs) == 4 and outside.interval[0] < outside.predicted


def test_held_out_prediction_refuses_bad_input_in_one_line(df):
    with pytest.raises(HarnessError, match=r"--holdout nope: not a config evaluated at step 3,000; configs: mini-S/4, ") as err:
        predict_held_out(df, "nope")
    assert "\n" not in str(err.value)
    too_few = df[df["config"].isin(["mini-S/4", "mini-S/2", "mini-B/4"])]
    with pytest.raises(HarnessError, match=r"2 other config\(s\) .* need at least 3 to fit") as err:
        predict_held_out(too_few, "mini-S/2")
    assert "\n" not in str(err.value)


def test_cli_holdout_puts_the_headline_lines_at_the_top_of_the_report(sweep, tmp_path, capsys):
    from harness.cli import main

    assert main(["report", str(sweep), "-o", str(tmp_path / "out"), "--holdout", "mini-B/4", "--predict", "0.02"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    top = md.split("Sweeps:")[0]  # right under the title, before everything else
    assert re.search(r"- FID vs Gflops: r = -[01]\.\d\d \[.*\], exponent -0\.\d{3} \[.*\] \(4 configs at step 3,000; "
                     r"95% BCa bootstrap\)", top)
    assert "- loss vs compute: not fitted; no result row has val_loss" in top
    assert re.search(r"- held-out mini-B/4: predicted FID [\d.]+ \[[\d.]+, [\d.]+\], measured [\d.]+ \(error [+-][\d.]+, "
                     r"inside the 95% prediction interval\)", top)
    assert "- config at 0.02 Gflops: predicted FID" in top
    html = (tmp_path / "out" / "report.html").read_text()
    assert "held-out mini-B/4: predicted FID" in html
    fits = json.loads((tmp_path / "out" / "fits.json").read_text())
    assert fits["held_out"][0]["config"] == "mini-B/4" and fits["held_out"][0]["inside"]
    assert main(["report", str(sweep), "-o", str(tmp_path / "bad"), "--holdout", "mini-S/9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: --holdout mini-S/9: not a config") and "\n" not in err


def test_replicas_give_error_bars_an_interval_table_and_the_loss_law(tmp_path):
    replicas = make_replica_sweep(tmp_path / "replicas")
    df = collect_results(replicas)
    ax = plot_fid_vs_gflops(df, step=MAX_STEPS).axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 2  # one bar per replicated config
    written = write_report([replicas], tmp_path / "report")
    md = written["md"].read_text()
    assert "### Seed replicas" in md and "| FID mean | FID 95% interval |" in md and "| 3 | 0, 1, 2 |" in md
    top = md.split("Sweeps:")[0]
    assert "- val loss vs Gflops: not fitted; need at least 3 points" in top
    assert re.search(r"- loss vs compute: L\(C\) = a C\^-b( \+ c)?, b = -?\d\.\d{3} \[.*\] \(frontier of \d+ points; ", top)
    assert written["loss_vs_compute.png"].exists()


def test_rows_of_the_validation_loss_only_feed_the_loss_laws_and_not_the_fid_fits(tmp_path):
    from harness.report.laws import compute_frontier_law

    sweep = make_replica_sweep(tmp_path / "replicas", fid_only_at_last=True)  # eval.fid_every=0: FID at the end only
    df = collect_results(sweep)
    assert len(df) == 2 * 3 * len(STEPS) and df["val_loss"].notna().all()
    assert set(df.loc[df["fid"].notna(), "step"]) == {MAX_STEPS}
    assert default_step(df)[0] == MAX_STEPS and set(aggregate_replicas(df)["step"]) == {MAX_STEPS}
    law = compute_frontier_law(df, n_boot=50)
    assert set(law.curves["step"]) == set(STEPS)  # every step's loss is on the curves
    assert len(compute_frontier(df)) >= 1 and set(compute_frontier(df)["step"]) == {MAX_STEPS}
    written = write_report([sweep], tmp_path / "report")
    md = written["md"].read_text()
    assert re.search(r"- loss vs compute: L\(C\) = a C\^-b", md.split("Sweeps:")[0])
    assert "fid_vs_steps.png" not in written and "fid_vs_steps" not in md  # one FID per run: no curve to draw
    assert "6 runs, 6 evaluations with FID, 12 of the validation loss only." in md

    # An FID taken later at a step that had only its loss (`harness eval`) replaces that row: one row per step.
    run = RunDir(find_run_dirs(sweep)[0])
    only_loss = next(row for row in run.read_results() if row["fid"] is None)
    with open(run.results_file, "a") as f:
        f.write(json.dumps({**only_loss, "fid": 7.0, "fid_name": "fid_digits", "feature_extractor": "digits-cnn",
                            "num_samples": 1000}) + "\n")
    kept = [row for row in run.results() if row["step"] == only_loss["step"]]
    assert [row["fid"] for row in kept] == [7.0]


def _with_row_fields(sweep: Path, fields) -> Path:
    """Add `fields(row)` to every results row of the sweep (a torn last line stays as it is)."""
    for run in find_run_dirs(sweep):
        path = Path(run) / "results.jsonl"
        lines = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                lines.append(line)
                continue
            lines.append(json.dumps({**row, **fields(row)}) + "\n")
        path.write_text("".join(lines))
    return sweep


def test_one_replica_fids_show_their_bootstrap_interval_and_the_class_accuracy(tmp_path):
    sweep = _with_row_fields(make_fixture_sweep(tmp_path / "fixture"), lambda row: {
        "fid_lo": row["fid"] * 0.9, "fid_hi": row["fid"] * 1.1, "fid_se": row["fid"] * 0.05, "fid_ci_level": 0.95,
        "class_accuracy": min(1.0, 3.0 / row["fid"])})
    df = collect_results(sweep)
    at = rows_at_step(df, MAX_STEPS)
    points = aggregate_replicas(at)
    assert set(points["fid_interval_source"]) == {SAMPLE_BOOTSTRAP}
    assert points["fid_lo"].to_numpy() == pytest.approx(points["fid_mean"].to_numpy() * 0.9)
    ax = plot_fid_vs_gflops(df, step=MAX_STEPS).axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == len(at)
    assert any("bootstrap" in t.get_text() for t in ax.get_legend().get_texts())
    for ax in plot_fid_vs_steps(df).axes:  # every evaluation of every run, on both panels
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert sum(len(c.lines[2][0].get_segments()) for c in bars) == len(df[df["fid"].notna()])
    plain_steps = plot_fid_vs_steps(collect_results(make_fixture_sweep(tmp_path / "plain"))).axes[0]
    assert not plain_steps.containers and not any("bootstrap" in t.get_text() for t in plain_steps.get_legend().get_texts())

    md = write_report([sweep], tmp_path / "report")["md"].read_text()
    top = md.split("Sweeps:")[0]
    best = at.loc[at["fid"].idxmin()]
    expected = (f"- class accuracy: best config {best['config']} (FID {best['fid']:.2f} at step {MAX_STEPS:,}): "
                f"{min(1.0, 3.0 / best['fid']):.1%} of its samples classified as the class they were conditioned on")
    assert expected in top
    assert "| FID 95% interval (bootstrap over samples) | class accuracy @ 3,000 |" in md
    assert f"[{best['fid'] * 0.9:.2f}, {best['fid'] * 1.1:.2f}] | {min(1.0, 3.0 / best['fid']):.1%} |" in md
    assert "FID intervals: a config with one replica: its FID's 95% bootstrap interval over its samples" in md


def test_rows_without_an_fid_interval_or_accuracy_say_so(written):
    md = written["md"].read_text()
    assert "- class accuracy: not measured" in md.split("Sweeps:")[0]
    assert "FID intervals: configs whose rows predate the bootstrap interval have none." in md


def test_the_loss_law_is_drawn_with_its_band(tmp_path):
    from matplotlib.collections import PolyCollection

    from harness.report.figures import plot_loss_vs_compute
    from harness.report.laws import compute_frontier_law

    df = collect_results(make_replica_sweep(tmp_path / "replicas"))
    law = compute_frontier_law(df, n_boot=200)
    assert len(law.fit.band_compute) == 60 and np.isfinite(law.fit.band_lo).all()
    ax = plot_loss_vs_compute(df, law).axes[0]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1
    assert any("band of the law" in t.get_text() for t in ax.get_legend().get_texts())
