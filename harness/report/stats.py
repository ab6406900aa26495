"""Statistics of the results: the Gflops-vs-FID power-law fit, its predictions and the compute frontier.

`fit_power_law` is a log-log least-squares fit with BCa bootstrap intervals (scipy.stats.bootstrap, the configs
resampled as (Gflops, FID) pairs) for r and the slope; `bca_interval` is that bootstrap, shared with
`harness.report.laws`;
`predict_fid` gives the regression prediction interval of one new config; `compute_frontier` the best
FID reached within each training-compute budget.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from harness.errors import require
from harness.report.collect import evaluated

BOOTSTRAP_RESAMPLES = 2000
PREDICTION_INTERVAL = (
    "regression prediction interval in log-log space (Student t, n - 2 degrees of freedom): "
    "the range expected for one new config's FID, not for the fitted line"
)


@dataclass(frozen=True)
class PowerLawFit:
    """log10(FID) = intercept + slope * log10(Gflops), by least squares, with BCa bootstrap intervals."""

    slope: float
    intercept: float
    r: float
    r2: float
    r_ci: tuple[float, float]
    slope_ci: tuple[float, float]
    n: int
    level: float
    n_boot: int
    seed: int
    # What predict_fid needs: the mean and spread of log10(Gflops) and the residual scale.
    x_mean: float
    sxx: float
    resid_std: float
    gflops_range: tuple[float, float]
    # How the intervals were made, and how many resamples had no slope (one distinct Gflops) and were left out.
    interval: str = "BCa bootstrap"
    boot_dropped: int = 0

    def summary(self) -> str:
        """`Gflops vs FID: r = -0.94 [-0.99, -0.83], slope = -0.36` (the interval is the bootstrap CI)."""
        lo, hi = self.r_ci
        return f"Gflops vs FID: r = {self.r:.3f} [{lo:.3f}, {hi:.3f}], slope = {self.slope:.3f}"


def slope_and_r(x, y, axis=-1):
    """Least-squares slope of y on x and Pearson's r along `axis`, stacked: shape (2, ...).

    NaN where x (slope and r) or y (r) does not vary: a bootstrap resample that repeats one point.
    """
    x = x - x.mean(axis=axis, keepdims=True)
    y = y - y.mean(axis=axis, keepdims=True)
    sxx, syy, sxy = (x * x).sum(axis=axis), (y * y).sum(axis=axis), (x * y).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(sxx > 1e-12, sxy / sxx, np.nan)
        r = np.where((sxx > 1e-12) & (syy > 1e-12), sxy / np.sqrt(sxx * syy), np.nan)
    return np.stack([slope, r])


@dataclass(frozen=True)
class BootInterval:
    """`ci`: shape (k, 2), the (lo, hi) of each of the statistic's k values; NaN where BCa is undefined."""

    ci: np.ndarray
    n_boot: int
    dropped: int  # resamples whose statistic was undefined (NaN), left out of the bootstrap distribution
    note: str  # how the interval was made, in words


def bca_interval(data, statistic, n_boot: int, seed: int, level: float, vectorized: bool = True) -> BootInterval:
    """BCa intervals of a vector-valued `statistic` of paired samples, by `scipy.stats.bootstrap`.

    The points (the i-th element of every array in `data`) are resampled together (paired=True), with
    `np.random.default_rng(seed)`. A resample where the statistic is undefined (NaN: e.g. one distinct x, no
    slope) is left out and the BCa interval is computed from the others (bootstrap's `bootstrap_result` with
    n_resamples=0), i.e. conditional on a defined statistic, as the old percentile bootstrap did. Where BCa itself
    is undefined (scipy documents NaN and a DegenerateDataWarning: a bootstrap distribution with one value, as
    for an exact law, or a jackknife with no spread) the interval is NaN and `note` says so.
    """
    kwargs = dict(paired=True, vectorized=vectorized, confidence_level=level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        raw = stats.bootstrap(data, statistic, n_resamples=n_boot, method="percentile",
                              rng=np.random.default_rng(seed), **kwargs)
    dist = np.atleast_2d(raw.bootstrap_distribution)
    ok = np.all(np.isfinite(dist), axis=0)
    note = f"{level:.0%} BCa bootstrap (scipy.stats.bootstrap), {n_boot} paired resamples of the points, seed {seed}"
    if ok.sum() < max(10, n_boot // 2):
        ci = np.full((dist.shape[0], 2), np.nan)
        return BootInterval(ci, n_boot, int((~ok).sum()), f"{note}: undefined, only {ok.sum()} resamples had a value")
    if not ok.all():
        note += f" ({(~ok).sum()} resamples with an undefined statistic left out)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stats.DegenerateDataWarning)
        res = stats.bootstrap(data, statistic, n_resamples=0, method="BCa",
                              bootstrap_result=replace(raw, bootstrap_distribution=dist[:, ok]), **kwargs)
    ci = np.stack([np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)], axis=-1)
    if np.isnan(ci).any() or any(issubclass(w.category, stats.DegenerateDataWarning) for w in caught):
        note += "; BCa undefined for some values (degenerate bootstrap distribution, e.g. an exact fit): NaN"
    return BootInterval(ci, n_boot, int((~ok).sum()), note)


def fit_power_law(gflops, fid, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> PowerLawFit:
    """Fit FID = 10**intercept * Gflops**slope in log-log space.

    r is Pearson's correlation of log10(Gflops) and log10(FID) (the paper's -0.93 across its 12
    models is this number); `r_ci` and `slope_ci` are BCa intervals at `level` from `n_boot` paired
    resamples of the configs (`bca_interval`, seeded by `seed`; n_boot=0: no intervals).
    """
    g, f = np.asarray(gflops, dtype=float), np.asarray(fid, dtype=float)
    require(g.shape == f.shape and g.ndim == 1, "fit_power_law: gflops and fid must be 1-D and of equal length")
    require(len(g) >= 3, f"fit_power_law: need at least 3 configs to fit, got {len(g)}")
    require(bool(np.all(np.isfinite(g) & (g > 0)) and np.all(np.isfinite(f) & (f > 0))),
            "fit_power_law: Gflops and FID must be positive and finite")
    x, y = np.log10(g), np.log10(f)
    require(np.ptp(x) > 0, "fit_power_law: all configs have the same Gflops; nothing to fit")
    require(np.ptp(y) > 0, "fit_power_law: all FIDs are equal; the correlation is undefined")
    n = len(x)
    line = stats.linregress(x, y)
    slope, intercept, r = float(line.slope), float(line.intercept), float(line.rvalue)
    resid = y - (intercept + slope * x)
    r_ci = slope_ci = (math.nan, math.nan)
    interval, dropped = "none (n_boot=0)", 0
    if n_boot > 0:
        boot = bca_interval((x, y), slope_and_r, n_boot, seed, level)
        slope_ci, r_ci = (tuple(float(v) for v in row) for row in boot.ci)
        interval, dropped = boot.note, boot.dropped
    return PowerLawFit(
        slope=slope, intercept=intercept, r=r, r2=r * r, r_ci=r_ci, slope_ci=slope_ci, n=n,
        level=level, n_boot=n_boot, seed=seed, x_mean=float(x.mean()), sxx=float(((x - x.mean()) ** 2).sum()),
        resid_std=float(np.sqrt((resid**2).sum() / (n - 2))),
        gflops_range=(float(10 ** x.min()), float(10 ** x.max())), interval=interval, boot_dropped=dropped,
    )


def predict_fid(fit: PowerLawFit, gflops):
    """FID predicted by `fit` at `gflops` (a number or an array) -> (fid, lo, hi).

    (lo, hi) is the `fit.level` regression prediction interval in log-log space (see
    PREDICTION_INTERVAL); it widens away from the fitted Gflops range, and extrapolating far
    beyond `fit.gflops_range` is a guess however narrow the interval looks.
    """
    g = np.asarray(gflops, dtype=float)
    require(bool(np.all(g > 0)), f"predict_fid: Gflops must be positive, got {gflops}")
    x0 = np.log10(g)
    y0 = fit.intercept + fit.slope * x0
    se = fit.resid_std * np.sqrt(1 + 1 / fit.n + (x0 - fit.x_mean) ** 2 / fit.sxx)
    half = stats.t.ppf((1 + fit.level) / 2, fit.n - 2) * se
    fid, lo, hi = 10**y0, 10 ** (y0 - half), 10 ** (y0 + half)
    if g.ndim == 0:
        return float(fid), float(lo), float(hi)
    return fid, lo, hi


def prediction_points(gflops) -> list[tuple[str, float]]:
    """Two configs not in the grid: the middle of the widest Gflops gap (in log space) and twice the largest."""
    g = np.unique(np.asarray(gflops, dtype=float))
    gaps = np.diff(np.log10(g))
    k = int(np.argmax(gaps))
    mid = float(10 ** ((np.log10(g[k]) + np.log10(g[k + 1])) / 2))
    return [("inside the grid (widest Gflops gap, geometric middle)", mid),
            ("beyond the grid (2 x the largest Gflops)", float(2 * g.max()))]


def compute_frontier(df: pd.DataFrame) -> pd.DataFrame:
    """The compute frontier: each training-compute budget at which a new best FID was reached.

    Walks every evaluation (all runs, all steps) in order of training compute, Gflops x 1e9 x batch x
    steps x 3, and keeps those that beat every cheaper one; the best FID within a budget B is the last
    frontier row with train_compute_flops <= B. One frontier per FID kind (fid_name).
    """
    ev = evaluated(df).dropna(subset=["train_compute_flops"])
    rows = []
    for _, group in ev.groupby(ev["fid_name"].fillna("unknown")):
        best = math.inf
        for _, row in group.sort_values(["train_compute_flops", "fid"]).iterrows():
            if row["fid"] < best:
                best = row["fid"]
                rows.append(row)
    cols = ["train_compute_flops", "fid", "config", "step", "gflops", "global_batch_size", "state", "fid_name", "run_path"]
    return pd.DataFrame(rows, columns=cols).reset_index(drop=True)
