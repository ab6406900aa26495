"""The fitted laws (harness.report.laws) and seed replicas (collect.aggregate_replicas) on synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fixtures.sweep import make_replica_sweep
from harness.errors import HarnessError
from harness.report.collect import aggregate_replicas, collect_results
from harness.report.laws import (compute_frontier_law, fid_vs_loss, fit_loglog, fit_saturating_power_law,
                                 isoflop)

COVERAGE_TRIALS = 200
COVERAGE_POINTS = 20


def test_loglog_recovers_the_exponent_and_names_its_points():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 1000, 12)
    y = 30 * x**-0.4 * 10 ** rng.normal(0, 0.02, x.size)
    fit = fit_loglog(x, y, labels=[f"c{i}" for i in range(12)], what="FID vs Gflops", n_boot=999)
    assert abs(fit.exponent + 0.4) < 0.02 and fit.exponent_ci[0] < -0.4 < fit.exponent_ci[1]
    assert fit.n == 12 and fit.points[0] == "c0" and fit.r2 == pytest.approx(fit.r**2)
    assert "BCa" in fit.interval and "FID vs Gflops" in fit.summary()


def test_bca_interval_covers_the_true_exponent_at_about_95_percent():
    """Over repeated synthetic sweeps the 95% BCa interval covers the true exponent within a binomial band."""
    rng = np.random.default_rng(1)
    x = np.geomspace(1, 100, COVERAGE_POINTS)
    covered = 0
    for trial in range(COVERAGE_TRIALS):
        y = 10 * x**-0.3 * 10 ** rng.normal(0, 0.05, x.size)
        lo, hi = fit_loglog(x, y, n_boot=499, seed=trial).exponent_ci
        covered += lo < -0.3 < hi
    # 99.9% of Binomial(trials, 0.95) lies in this band.
    lo_band, hi_band = stats.binom.interval(0.999, COVERAGE_TRIALS, 0.95)
    print(f"coverage {covered}/{COVERAGE_TRIALS}, band [{lo_band:.0f}, {hi_band:.0f}]")
    assert lo_band <= covered <= hi_band


def test_saturating_law_recovers_b_and_c_and_the_f_test_keeps_c():
    rng = np.random.default_rng(2)
    C = np.geomspace(1e15, 1e19, 12)
    L = 2e3 * C**-0.25 + 0.6
    L = L * np.exp(rng.normal(0, 0.005, C.size))
    fit = fit_saturating_power_law(C, L, n_boot=200)
    assert fit.model == "saturating" and fit.f_pvalue < 0.05 and "F-test" in fit.choice
    assert abs(fit.b - 0.25) < 0.04 and abs(fit.c - 0.6) < 0.05
    assert fit.b_ci[0] < 0.25 < fit.b_ci[1] and fit.c_ci[0] < 0.6 < fit.c_ci[1]
    assert fit.predict(1e17) == pytest.approx(2e3 * 1e17**-0.25 + 0.6, rel=0.02)


def test_the_law_has_a_band_from_its_bootstrap_refits_that_holds_the_true_curve():
    rng = np.random.default_rng(2)
    C = np.geomspace(1e15, 1e19, 12)
    L = (2e3 * C**-0.25 + 0.6) * np.exp(rng.normal(0, 0.005, C.size))
    at = np.geomspace(1e15, 1e19, 9)
    fit = fit_saturating_power_law(C, L, n_boot=200, band_at=at)
    lo, hi = np.array(fit.band_lo), np.array(fit.band_hi)
    assert fit.band_compute == pytest.approx(tuple(at)) and fit.level == 0.95
    truth = 2e3 * at**-0.25 + 0.6
    assert np.all(lo < fit.predict(at)) and np.all(fit.predict(at) < hi)
    assert np.mean((lo < truth) & (truth < hi)) >= 0.75
    # Wider where the points thin out (past the last one) than inside the data.
    wide = fit_saturating_power_law(C, L, n_boot=200, band_at=[1e17, 1e21])
    assert np.diff([wide.band_lo[1], wide.band_hi[1]]) > np.diff([wide.band_lo[0], wide.band_hi[0]])
    assert fit_saturating_power_law(C, L, n_boot=200).band_compute == ()


def test_plain_power_law_is_chosen_without_an_irreducible_term():
    rng = np.random.default_rng(3)
    C = np.geomspace(1e15, 1e19, 12)
    L = 5e3 * C**-0.2 * np.exp(rng.normal(0, 0.01, C.size))
    fit = fit_saturating_power_law(C, L, n_boot=200)
    assert fit.model == "power law" and fit.c == 0 and np.isnan(fit.c_ci).all()
    assert abs(fit.b - 0.2) < 0.01 and fit.b_ci[0] < 0.2 < fit.b_ci[1]


@pytest.mark.parametrize("call, match", [
    (lambda: fit_loglog([1.0, 2.0], [3.0, 2.0]), "at least 3 points"),
    (lambda: fit_saturating_power_law([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.5, 2.2]), "at least 5 points"),
    (lambda: fit_loglog([1.0, 2.0, -3.0], [3.0, 2.0, 1.0]), "positive"),
])
def test_too_few_points_and_bad_values_are_one_line_errors(call, match):
    with pytest.raises(HarnessError, match=match):
        call()


def _curves(configs: dict[str, float], dataset: str = "digits") -> pd.DataFrame:
    """Per config (name -> Gflops) a val loss curve vs compute: small configs learn fast and plateau high."""
    rows = []
    for name, gflops in configs.items():
        floor = 0.5 + 0.4 / gflops**0.5
        for step in (1000, 2000, 4000, 8000, 16000, 32000):
            compute = gflops * 1e9 * 64 * step * 3
            rows.append({"config": name, "gflops": gflops, "step": step, "train_compute_flops": compute,
                         "val_loss": floor + 3.0 * (step * gflops**0.3) ** -0.4, "dataset": dataset,
                         "fid": 10 * (floor + 3.0 * (step * gflops**0.3) ** -0.4) ** 2, "fid_name": "fid_digits"})
    return pd.DataFrame(rows)


CONFIGS = {"S": 1.0, "M": 4.0, "L": 16.0}


def test_isoflop_picks_the_best_config_at_each_budget():
    df = _curves(CONFIGS)
    budgets = [3e14, 1e15, 5e15, 1e16]
    result = isoflop(df, budgets, n_boot=200)
    for budget, best in zip(budgets, result.table["config"]):
        at = {name: np.interp(np.log(budget), np.log(g["train_compute_flops"]), g["val_loss"])
              for name, g in df.groupby("config") if g["train_compute_flops"].min() <= budget <= g["train_compute_flops"].max()}
        assert best == min(at, key=at.get)
    assert list(result.table["config"])[0] == "S" and list(result.table["config"])[-1] in ("M", "L")
    with pytest.raises(HarnessError, match="spans the budget"):
        isoflop(df, [1e30])


def test_frontier_law_and_fid_vs_loss():
    df = _curves(CONFIGS)
    law = compute_frontier_law(df, n_boot=100)
    assert set(law.curves["config"]) == set(CONFIGS) and len(law.frontier) >= 5
    assert law.fit.n == len(law.frontier) and law.fit.points[0].startswith("S@")
    fit = fid_vs_loss(df, n_boot=200)
    assert fit.exponent == pytest.approx(2.0, abs=1e-6) and fit.n == len(df)
    with pytest.raises(HarnessError, match="mix dataset"):
        compute_frontier_law(pd.concat([df, _curves({"X": 2.0}, dataset="cifar")]))


def test_replicas_aggregate_to_a_t_interval(tmp_path):
    df = collect_results(make_replica_sweep(tmp_path / "sweep"))
    assert sorted(df["train_seed"].unique()) == [0, 1, 2] and (df["seed"] == 0).all()
    assert df["replica_key"].nunique() == 2
    agg = aggregate_replicas(df)
    assert len(agg) == 2 * 3 and (agg["n_replicas"] == 3).all()
    row = agg.iloc[-1]
    values = df[(df["replica_key"] == row["replica_key"]) & (df["step"] == row["step"])]["fid"]
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    assert row["fid_mean"] == pytest.approx(values.mean()) and row["fid_hi"] == pytest.approx(values.mean() + half)
    assert row["fid_interval_source"] == "t over 3 replicas" and row["val_loss_n"] == 3


def test_one_replica_has_no_interval(tmp_path):
    agg = aggregate_replicas(collect_results(make_replica_sweep(tmp_path / "sweep", seeds=(0,))))
    assert agg["fid_std"].isna().all() and agg["fid_lo"].isna().all()
    assert agg["fid_interval_source"].str.startswith("one replica: unknown").all()


def test_a_replica_missing_a_step_is_an_error_unless_excluded(tmp_path):
    df = collect_results(make_replica_sweep(tmp_path / "sweep", missing={("mini-S", 1): 2000}))
    with pytest.raises(HarnessError, match=r"s1\) has no evaluation at step\(s\) 2,000"):
        aggregate_replicas(df)
    agg = aggregate_replicas(df, exclude_steps=[2000])
    assert 2000 not in set(agg["step"]) and (agg["n_replicas"] == 3).all()
