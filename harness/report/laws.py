"""Fitted scaling laws, each naming the points it used: pure functions over arrays and the results DataFrame.

- `fit_loglog`: log y = intercept + exponent * log x (FID or val loss vs Gflops at one step), BCa intervals.
- `fit_saturating_power_law`: L(C) = a * C**-b + c (c >= 0) against the plain power law (c = 0), chosen by an
  F-test; intervals by BCa bootstrap over the points, or from the fit's covariance where refits fail.
- `compute_frontier_law`: the lower envelope of the configs' val loss vs training compute curves, and its law.
- `isoflop`: the best config at each compute budget, and optimal Gflops vs budget (log-log).
- `fid_vs_loss`: FID as a function of validation loss (log-log).
- `predict_held_out` / `predict_config`: FID (and val loss) of a config left out of the fit, or outside the grid,
  from the log-log fit vs Gflops of the other configs at one step, with its prediction interval.
Seed replicas (`aggregate_replicas`) live in `harness.report.collect`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import optimize, stats

from harness.errors import HarnessError, require
from harness.report.collect import aggregate_replicas, check_extractors, pick_step, rows_at_step
from harness.report.stats import BOOTSTRAP_RESAMPLES, bca_interval, fit_power_law, predict_fid

MIN_LOGLOG_POINTS = 3  # two parameters and one degree of freedom for the residual scale
MIN_SATURATING_POINTS = 5  # three parameters, and two residual degrees of freedom for the F-test
F_TEST_ALPHA = 0.05


@dataclass(frozen=True)
class LogLogFit:
    """log10(y) = intercept + exponent * log10(x) by least squares over `points`."""

    what: str
    exponent: float
    intercept: float
    r: float
    r2: float
    exponent_ci: tuple[float, float]
    r_ci: tuple[float, float]
    n: int
    points: tuple[str, ...]
    interval: str

    def summary(self) -> str:
        lo, hi = self.exponent_ci
        return (f"{self.what}: exponent = {self.exponent:.3f} [{lo:.3f}, {hi:.3f}], r = {self.r:.3f}, "
                f"R^2 = {self.r2:.3f}, {self.n} points ({self.interval})")


def _labels(labels, n: int) -> tuple[str, ...]:
    return tuple(str(v) for v in labels) if labels is not None else tuple(str(i) for i in range(n))


def _positive_pairs(x, y, what: str, minimum: int, why: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    require(x.shape == y.shape and x.ndim == 1, f"{what}: x and y must be 1-D and of equal length")
    require(len(x) >= minimum, f"{what}: need at least {minimum} points ({why}), got {len(x)}")
    require(bool(np.all(np.isfinite(x) & (x > 0)) and np.all(np.isfinite(y) & (y > 0))),
            f"{what}: every x and y must be positive and finite")
    require(len(np.unique(x)) >= minimum, f"{what}: need at least {minimum} distinct x values, got {len(np.unique(x))}")
    return x, y


def fit_loglog(x, y, labels=None, what: str = "y vs x", n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
               level: float = 0.95) -> LogLogFit:
    """The log-log least-squares fit of y on x, with BCa intervals for the exponent and r over the points: the fit of
    `fit_power_law`, checked and labelled for any pair of quantities."""
    x, y = _positive_pairs(x, y, what, MIN_LOGLOG_POINTS, "two parameters and a residual")
    require(np.ptp(np.log10(y)) > 0, f"{what}: every y is equal; the correlation is undefined")
    fit = fit_power_law(x, y, n_boot=n_boot, seed=seed, level=level)
    return LogLogFit(what=what, exponent=fit.slope, intercept=fit.intercept, r=fit.r, r2=fit.r2,
                     exponent_ci=fit.slope_ci, r_ci=fit.r_ci, n=fit.n, points=_labels(labels, fit.n),
                     interval=fit.interval)


@dataclass(frozen=True)
class SaturatingFit:
    """L(C) = a * C**-b + c; c = 0 where the plain power law was chosen (`model`)."""

    what: str
    model: str  # "saturating" (c > 0 supported by the data) | "power law" (c = 0)
    a: float
    b: float
    c: float
    b_ci: tuple[float, float]
    c_ci: tuple[float, float]
    choice: str  # which test chose the model, and its numbers
    aic_saturating: float
    aic_power: float
    f_pvalue: float
    interval: str  # how b_ci and c_ci were made
    n: int
    points: tuple[str, ...]
    # The law's band: at each compute in band_compute, the `level` BCa interval of L(C) over the same bootstrap refits
    # as b_ci (empty without band_at; NaN where the bootstrap gave none, e.g. the covariance fallback).
    band_compute: tuple[float, ...] = ()
    band_lo: tuple[float, ...] = ()
    band_hi: tuple[float, ...] = ()
    level: float = 0.95

    def predict(self, C):
        return self.a * np.asarray(C, dtype=float) ** -self.b + self.c

    def summary(self) -> str:
        return (f"{self.what}: L = {self.a:.3g} * C^-{self.b:.3f} [{self.b_ci[0]:.3f}, {self.b_ci[1]:.3f}] "
                f"+ {self.c:.4g}; {self.model} ({self.choice}); {self.n} points")


def _fit_curve(lc: np.ndarray, ll: np.ndarray, c_min: float, saturating: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """curve_fit of log L = log(a * x**-b + c), x = C / its geometric mean; -> (a, b, c), covariance, SSE.

    Least squares in log L: relative errors, as losses and FIDs scatter. Two starts for c, the better kept.
    """
    x = np.exp(lc - lc.mean())

    def model(x, log_a, b, c):
        return np.log(np.exp(log_a) * x**-b + c)

    slope, intercept = np.polyfit(np.log(x), ll, 1)
    if not saturating:
        return np.array([intercept, -slope, 0.0]), None, float(((ll - intercept - slope * np.log(x)) ** 2).sum())
    best = None
    for frac in (0.3, 0.8):
        c0 = frac * c_min
        y0 = np.exp(ll) - c0
        if np.any(y0 <= 0):
            continue
        s0, i0 = np.polyfit(np.log(x), np.log(y0), 1)
        try:
            p, cov = optimize.curve_fit(model, x, ll, p0=[i0, max(-s0, 1e-3), c0],
                                        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(((ll - model(x, *p)) ** 2).sum())
        if best is None or sse < best[2]:
            best = (p, cov, sse)
    if best is None:
        raise RuntimeError("the saturating fit did not converge")
    return best


def _to_units(p: np.ndarray, lc: np.ndarray) -> tuple[float, float, float]:
    """(log a, b, c) of the normalised fit -> (a, b, c) in the units of C."""
    return float(np.exp(p[0] + p[1] * lc.mean())), float(p[1]), float(p[2])


def fit_saturating_power_law(C, L, labels=None, what: str = "L vs C", n_boot: int = 1000, seed: int = 0,
                             level: float = 0.95, band_at=None) -> SaturatingFit:
    """L(C) = a * C**-b + c (c >= 0, scipy.optimize.curve_fit in log L) or the plain power law (c = 0).

    The choice: an F-test of the nested models (scipy.stats.f, 1 and n - 3 degrees of freedom) at
    F_TEST_ALPHA; c is kept only when the extra parameter lowers the residual significantly (a test rather than
    AIC, whose one-parameter penalty keeps a spurious c more often; both AICs are reported). Intervals for b (and
    c): BCa bootstrap over the points (`bca_interval`, refitting the chosen model on each resample); where more
    than half of the refits fail, the covariance of the fit with Student t quantiles instead, stated in `interval`.
    `band_at` (compute values): the fitted law's band there, BCa intervals of L(C) from the same refits.
    """
    C, L = _positive_pairs(C, L, what, MIN_SATURATING_POINTS, "three parameters and two degrees of freedom for the F-test")
    lc, ll = np.log(C), np.log(L)
    n = len(C)
    try:
        p_sat, cov_sat, sse_sat = _fit_curve(lc, ll, L.min(), saturating=True)
    except RuntimeError as err:
        raise HarnessError(f"{what}: {err}") from None
    p_pow, _, sse_pow = _fit_curve(lc, ll, L.min(), saturating=False)
    sse_sat = min(sse_sat, sse_pow)  # c = 0 is inside the saturating model's bounds
    aic_sat = n * math.log(max(sse_sat, 1e-300) / n) + 2 * 3
    aic_pow = n * math.log(max(sse_pow, 1e-300) / n) + 2 * 2
    f_stat = (sse_pow - sse_sat) / (sse_sat / (n - 3)) if sse_sat > 0 else math.inf
    f_p = float(stats.f.sf(f_stat, 1, n - 3))
    saturating = f_p < F_TEST_ALPHA and p_sat[2] > 0
    choice = (f"F-test of c = 0: F = {f_stat:.3g}, p = {f_p:.3g} {'<' if saturating else '>='} {F_TEST_ALPHA}; "
              f"AIC {aic_sat:.2f} (with c) vs {aic_pow:.2f} (c = 0)")
    p = p_sat if saturating else p_pow
    a, b, c = _to_units(p, lc)
    band_c = np.asarray(band_at if band_at is not None else [], dtype=float)

    def refit(cs, ls):
        # b, c and the refitted law at band_c: one bootstrap gives the exponent's interval and the band.
        if len(np.unique(cs)) < (4 if saturating else 2):
            return np.full(2 + len(band_c), np.nan)
        try:
            q = _fit_curve(cs, ls, float(np.exp(ls).min()), saturating=saturating)[0]
        except RuntimeError:
            return np.full(2 + len(band_c), np.nan)
        qa, qb, qc = _to_units(q, cs)
        return np.concatenate([[q[1], q[2]], qa * band_c**-qb + qc])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        boot = bca_interval((lc, ll), refit, n_boot, seed, level, vectorized=False)
    b_ci, c_ci = (tuple(float(v) for v in row) for row in boot.ci[:2])
    band_lo, band_hi = (tuple(float(v) for v in boot.ci[2:, k]) for k in (0, 1))
    interval = boot.note
    if boot.dropped > n_boot // 2 and saturating:
        half = stats.t.ppf((1 + level) / 2, n - 3) * np.sqrt(np.diag(cov_sat))
        b_ci, c_ci = (b - half[1], b + half[1]), (max(c - half[2], 0.0), c + half[2])
        interval = (f"{level:.0%} from the fit's covariance (Student t, n - 3 dof): {boot.dropped} of {n_boot} "
                    "bootstrap refits failed; no band")
        band_lo = band_hi = tuple(math.nan for _ in band_c)
    if not saturating:
        c_ci = (math.nan, math.nan)
    return SaturatingFit(what=what, model="saturating" if saturating else "power law", a=a, b=b, c=c, b_ci=b_ci,
                         c_ci=c_ci, choice=choice, aic_saturating=aic_sat, aic_power=aic_pow, f_pvalue=f_p,
                         interval=interval, n=n, points=_labels(labels, n),
                         band_compute=tuple(float(v) for v in band_c), band_lo=band_lo, band_hi=band_hi, level=level)


# ---- over the results table ---------------------------------------------------------------------------------


def _one_kind(df: pd.DataFrame, what: str, fid: bool = False) -> None:
    """HarnessError if `df` mixes datasets (or, for an FID fit, FID kinds / feature extractors)."""
    columns = ["dataset", "image_size"] + (["fid_name", "feature_extractor"] if fid else [])
    for col in columns:
        if col in df:
            values = sorted(df[col].dropna().astype(str).unique())
            require(len(values) <= 1, f"{what}: the points mix {col} values ({', '.join(values)}); "
                                      f"fit one {col} at a time")


def _loss_points(df: pd.DataFrame, what: str) -> pd.DataFrame:
    for col in ("val_loss", "train_compute_flops", "config"):
        require(col in df, f"{what}: the results have no {col} column")
    pts = df.dropna(subset=["val_loss", "train_compute_flops"])
    require(len(pts) > 0, f"{what}: no row has both val_loss and train_compute_flops")
    _one_kind(pts, what)
    return pts.sort_values(["config", "train_compute_flops"])


def _log_interp(curve: pd.DataFrame, budget: float) -> float:
    """The config's val loss at `budget`, interpolated linearly in (log compute, log loss); NaN outside its range."""
    c, v = np.log(curve["train_compute_flops"].to_numpy()), np.log(curve["val_loss"].to_numpy())
    b = math.log(budget)
    if b < c.min() - 1e-12 or b > c.max() + 1e-12:
        return math.nan
    return float(np.exp(np.interp(b, c, v)))


@dataclass(frozen=True)
class FrontierLaw:
    curves: pd.DataFrame  # config, step, train_compute_flops, val_loss: every config's curve
    frontier: pd.DataFrame  # the points on the lower envelope
    fit: SaturatingFit


def compute_frontier_law(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> FrontierLaw:
    """Per config the val loss vs training compute curve; the lower envelope across configs; its law.

    A point is on the envelope when no other config's curve (interpolated in log compute within its range) is
    lower at the same compute. The envelope's points are fitted with `fit_saturating_power_law`, with its band over
    the compute the figure draws (from the frontier's first point / 1.5 to the largest compute x 1.5).
    """
    what = "compute frontier law"
    pts = _loss_points(df, what)
    curves = pts[["config", "step", "train_compute_flops", "val_loss"]].reset_index(drop=True)
    groups = dict(tuple(curves.groupby("config")))
    on = []
    for i, row in curves.iterrows():
        others = [_log_interp(g, row["train_compute_flops"]) for name, g in groups.items() if name != row["config"]]
        on.append(all(not (o < row["val_loss"]) for o in others))
    frontier = curves[on].sort_values("train_compute_flops").reset_index(drop=True)
    band_at = np.geomspace(frontier["train_compute_flops"].min() / 1.5, curves["train_compute_flops"].max() * 1.5, 60)
    fit = fit_saturating_power_law(frontier["train_compute_flops"], frontier["val_loss"],
                                   labels=[f"{c}@{int(s)}" for c, s in zip(frontier["config"], frontier["step"])],
                                   what="val loss vs training compute (frontier)", n_boot=n_boot, seed=seed,
                                   band_at=band_at)
    return FrontierLaw(curves=curves, frontier=frontier, fit=fit)


@dataclass(frozen=True)
class IsoflopResult:
    table: pd.DataFrame  # budget, config, gflops, val_loss, configs_compared
    fit: LogLogFit | None  # optimal Gflops vs budget; None when it cannot be fitted (`note` says why)
    note: str


def isoflop(df: pd.DataFrame, budgets, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> IsoflopResult:
    """At each budget (FLOPs), the config with the lowest val loss (curves interpolated in log compute, only
    configs whose evaluated range spans the budget), and a log-log fit of the optimal Gflops vs budget."""
    what = "isoflop"
    pts = _loss_points(df, what)
    require("gflops" in pts, f"{what}: the results have no gflops column")
    budgets = np.asarray(budgets, dtype=float)
    require(budgets.ndim == 1 and len(budgets) > 0 and bool(np.all(budgets > 0)),
            f"{what}: budgets must be a non-empty list of positive FLOPs")
    rows = []
    for budget in budgets:
        losses = {name: _log_interp(g, budget) for name, g in pts.groupby("config")}
        losses = {k: v for k, v in losses.items() if not math.isnan(v)}
        require(len(losses) > 0, f"{what}: no config's curve spans the budget {budget:.3g} FLOPs (evaluated compute "
                                 f"{pts['train_compute_flops'].min():.3g} to {pts['train_compute_flops'].max():.3g})")
        best = min(losses, key=losses.get)
        rows.append({"budget": budget, "config": best, "gflops": float(pts.loc[pts["config"] == best, "gflops"].iloc[0]),
                     "val_loss": losses[best], "configs_compared": len(losses)})
    table = pd.DataFrame(rows)
    try:
        fit = fit_loglog(table["budget"], table["gflops"], labels=table["config"],
                         what="optimal Gflops vs compute budget", n_boot=n_boot, seed=seed)
        note = f"fitted over {len(table)} budgets"
    except HarnessError as err:
        fit, note = None, f"no fit of optimal Gflops vs budget: {err}"
    return IsoflopResult(table=table, fit=fit, note=note)


def fid_vs_loss(df: pd.DataFrame, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> LogLogFit:
    """FID vs validation loss, log-log, over every evaluation (config x step) that has both; one FID kind."""
    what = "FID vs val loss"
    require("val_loss" in df, f"{what}: the results have no val_loss column")
    pts = df.dropna(subset=["fid", "val_loss"])
    _one_kind(pts, what, fid=True)
    return fit_loglog(pts["val_loss"], pts["fid"], labels=[f"{c}@{int(s)}" for c, s in zip(pts["config"], pts["step"])],
                      what=what, n_boot=n_boot, seed=seed)


# ---- held-out prediction -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One config's `quantity` (FID or val loss) predicted from a log-log fit vs Gflops of other configs.

    `measured`, `error` (measured - predicted) and `inside` (measured within the interval) are None for a config
    outside the grid. `fit_configs` are the configs the fit used, at `step`.
    """

    quantity: str
    config: str
    gflops: float
    predicted: float
    interval: tuple[float, float]
    level: float
    step: int
    fit_configs: tuple[str, ...]
    measured: float | None = None
    error: float | None = None
    inside: bool | None = None

    def line(self) -> str:
        lo, hi = self.interval
        digits = ".2f" if self.quantity == "FID" else ".4g"
        if self.measured is not None:
            head = f"held-out {self.config}"
        elif self.config.endswith("Gflops"):
            head = f"config at {self.config}"
        else:
            head = f"config {self.config} ({self.gflops:.4g} Gflops)"
        text = f"{head}: predicted {self.quantity} {self.predicted:{digits}} [{lo:{digits}}, {hi:{digits}}]"
        if self.measured is not None:
            where = "inside" if self.inside else "OUTSIDE"
            text += (f", measured {self.measured:{digits}} (error {self.error:+{digits}}, {where} the "
                     f"{self.level:.0%} prediction interval)")
        return text + f" (fit on {len(self.fit_configs)} configs at step {self.step:,})"


QUANTITIES = {"FID": "fid", "val loss": "val_loss"}


def config_points(df: pd.DataFrame, step: int | None = None) -> tuple[pd.DataFrame, int]:
    """One point per config (seed replicas averaged, `aggregate_replicas`) at `step` (default: the report's), one
    FID kind: columns config, gflops, fid_mean and, where the rows have them, val_loss_mean; and the step."""
    check_extractors(df)
    step, _ = pick_step(df, step)
    return aggregate_replicas(rows_at_step(df, step)), step


def _predict(points: pd.DataFrame, quantity: str, gflops: float, label: str, step: int,
             held_out: pd.Series | None = None, level: float = 0.95) -> Prediction:
    col = f"{QUANTITIES[quantity]}_mean"
    pts = points.dropna(subset=[col]) if col in points else points.iloc[:0]
    need = 3  # fit_power_law: two parameters and one residual degree of freedom
    require(len(pts) >= need, f"predicting {quantity} of {label}: {len(pts)} other config(s) have a {quantity} at "
                              f"step {step:,} ({', '.join(pts['config']) or 'none'}); need at least {need} to fit")
    fit = fit_power_law(pts["gflops"], pts[col], n_boot=0, level=level)
    predicted, lo, hi = predict_fid(fit, gflops)
    prediction = Prediction(quantity=quantity, config=label, gflops=float(gflops), predicted=predicted,
                            interval=(lo, hi), level=level, step=step, fit_configs=tuple(pts["config"]))
    if held_out is None or not pd.notna(held_out.get(col)):
        return prediction
    measured = float(held_out[col])
    return replace(prediction, measured=measured, error=measured - predicted, inside=bool(lo <= measured <= hi))


def _member(label: str, config: str) -> bool:
    """`config` names this point: its label, or one replica's label within it ("A + B")."""
    return config == label or config in label.split(" + ")


def predict_held_out(df: pd.DataFrame, config: str, step: int | None = None, level: float = 0.95) -> list[Prediction]:
    """Fit FID (and val loss, where the rows have it) vs Gflops on every config except `config` at `step` (default:
    the report's step), and predict `config`: its prediction interval, measured value and error.

    HarnessError (one line) if `config` is not among the configs evaluated at the step (they are listed), or if
    fewer than 3 configs are left to fit.
    """
    points, step = config_points(df, step)
    match = points[[_member(label, config) for label in points["config"]]]
    require(len(match) == 1, f"--holdout {config}: not a config evaluated at step {step:,}; configs: "
                             f"{', '.join(points['config'])}")
    held, rest = match.iloc[0], points.drop(index=match.index)
    predictions = [_predict(rest, "FID", held["gflops"], held["config"], step, held, level)]
    if pd.notna(held.get("val_loss_mean")):
        predictions.append(_predict(rest, "val loss", held["gflops"], held["config"], step, held, level))
    return predictions


def predict_config(df: pd.DataFrame, gflops: float, step: int | None = None, label: str | None = None,
                   level: float = 0.95) -> list[Prediction]:
    """Predict FID (and val loss, where at least 3 configs have it) of a config outside the grid from its Gflops,
    with the fit over every config at `step` (default: the report's step)."""
    require(gflops > 0 and math.isfinite(gflops), f"predict_config: Gflops must be positive, got {gflops}")
    points, step = config_points(df, step)
    label = label or f"{gflops:.4g} Gflops"
    predictions = [_predict(points, "FID", gflops, label, step, level=level)]
    if "val_loss_mean" in points and points["val_loss_mean"].notna().sum() >= 3:
        predictions.append(_predict(points, "val loss", gflops, label, step, level=level))
    return predictions
