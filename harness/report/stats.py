"""Statistics of the results: the Gflops-vs-FID power-law fit, its predictions and the compute frontier.

`fit_power_law` is a log-log least-squares fit with percentile bootstrap intervals for r and the slope;
`predict_fid` gives the regression prediction interval of one new config; `compute_frontier` the best
FID reached within each training-compute budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.errors import require
from harness.report.collect import evaluated

BOOTSTRAP_RESAMPLES = 2000
PREDICTION_INTERVAL = (
    "regression prediction interval in log-log space (Student t, n - 2 degrees of freedom): "
    "the range expected for one new config's FID, not for the fitted line"
)


@dataclass(frozen=True)
class PowerLawFit:
    """log10(FID) = intercept + slope * log10(Gflops), by least squares, with bootstrap intervals."""

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

    def summary(self) -> str:
        """`Gflops vs FID: r = -0.94 [-0.99, -0.83], slope = -0.36` (the interval is the bootstrap CI)."""
        lo, hi = self.r_ci
        return f"Gflops vs FID: r = {self.r:.3f} [{lo:.3f}, {hi:.3f}], slope = {self.slope:.3f}"


def fit_power_law(gflops, fid, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95) -> PowerLawFit:
    """Fit FID = 10**intercept * Gflops**slope in log-log space.

    r is Pearson's correlation of log10(Gflops) and log10(FID) (the paper's -0.93 across its 12
    models is this number); `r_ci` and `slope_ci` are percentile intervals at `level` from
    `n_boot` pair resamples drawn with `np.random.default_rng(seed)` (n_boot=0: no intervals).
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
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1])
    resid = y - (intercept + slope * x)
    sxx = float(((x - x.mean()) ** 2).sum())
    r_ci = slope_ci = (math.nan, math.nan)
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        bx, by = x[idx], y[idx]
        bx = bx - bx.mean(axis=1, keepdims=True)
        by = by - by.mean(axis=1, keepdims=True)
        bxx, byy, bxy = (bx * bx).sum(1), (by * by).sum(1), (bx * by).sum(1)
        # A resample that repeats one point has no slope or correlation: leave it out.
        ok = (bxx > 1e-12) & (byy > 1e-12)
        q = [(1 - level) / 2, (1 + level) / 2]
        r_ci = tuple(float(v) for v in np.quantile(bxy[ok] / np.sqrt(bxx[ok] * byy[ok]), q))
        slope_ci = tuple(float(v) for v in np.quantile(bxy[ok] / bxx[ok], q))
    return PowerLawFit(
        slope=float(slope), intercept=float(intercept), r=r, r2=r * r, r_ci=r_ci, slope_ci=slope_ci, n=n,
        level=level, n_boot=n_boot, seed=seed, x_mean=float(x.mean()), sxx=sxx,
        resid_std=float(np.sqrt((resid**2).sum() / (n - 2))),
        gflops_range=(float(10 ** x.min()), float(10 ** x.max())),
    )


def predict_fid(fit: PowerLawFit, gflops):
    """FID predicted by `fit` at `gflops` (a number or an array) -> (fid, lo, hi).

    (lo, hi) is the `fit.level` regression prediction interval in log-log space (see
    PREDICTION_INTERVAL); it widens away from the fitted Gflops range, and extrapolating far
    beyond `fit.gflops_range` is a guess however narrow the interval looks.
    """
    # heavy: scipy, imported only when a prediction is asked for (stdtrit, the Student t quantile, is lighter to
    # import than scipy.stats)
    from scipy.special import stdtrit

    g = np.asarray(gflops, dtype=float)
    require(bool(np.all(g > 0)), f"predict_fid: Gflops must be positive, got {gflops}")
    x0 = np.log10(g)
    y0 = fit.intercept + fit.slope * x0
    se = fit.resid_std * np.sqrt(1 + 1 / fit.n + (x0 - fit.x_mean) ** 2 / fit.sxx)
    half = stdtrit(fit.n - 2, (1 + fit.level) / 2) * se
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
