"""Results table, the paper's scaling figures, Gflops-vs-FID fits and the sweep report.

Everything a researcher looks at after a sweep comes from here, so the CLI (`harness report`), the
notebooks in `analysis/` and the tests all call the same functions:

- `collect_results(sweep_dirs)`: one tidy row per run x evaluated step, with the run's state;
- figures in the style of the DiT paper: FID vs Gflops (Fig. 8), FID vs training steps (Fig. 6),
  FID vs training compute (Fig. 9) and a grid of samples per config;
- `fit_power_law` (log-log least squares with a bootstrap interval for r and the slope),
  `predict_fid` (with a regression prediction interval) and `compute_frontier`;
- `write_report(sweep_dirs, out_dir)`: report.md, a self-contained report.html, results.csv,
  fits.json and the figures as PNG and SVG.

FIDs computed in different feature spaces (the digits CNN's `fid_digits` vs Inception's
`fid_inception`) are different quantities; nothing here puts them on one axis unless asked.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter

from harness.errors import HarnessError, require
from harness.flops import REFERENCE_DIR, training_compute_flops
from harness.io import (atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_path, read_json, read_jsonl,
                        read_yaml, replace_dir, staging_dir)

PAPER_TABLE4 = REFERENCE_DIR / "paper_table4.csv"  # shared with harness.flops

# The keys of a results.jsonl row (written by harness.evaluate), in table order.
RESULT_COLUMNS = (
    "run_id", "run_dir", "sweep", "model", "size", "patch", "conditioning", "depth", "hidden_size",
    "num_heads", "tokens", "params", "gflops", "step", "global_batch_size", "images_seen",
    "train_compute_flops", "fid", "fid_name", "feature_extractor", "num_samples", "sampler", "cfg_scale",
    "cfg_channels", "seed", "dataset", "image_size", "eval_wall_s", "timestamp",
    "isc", "precision", "recall", "fid_floor",
)
# What collect_results adds from the run dir itself.
RUN_COLUMNS = ("config", "state", "state_step", "max_steps", "error", "run_path", "sweep_dir")
NUMERIC_COLUMNS = (
    "patch", "depth", "hidden_size", "num_heads", "tokens", "params", "gflops", "step", "global_batch_size",
    "images_seen", "train_compute_flops", "fid", "num_samples", "cfg_scale", "seed", "image_size",
    "eval_wall_s", "timestamp", "isc", "precision", "recall", "fid_floor", "state_step", "max_steps",
)
BOOTSTRAP_RESAMPLES = 2000
PREDICTION_INTERVAL = (
    "regression prediction interval in log-log space (Student t, n - 2 degrees of freedom): "
    "the range expected for one new config's FID, not for the fitted line"
)

PATCH_COLORS = ("#1f4e9c", "#2a9d8f", "#e9a23b", "#c44e52", "#8172b3", "#7f7f7f")
SIZE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
EXTRACTOR_FILLS = ("full", "bottom", "left", "top")
DPI = 150


# --------------------------------------------------------------------------------------------------
# The results table


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every run dir under `sweep_dir` (itself included): a dir holding results.jsonl or run_state.json, except
    the old runs that on_config_change=overwrite moved aside (history, not runs of the sweep)."""
    from harness.run_dir import OVERWRITTEN_PREFIX

    root = Path(sweep_dir)
    require(root.is_dir(), f"sweep dir {root}: does not exist or is not a directory")
    found = {p.parent for name in ("results.jsonl", "run_state.json") for p in root.rglob(name)}
    return sorted(d for d in found if not any(part.startswith(OVERWRITTEN_PREFIX) for part in d.relative_to(root).parts))


def _config_row(run: Path) -> dict:
    """What the run's config.yaml says about it: the table row of a run with no evaluation yet."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(read_yaml(run / "config.yaml"), resolve=False)
    except Exception:  # no config, or one we cannot parse: the row keeps the run dir and its state
        cfg = {}
    model, data, trainer = (cfg.get(k) or {} for k in ("model", "data", "trainer"))
    return {
        "run_id": cfg.get("run_name", run.name), "run_dir": str(run), "sweep": cfg.get("sweep_name"),
        "model": model.get("name"), "size": model.get("size"), "patch": model.get("patch_size"),
        "conditioning": model.get("conditioning"), "depth": model.get("depth"),
        "hidden_size": model.get("hidden_size"), "num_heads": model.get("num_heads"),
        "global_batch_size": trainer.get("global_batch_size"), "dataset": data.get("name"),
        "image_size": data.get("image_size"),
    }


def _run_rows(run: Path, sweep_dir: Path) -> list[dict]:
    state = read_json(run / "run_state.json", default=None)
    state = state if isinstance(state, dict) else {}
    info = {
        "state": str(state.get("state") or "unknown"), "state_step": state.get("step"),
        "max_steps": state.get("max_steps"), "error": state.get("error"),
        "run_path": str(run), "sweep_dir": str(sweep_dir),
    }
    rows = read_jsonl(run / "results.jsonl") or [_config_row(run)]
    return [{**row, **info} for row in rows]


def _config_labels(df: pd.DataFrame) -> pd.Series:
    """A short name per run: the model, plus the conditioning and where it came from where needed to tell runs apart."""
    runs = df.drop_duplicates("run_path").set_index("run_path")
    base = runs["model"].fillna(pd.Series(runs.index.map(lambda p: Path(p).name), index=runs.index)).astype(str)
    if runs["conditioning"].nunique(dropna=True) > 1:
        base = base + " " + runs["conditioning"].fillna("?").astype(str)
    label = base.copy()
    # Same model in several sweeps: name the sweep, else the sweep dir, else its full path.
    for where in (runs["sweep"], runs["sweep_dir"].map(lambda p: Path(p).name), runs["sweep_dir"]):
        dup = label.duplicated(keep=False)
        if not dup.any():
            break
        label[dup] = base[dup] + " (" + where[dup].fillna("?").astype(str) + ")"
    dup = label.duplicated(keep=False)
    label[dup] = label[dup] + " #" + (label[dup].groupby(label[dup]).cumcount() + 1).astype(str)
    return df["run_path"].map(label)


def _size_order(df: pd.DataFrame) -> list[str]:
    """Model sizes from smallest to largest (by parameters, else depth x width, else name)."""
    sizes = df.dropna(subset=["size"])
    weight = sizes["params"].where(sizes["params"].notna(), sizes["depth"] * sizes["hidden_size"] ** 2)
    ranked = weight.groupby(sizes["size"].astype(str)).max().fillna(0.0)
    return sorted(ranked.index, key=lambda s: (ranked[s], s))


def collect_results(sweep_dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every evaluation under one or more sweep dirs: one row per run x evaluated step.

    Columns: the results.jsonl keys (RESULT_COLUMNS; missing optional keys are NaN), plus `config`
    (a short label per run), `state` (done | running | preempted | failed from run_state.json, or
    unknown without one), `state_step`, `max_steps`, `error`, `run_path` (where the run dir was found)
    and `sweep_dir`. Unfinished and failed runs are included; a run with no evaluation yet has one
    row with NaN step and fid. A step evaluated twice keeps its row with the most samples, the latest among
    equals; a torn last line of a results.jsonl (a kill mid-append) is skipped; a value that is not a number
    where one belongs is read as missing, with a warning naming the run and key.
    """
    dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    require(len(dirs) > 0, "collect_results: give at least one sweep dir")
    rows: list[dict] = []
    for sweep_dir in map(Path, dirs):
        found = [row for run in find_run_dirs(sweep_dir) for row in _run_rows(run, sweep_dir)]
        with_fid = [row for row in found if row.get("fid") is not None and row.get("step") is not None]
        require(
            len(with_fid) > 0,
            f"sweep dir {sweep_dir}: no results (no run dir below it has a results.jsonl with an evaluated step)",
        )
        rows += found
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS + RUN_COLUMNS:
        if col not in df:
            df[col] = np.nan
    for col in NUMERIC_COLUMNS:
        numbers = pd.to_numeric(df[col], errors="coerce")
        unreadable = {(run_path, repr(value)) for run_path, value in df.loc[numbers.isna() & df[col].notna(),
                                                                             ["run_path", col]].values}
        for run_path, value in sorted(unreadable):
            warnings.warn(f"{run_path}/results.jsonl: {col}={value} is not a number; read as missing", stacklevel=2)
        df[col] = numbers
    # A step evaluated twice keeps the FID from the most samples (the most precise: `harness eval` with
    # FID-50K after training with FID-5K), the latest among equals (a re-evaluation after a requeue, say).
    df = df.sort_values("num_samples", kind="stable", na_position="first")
    df = df.drop_duplicates(subset=["run_path", "step", "fid_name"], keep="last")
    missing = df["train_compute_flops"].isna()
    df.loc[missing, "train_compute_flops"] = training_compute_flops(df["gflops"], df["global_batch_size"], df["step"])[missing]
    df["config"] = _config_labels(df)
    size_rank = {s: i for i, s in enumerate(_size_order(df))}
    df["_size_rank"] = df["size"].map(size_rank).fillna(len(size_rank))
    df = df.sort_values(["_size_rank", "patch", "config", "step"], ascending=[True, False, True, True])
    extra = [c for c in df.columns if c not in RESULT_COLUMNS + RUN_COLUMNS and not c.startswith("_")]
    first = ["config", "state", "step", "fid", "fid_name", "gflops"]
    order = first + [c for c in RESULT_COLUMNS + RUN_COLUMNS if c not in first] + extra
    return df[order].reset_index(drop=True)


def write_results_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """The results table as CSV (written atomically)."""
    path = Path(path)
    atomic_write_text(path, df.to_csv(index=False))
    return path


def evaluated(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that hold an FID (drops the placeholder rows of runs with no evaluation yet)."""
    return df[df["fid"].notna() & df["step"].notna()]


def fid_names(df: pd.DataFrame) -> list[str]:
    """The FID kinds (fid_name) among the evaluated rows of `df`, sorted."""
    return sorted(evaluated(df)["fid_name"].dropna().astype(str).unique())


def _steps_text(steps: Iterable[float]) -> str:
    return ", ".join(f"{int(s):,}" for s in sorted(set(steps)))


def default_step(df: pd.DataFrame) -> tuple[int, str]:
    """The last step that every finished run was evaluated at (every run if none finished), and why."""
    ev = evaluated(df)
    require(len(ev) > 0, "no evaluated results to choose a step from")
    done = ev[ev["state"] == "done"]
    basis, who = (done, "every finished run") if len(done) else (ev, "every run (none has finished)")
    common = set.intersection(*(set(g["step"]) for _, g in basis.groupby("run_path")))
    require(
        len(common) > 0,
        f"no step was evaluated by {who}; steps evaluated: {_steps_text(basis['step'])}; choose one with --step",
    )
    step = int(max(common))
    return step, f"step {step:,}, the last step {who} reached"


def rows_at_step(df: pd.DataFrame, step: int) -> pd.DataFrame:
    """One row per run evaluated at `step`; HarnessError listing the available steps when no run reached it."""
    ev = evaluated(df)
    at = ev[ev["step"] == int(step)]
    require(len(at) > 0, f"step {int(step):,}: no run was evaluated at this step; steps available: "
                         f"{_steps_text(ev['step'])}")
    return at


def pick_step(df: pd.DataFrame, step: int | None = None) -> tuple[int, str]:
    """`step` checked against the results (HarnessError if no run reached it), or the default step; and why."""
    if step is None:
        return default_step(df)
    rows_at_step(df, step)
    return int(step), f"step {int(step):,}, chosen"


def check_extractors(df: pd.DataFrame, mix_extractors: bool = False) -> list[str]:
    """The FID kinds (fid_name) in `df`; HarnessError if there are several and mixing was not asked for."""
    ev = evaluated(df)
    names = fid_names(df)
    if len(names) > 1 and not mix_extractors:
        found = ", ".join(
            f"{name} ({', '.join(sorted(ev.loc[ev['fid_name'] == name, 'feature_extractor'].dropna().astype(str).unique())) or '?'})"
            for name in names
        )
        raise HarnessError(
            f"the results mix FIDs of different feature extractors: {found}; they are not comparable on one "
            "axis: report one extractor at a time, or pass mix_extractors=True (--mix-extractors)"
        )
    return names


def fid_description(df: pd.DataFrame) -> str:
    """What the FIDs in `df` are, in words (fid_digits is never called Inception FID)."""
    ev = evaluated(df)
    parts = []
    for name, g in ev.groupby(ev["fid_name"].fillna("unknown").astype(str)):
        samples = ", ".join(f"{int(n):,}" for n in sorted(g["num_samples"].dropna().unique())) or "?"
        proto = ", ".join(sorted({f"{s}, cfg scale {c:g}" for s, c in zip(g["sampler"].fillna("?"), g["cfg_scale"].fillna(1.0))}))
        if name == "fid_digits":
            what = ("fid_digits: the Frechet distance in the features of the harness's digits CNN, "
                    "NOT Inception FID and not comparable with the paper's ImageNet numbers")
        elif name == "fid_inception":
            what = "Inception FID (torch-fidelity inception-v3-compat features)"
        else:
            what = f"{name} (feature extractor {', '.join(g['feature_extractor'].dropna().astype(str).unique()) or '?'})"
        parts.append(f"{what}; {samples} samples; {proto}")
    return " | ".join(parts)


def _fid_axis_label(df: pd.DataFrame) -> str:
    ev = evaluated(df)
    names = fid_names(df)
    if len(names) > 1:
        return f"FID (mixed extractors: {', '.join(names)})"
    samples = ev["num_samples"].dropna().unique()
    n = f"{int(samples[0]) // 1000}K" if len(samples) == 1 and samples[0] >= 1000 else ""
    if names == ["fid_inception"]:
        return f"FID-{n} (Inception)" if n else "FID (Inception)"
    name = names[0] if names else "FID"
    return f"FID ({name}{', ' + n + ' samples' if n else ''})"


def load_paper_table4() -> pd.DataFrame:
    """The paper's Table 4 (12 models: params, Gflops, FID-50K at 400K steps), shipped as package data."""
    return pd.read_csv(PAPER_TABLE4)


# --------------------------------------------------------------------------------------------------
# Fits


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
    from scipy.special import stdtrit  # Student t quantile (lighter to import than scipy.stats)

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


# --------------------------------------------------------------------------------------------------
# Figures


@dataclass
class _Style:
    """One visual code for every figure: marker per model size, colour per patch size."""

    sizes: list[str]
    patches: list[int]
    extractors: list[str]

    @classmethod
    def of(cls, df: pd.DataFrame, paper: pd.DataFrame | None = None) -> "_Style":
        frame = df
        if paper is not None:
            frame = pd.concat([df, paper.assign(params=paper["params_m"] * 1e6)], ignore_index=True)
        patches = sorted({int(p) for p in frame["patch"].dropna()}, reverse=True)  # large patch = few Gflops first
        names = fid_names(df)
        return cls(_size_order(frame), patches, names)

    def marker(self, size) -> str:
        return SIZE_MARKERS[self.sizes.index(str(size)) % len(SIZE_MARKERS)] if str(size) in self.sizes else "o"

    def patch_color(self, patch) -> str:
        return PATCH_COLORS[self.patches.index(int(patch)) % len(PATCH_COLORS)] if _is_num(patch) else "0.4"

    def size_color(self, size):
        k = len(self.sizes)
        i = self.sizes.index(str(size)) if str(size) in self.sizes else 0
        return colormaps["plasma"](0.72 * i / max(k - 1, 1))

    def patch_line(self, patch):
        return LINESTYLES[self.patches.index(int(patch)) % len(LINESTYLES)] if _is_num(patch) else "-"

    def size_line(self, size):
        return LINESTYLES[self.sizes.index(str(size)) % len(LINESTYLES)] if str(size) in self.sizes else "-"

    def fill(self, fid_name) -> str:
        return EXTRACTOR_FILLS[self.extractors.index(fid_name) % len(EXTRACTOR_FILLS)] if fid_name in self.extractors else "full"

    def patch_handles(self, lines: bool = False) -> list:
        return [_header("Patch size")] + [
            Line2D([], [], color=self.patch_color(p), marker=None if lines else "s", ls="-" if lines else "none",
                   lw=2.5, markersize=9, label=f"p = {p}")
            for p in self.patches
        ]

    def size_handles(self, color: bool = False) -> list:
        return [_header("Model size")] + [
            Line2D([], [], color=self.size_color(s) if color else "0.25", marker=self.marker(s), ls="-" if color else "none",
                   lw=2, markersize=8, label=s)
            for s in self.sizes
        ]

    def line_handles(self, title: str, keys: list, style) -> list:
        return [_header(title)] + [Line2D([], [], color="0.25", ls=style(k), lw=1.8, label=str(k)) for k in keys]

    def extractor_handles(self) -> list:
        if len(self.extractors) < 2:
            return []
        return [_header("FID kind")] + [
            Line2D([], [], color="0.3", marker="o", fillstyle=self.fill(n), ls="none", markersize=8, label=n)
            for n in self.extractors
        ]


def _is_num(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _header(text: str) -> Line2D:
    """An invisible legend entry used as a section title."""
    return Line2D([], [], ls="none", marker=None, label=text)


def _legend(ax, handles: list, **kwargs) -> None:
    leg = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                    fontsize=9, handlelength=2.2, borderaxespad=0.0, **kwargs)
    for text, handle in zip(leg.get_texts(), handles):
        if handle.get_marker() in (None, "None", "") and handle.get_linestyle() in ("None", "none", ""):
            text.set_fontweight("bold")


def _unfinished_handle() -> Line2D:
    return Line2D([], [], color="0.3", marker="o", markerfacecolor="white", ls="none", markersize=8,
                  label="hollow: run not finished\n(running / preempted / failed)")


def _point(ax, x, y, row, style: _Style, color=None, size=9, zorder=3, alpha=1.0) -> None:
    color = color or style.patch_color(row["patch"])
    done = row.get("state") == "done"
    fill = style.fill(row.get("fid_name")) if done else "full"
    ax.plot([x], [y], ls="none", marker=style.marker(row["size"]), markersize=size, color=color,
            markerfacecolor=color if done else "white", markeredgecolor=color, markeredgewidth=1.6,
            fillstyle=fill, markerfacecoloralt="white", zorder=zorder, alpha=alpha)


def _log_ticks(axis, values, sci: bool = False) -> None:
    """Log axis with tick labels dense enough to read when the data span few decades.

    Plain numbers (0.05, 20) by default; `sci` for quantities like FLOPs (2x10^13).
    """
    values = np.asarray([v for v in values if v > 0 and np.isfinite(v)], dtype=float)
    decades = np.log10(values.max() / values.min()) if len(values) else 3
    subs = (1, 2, 3, 4, 5, 6, 8) if decades < 0.7 else (1, 2, 5) if decades < 2.5 else (1,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(np.inf, np.inf)) if sci
                             else FuncFormatter(lambda v, _: f"{v:,.10g}"))
    axis.set_minor_locator(LogLocator(base=10, subs="all"))
    axis.set_minor_formatter(NullFormatter())


def _steps_formatter(v, _) -> str:
    return f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}K" if abs(v) >= 1e3 else f"{v:g}"


def _new_figure(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    axes = fig.subplots(1, ncols, sharey=ncols > 1, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.08)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _check_overlay(df: pd.DataFrame) -> None:
    names = fid_names(df)
    require(
        names == ["fid_inception"],
        f"overlay_paper: the paper's points are Inception FID-50K on ImageNet 256x256 at 400K steps; this sweep "
        f"reports {', '.join(names) or 'no FID kind'}, which is on a different scale: drop the overlay (--overlay-paper)",
    )


def plot_fid_vs_gflops(df: pd.DataFrame, step: int | None = None, overlay_paper: bool = False,
                       mix_extractors: bool = False, show_fit: bool = True) -> Figure:
    """FID vs transformer Gflops at one training step, log-log (paper Fig. 8).

    Marker per model size, colour per patch size, hollow markers for runs not finished; with
    `show_fit`, the power-law fit per FID kind and its 95% prediction band; with `overlay_paper`
    (Inception-FID sweeps only), the paper's 12 models at 400K steps and their fit. `step=None`:
    the last step every finished run reached.
    """
    names = check_extractors(df, mix_extractors)
    step, _ = pick_step(df, step)
    at = rows_at_step(df, step)
    paper = None
    if overlay_paper:
        _check_overlay(df)
        paper = load_paper_table4()
    style = _Style.of(df, paper)
    fig, (ax,) = _new_figure(8.6, 5.2)
    for k, (_, row) in enumerate(at.sort_values("gflops").iterrows()):
        _point(ax, row["gflops"], row["fid"], row, style)
        # Neighbours in Gflops alternate up-right and down-left so that their labels do not collide.
        up = k % 2 == 0
        ax.annotate(row["config"], (row["gflops"], row["fid"]), xytext=(8, 6) if up else (-8, -13),
                    textcoords="offset points", ha="left" if up else "right", fontsize=8, color="0.3")
    xs, ys = list(at["gflops"]), list(at["fid"])
    extra: list = []
    if paper is not None:
        for _, row in paper.iterrows():
            _point(ax, row["gflops"], row["fid50k_400k"], {**row, "state": "done"}, style, size=7, zorder=2, alpha=0.35)
        pfit = fit_power_law(paper["gflops"], paper["fid50k_400k"], n_boot=0)
        _fit_line(ax, pfit, paper["gflops"], color="0.45", ls=":", band=False)
        xs += list(paper["gflops"])
        ys += list(paper["fid50k_400k"])
        extra += [
            Line2D([], [], color="0.5", marker="o", alpha=0.35, ls="none", markersize=7,
                   label="paper Table 4, 400K steps\n(Inception FID-50K, ImageNet 256)"),
            Line2D([], [], color="0.45", ls=":", label=f"paper fit: slope {pfit.slope:.2f}, r = {pfit.r:.2f}"),
        ]
    if show_fit:
        for k, name in enumerate(names):
            group = at[at["fid_name"] == name]
            if len(group) >= 3 and group["gflops"].nunique() > 1 and group["fid"].nunique() > 1:
                fit = fit_power_law(group["gflops"], group["fid"], n_boot=0)
                _fit_line(ax, fit, group["gflops"], color="black", ls=LINESTYLES[1 + k % 3], band=True)
                tag = f" ({name})" if len(names) > 1 else ""
                extra += [Line2D([], [], color="black", ls=LINESTYLES[1 + k % 3],
                                 label=f"fit{tag}: FID $\\propto$ Gflops$^{{{fit.slope:.2f}}}$, r = {fit.r:.2f}")]
                _, band_lo, band_hi = predict_fid(fit, np.array([group["gflops"].min(), group["gflops"].max()]))
                ys += list(band_lo) + list(band_hi)
        if any("fit" in h.get_label() and "paper" not in h.get_label() for h in extra):
            extra.append(Line2D([], [], color="0.6", lw=8, alpha=0.3, label="95% prediction band"))
    floors = at["fid_floor"].dropna()
    if len(floors) and len(names) == 1:
        ax.axhline(float(floors.median()), color="0.35", ls=(0, (1, 2)), lw=1.2, zorder=1)
        extra.append(Line2D([], [], color="0.35", ls=(0, (1, 2)), label="FID floor (held-out real images)"))
        ys.append(float(floors.median()))
    if (at["state"] != "done").any():
        extra.append(_unfinished_handle())
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.xaxis, xs)
    _log_ticks(ax.yaxis, ys)
    ax.set_xlabel("Transformer Gflops (forward pass, one image)")
    ax.set_ylabel(_fid_axis_label(at))
    ax.set_title(f"FID vs Gflops at step {step:,}  ({len(at)} runs)")
    _legend(ax, style.size_handles() + style.patch_handles() + style.extractor_handles()
            + ([_header("")] + extra if extra else []))
    return fig


def _fit_line(ax, fit: PowerLawFit, gflops, color, ls, band: bool) -> None:
    lo, hi = float(np.min(gflops)), float(np.max(gflops))
    g = np.geomspace(lo / 1.25, hi * 1.25, 100)
    fid, plo, phi = predict_fid(fit, g)
    ax.plot(g, fid, color=color, ls=ls, lw=1.4, zorder=2)
    if band:
        ax.fill_between(g, plo, phi, color="0.6", alpha=0.18, lw=0, zorder=1)


def plot_fid_vs_steps(df: pd.DataFrame, mix_extractors: bool = False) -> Figure:
    """FID vs training steps of every config, two panels (paper Fig. 6 style).

    Left: colour by model size, line style by patch size (scaling the model). Right: colour by patch
    size, line style by model size (shrinking the patch). Hollow markers: runs not finished.
    """
    check_extractors(df, mix_extractors)
    ev = evaluated(df)
    style = _Style.of(df)
    fig, (left, right) = _new_figure(13.0, 5.0, ncols=2)
    for _, run in ev.groupby(["run_path", "fid_name"], dropna=False, sort=False):
        run = run.sort_values("step")
        first = run.iloc[0]
        for ax, color, ls in ((left, style.size_color(first["size"]), style.patch_line(first["patch"])),
                              (right, style.patch_color(first["patch"]), style.size_line(first["size"]))):
            ax.plot(run["step"], run["fid"], color=color, ls=ls, lw=1.8, zorder=2)
            for _, row in run.iterrows():
                _point(ax, row["step"], row["fid"], row, style, color=color, size=6.5)
    for ax in (left, right):
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, ev["fid"])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 5, 10]))
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
        ax.set_xlabel("Training steps")
    left.set_ylabel(_fid_axis_label(ev))
    left.set_title("Scaling model size (colour) at each patch size (line style)", fontsize=10.5)
    right.set_title("Shrinking the patch (colour) at each model size (line style)", fontsize=10.5)
    unfinished = [_unfinished_handle()] if (ev["state"] != "done").any() else []
    _legend(left, style.size_handles(color=True) + style.line_handles("Patch size", style.patches, style.patch_line)
            + style.extractor_handles())
    _legend(right, style.patch_handles(lines=True) + style.line_handles("Model size", style.sizes, style.size_line)
            + style.extractor_handles() + unfinished)
    return fig


def plot_fid_vs_compute(df: pd.DataFrame, mix_extractors: bool = False, frontier: bool = True) -> Figure:
    """FID vs total training compute (Gflops x 1e9 x batch x steps x 3), log-log (paper Fig. 9).

    One line per config over its evaluated steps (marker per size, colour per patch) and, with
    `frontier`, the compute frontier (best FID reached within each budget) as a grey staircase.
    """
    check_extractors(df, mix_extractors)
    ev = evaluated(df).dropna(subset=["train_compute_flops"])
    require(len(ev) > 0, "plot_fid_vs_compute: no result has a training compute (gflops, global_batch_size, step)")
    style = _Style.of(df)
    fig, (ax,) = _new_figure(8.6, 5.2)
    for _, run in ev.groupby(["run_path", "fid_name"], dropna=False, sort=False):
        run = run.sort_values("step")
        color = style.patch_color(run.iloc[0]["patch"])
        ax.plot(run["train_compute_flops"], run["fid"], color=color, lw=1.6, alpha=0.85, zorder=2)
        for _, row in run.iterrows():
            _point(ax, row["train_compute_flops"], row["fid"], row, style, size=7)
    extra = []
    if frontier:
        front = compute_frontier(ev)
        for _, f in front.groupby("fid_name"):
            xs = list(f["train_compute_flops"]) + [ev["train_compute_flops"].max()]
            ys = list(f["fid"]) + [f["fid"].iloc[-1]]
            ax.step(xs, ys, where="post", color="0.55", lw=5, alpha=0.35, zorder=1, solid_capstyle="butt")
        extra = [Line2D([], [], color="0.55", lw=5, alpha=0.35, label="compute frontier\n(best FID within budget)")]
    if (ev["state"] != "done").any():
        extra.append(_unfinished_handle())
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.yaxis, ev["fid"])
    _log_ticks(ax.xaxis, ev["train_compute_flops"], sci=True)
    ax.set_xlabel("Training compute (FLOPs = Gflops × 10⁹ × batch × steps × 3)")
    ax.set_ylabel(_fid_axis_label(ev))
    ax.set_title("FID vs total training compute")
    _legend(ax, style.size_handles() + style.patch_handles() + style.extractor_handles()
            + ([_header("")] + extra if extra else []))
    return fig


def last_samples(df: pd.DataFrame) -> dict[str, tuple[Path, int]]:
    """Config -> (samples/step_*.png at the run's last checkpoint, its step), for runs that saved samples."""
    found = {}
    for (config, run_path), _ in df.groupby(["config", "run_path"], sort=False):
        pngs = []
        for p in Path(run_path).glob("samples/step_*.png"):
            try:
                pngs.append((int(p.stem.split("_", 1)[1]), p))
            except ValueError:
                continue
        if pngs:
            step, path = max(pngs)
            found[config] = (path, step)
    return found


def plot_sample_grid(df: pd.DataFrame) -> Figure:
    """The sample grid of every config at its last checkpoint: rows = model size, columns = patch size."""
    from PIL import Image

    samples = last_samples(df)
    require(len(samples) > 0, "plot_sample_grid: no run dir holds samples/step_*.png")
    runs = df.drop_duplicates("config").set_index("config")
    style = _Style.of(df)
    cells: dict[tuple[int, int], str] = {}
    for config in samples:
        run = runs.loc[config]
        row = style.sizes.index(str(run["size"])) if str(run["size"]) in style.sizes else len(style.sizes)
        col = style.patches.index(int(run["patch"])) if _is_num(run["patch"]) else len(style.patches)
        while (row, col) in cells:  # several configs with one size and patch (e.g. two sweeps): next column
            col += 1
        cells[(row, col)] = config
    used_rows = sorted({r for r, _ in cells})
    used_cols = sorted({c for _, c in cells})
    fig = Figure(figsize=(2.7 * len(used_cols) + 0.3, 2.95 * len(used_rows) + 0.4), layout="constrained", dpi=DPI)
    axes = fig.subplots(len(used_rows), len(used_cols), squeeze=False)
    ev = evaluated(df)
    for i, r in enumerate(used_rows):
        for j, c in enumerate(used_cols):
            ax = axes[i][j]
            ax.set_axis_off()
            config = cells.get((r, c))
            if config is None:
                continue
            path, step = samples[config]
            with Image.open(path) as im:
                im.thumbnail((1024, 1024))  # a panel is ~400 px wide: keeps SVGs of 256 px grids small
                image = np.asarray(im)
            small = max(image.shape[:2]) <= 512
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest" if small else "antialiased")
            fid = ev[(ev["config"] == config) & (ev["step"] == step)]["fid"]
            state = runs.loc[config, "state"]
            title = f"{config}  ·  step {step:,}"
            sub = (f"FID {fid.iloc[-1]:.1f}" if len(fid) else "not evaluated") + ("" if state == "done" else f"  ·  {state}")
            ax.set_title(f"{title}\n{sub}", fontsize=9.5, color="black" if state == "done" else "#b03a2e")
    fig.suptitle("Samples at each config's last checkpoint (rows: model size, columns: patch size)", fontsize=11)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure rendered as PNG or SVG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, facecolor="white",
                metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write `name`.png and `name`.svg under `out_dir`; returns {"png": path, "svg": path}."""
    out = {}
    for fmt in ("png", "svg"):
        out[fmt] = Path(out_dir) / f"{name}.{fmt}"
        atomic_write_bytes(out[fmt], figure_bytes(fig, fmt))
    return out


# --------------------------------------------------------------------------------------------------
# The report


def run_table(df: pd.DataFrame, step: int) -> pd.DataFrame:
    """One row per run: shape, Gflops, state, the FID at `step` and at its last evaluated step."""
    rows = []
    for config, run in df.groupby("config", sort=False):
        run_ev = evaluated(run).sort_values("step")
        first = run.iloc[0]
        at = run_ev[run_ev["step"] == step]
        last = run_ev.iloc[-1] if len(run_ev) else None
        rows.append({
            "config": config, "size": first["size"], "patch": first["patch"],
            "params_M": first["params"] / 1e6 if _is_num(first["params"]) else math.nan,
            "tokens": first["tokens"], "gflops": first["gflops"], "state": first["state"],
            "steps_done": first["state_step"], "max_steps": first["max_steps"],
            "last_eval_step": last["step"] if last is not None else math.nan,
            f"fid_at_{step}": at["fid"].iloc[-1] if len(at) else math.nan,
            "fid_last": last["fid"] if last is not None else math.nan,
            "train_compute_flops": last["train_compute_flops"] if last is not None else math.nan,
        })
    return pd.DataFrame(rows)


def _fmt(v, kind: str = "g") -> str:
    if not _is_num(v):
        return "–"
    if isinstance(v, str):
        return v
    if kind == "int":
        return f"{int(v):,}"
    if kind == "sci":
        return f"{v:.2e}"
    if kind == "fid":
        return f"{v:.2f}"
    return f"{v:.3g}"


def _display(table: pd.DataFrame, kinds: dict[str, str], names: dict[str, str]) -> pd.DataFrame:
    """Numbers as strings for Markdown and HTML, with readable column names."""
    return pd.DataFrame({names.get(c, c): [_fmt(v, kinds.get(c, "g")) for v in table[c]] for c in table.columns})


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _fit_table(fit: PowerLawFit) -> pd.DataFrame:
    pct = f"{fit.level:.0%}"
    return pd.DataFrame([
        ("configs in the fit", f"{fit.n}"),
        ("slope (log10 FID per log10 Gflops)", f"{fit.slope:.3f}  [{fit.slope_ci[0]:.3f}, {fit.slope_ci[1]:.3f}]"),
        ("intercept (log10 FID at 1 Gflop)", f"{fit.intercept:.3f}"),
        ("R²", f"{fit.r2:.3f}"),
        ("Pearson r (log-log)", f"{fit.r:.3f}  [{fit.r_ci[0]:.3f}, {fit.r_ci[1]:.3f}]"),
        ("law", f"FID ≈ {10 ** fit.intercept:.3g} × Gflops^{fit.slope:.3f}"),
        ("intervals", f"{pct} percentile bootstrap, {fit.n_boot} resamples of the configs, seed {fit.seed}"),
    ], columns=["quantity", "value"])


def _prediction_points(fit: PowerLawFit, gflops: np.ndarray) -> list[tuple[str, float]]:
    """Two configs not in the grid: the middle of the widest Gflops gap (in log space) and twice the largest."""
    g = np.unique(np.asarray(gflops, dtype=float))
    gaps = np.diff(np.log10(g))
    k = int(np.argmax(gaps))
    mid = float(10 ** ((np.log10(g[k]) + np.log10(g[k + 1])) / 2))
    return [("inside the grid (widest Gflops gap, geometric middle)", mid),
            ("beyond the grid (2 x the largest Gflops)", float(2 * g.max()))]


def _inline_html(text: str) -> str:
    """The report's inline markup (**bold**, `code`) as HTML, the rest escaped."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _markdown(blocks: list[tuple[str, object]]) -> str:
    """The report blocks as Markdown (figures linked from figures/)."""
    out: list[str] = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + content]
        elif kind == "summary":
            out += [f"**{content}**"]
        elif kind in ("p", "note"):
            out += [content]
        elif kind == "table":
            out += [_markdown_table(content)]
        elif kind == "figure":
            name, caption = content
            out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}* ([SVG](figures/{name}.svg))"]
        elif kind == "list":
            out += [f"- {item}" for item in content]
        out.append("")
    return "\n".join(out)


def _html_page(title: str, blocks: list[tuple[str, object]], png: dict[str, bytes]) -> str:
    """The report blocks as one self-contained HTML page (figures embedded as base64 PNG)."""
    css = (
        "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;"
        "padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:.9em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".summary{font-size:1.15em;font-weight:600;background:#f5f8ff;border-left:4px solid #1f4e9c;padding:.6em 1em}"
        ".note{color:#555}img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}code{background:#f3f3f3;padding:0 .2em}"
    )
    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline_html(content)}</{kind}>")
        elif kind in ("p", "summary", "note"):
            css_class = f' class="{kind}"' if kind != "p" else ""
            body.append(f"<p{css_class}>{_inline_html(content)}</p>")
        elif kind == "table":
            body.append(content.to_html(index=False, border=0, escape=True))
        elif kind == "figure":
            name, caption = content
            data = base64.b64encode(png[name]).decode()
            body.append(f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{data}\">"
                        f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in content) + "</ul>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


REPORT_FILES = ("report.md", "report.html", "results.csv", "fits.json", "figures")


def write_report(sweep_dirs, out_dir, step: int | None = None, overlay_paper: bool = False,
                 mix_extractors: bool = False) -> dict[str, Path]:
    """Write the sweep report under `out_dir` and return the paths written.

    Files: report.md, report.html (self-contained: figures embedded as base64 PNG), results.csv
    (every run x evaluated step), fits.json, and figures/<name>.png|svg for fid_vs_gflops,
    fid_vs_steps, fid_vs_compute and samples (when runs saved sample grids). Keys of the returned
    dict: "md", "html", "csv", "json", "figures" (the figures dir) and "<name>.png" / "<name>.svg".
    `step=None` uses the last step that every finished run reached.
    """
    started = time.time()
    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    final = check_output_path(out_dir, "-o", kind="dir")
    if final.is_dir():  # the directory is replaced whole: it may hold only a previous report
        foreign = sorted(p.name for p in final.iterdir() if p.name not in REPORT_FILES)
        require(not foreign, f"-o={final} holds files that are not part of a report ({', '.join(foreign[:5])}); "
                             "give a new directory, an empty one or a previous report's")
    df = collect_results(sweep_dirs)
    names = check_extractors(df, mix_extractors)
    if overlay_paper:
        _check_overlay(df)
    step, step_note = pick_step(df, step)
    at = rows_at_step(df, step)
    # Written in a staging directory and swapped in whole: a kill leaves the previous report or the new one.
    out = staging_dir(final)
    fig_dir = out / "figures"

    paths: dict[str, Path] = {"csv": write_results_csv(df, out / "results.csv"), "figures": fig_dir}
    figures = {
        "fid_vs_gflops": plot_fid_vs_gflops(df, step, overlay_paper=overlay_paper, mix_extractors=mix_extractors),
        "fid_vs_steps": plot_fid_vs_steps(df, mix_extractors=mix_extractors),
        "fid_vs_compute": plot_fid_vs_compute(df, mix_extractors=mix_extractors),
    }
    if last_samples(df):
        figures["samples"] = plot_sample_grid(df)
    captions = {
        "fid_vs_gflops": f"FID vs transformer Gflops at step {step:,} (paper Fig. 8): marker = model size, colour = patch size.",
        "fid_vs_steps": "FID over training for every config (paper Fig. 6 style).",
        "fid_vs_compute": "FID vs total training compute, Gflops x batch x steps x 3 (paper Fig. 9), with the compute frontier.",
        "samples": "Samples of each config at its last checkpoint.",
    }
    png: dict[str, bytes] = {}
    for name, fig in figures.items():
        for fmt, path in save_figure(fig, fig_dir, name).items():
            paths[f"{name}.{fmt}"] = path
        png[name] = paths[f"{name}.png"].read_bytes()

    # Fits: one per FID kind at the chosen step.
    fits: dict[str, PowerLawFit] = {}
    fit_notes: list[str] = []
    for name in names:
        group = at[at["fid_name"] == name]
        try:
            fits[name] = fit_power_law(group["gflops"], group["fid"])
        except HarnessError as err:
            fit_notes.append(f"{name}: no fit ({err})")
    tag = (lambda n: f" ({n})") if len(names) > 1 else (lambda n: "")
    summary = [f"{fit.summary()}{tag(n)} (log-log, {fit.n} configs at step {step:,}; "
               f"{fit.level:.0%} bootstrap CI)" for n, fit in fits.items()]
    summary += [f"Gflops vs FID: not fitted; {note}" for note in fit_notes]
    predictions = []
    for n, fit in fits.items():
        for where, g in _prediction_points(fit, at.loc[at["fid_name"] == n, "gflops"]):
            fid, lo, hi = predict_fid(fit, g)
            predictions.append({"fid_name": n, "where": where, "gflops": g, "fid": fid, "lo": lo, "hi": hi})
    frontier = compute_frontier(df)
    table = run_table(df, step)
    paper_fit = None
    if overlay_paper:
        paper = load_paper_table4()
        paper_fit = fit_power_law(paper["gflops"], paper["fid50k_400k"])

    # Notes a reader needs before trusting the picture.
    fid_text = fid_description(df)
    missing = [r for r in table.itertuples(index=False) if not _is_num(getattr(r, f"fid_at_{step}"))]
    notes = []
    if missing:
        notes.append(f"Not in the Gflops figure or fit (no evaluation at step {step:,}): " + "; ".join(
            f"{r.config} ({r.state}, last evaluated step {_fmt(r.last_eval_step, 'int')})" for r in missing))
    unfinished = table[table["state"] != "done"]
    if len(unfinished):
        notes.append("Runs not finished: " + "; ".join(f"{r.config}: {r.state}" for r in unfinished.itertuples(index=False)))
    errors = df.drop_duplicates("config")[["config", "error"]].dropna()
    notes += [f"{r.config} failed with: {r.error}" for r in errors.itertuples(index=False)]
    if len(names) > 1:
        notes.append(f"Mixed FID kinds ({', '.join(names)}) were plotted together on request; their values are not comparable.")

    step_col = f"fid_at_{step}"
    table_disp = _display(
        table,
        {"params_M": "g", "tokens": "int", "gflops": "g", "steps_done": "int", "max_steps": "int",
         "last_eval_step": "int", step_col: "fid", "fid_last": "fid", "train_compute_flops": "sci", "patch": "int"},
        {"params_M": "params (M)", "gflops": "Gflops", "steps_done": "steps done", "max_steps": "max steps",
         "last_eval_step": "last eval step", step_col: f"FID @ {step:,}", "fid_last": "FID (last eval)",
         "train_compute_flops": "train compute (FLOPs, last eval)"},
    )
    frontier_disp = _display(
        frontier[["train_compute_flops", "fid", "config", "step", "fid_name"]],
        {"train_compute_flops": "sci", "fid": "fid", "step": "int"},
        {"train_compute_flops": "compute budget (FLOPs)", "fid": "best FID", "config": "reached by", "step": "at step"},
    )
    pred_disp = pd.DataFrame([{
        "config not in the grid": p["where"] + (f" [{p['fid_name']}]" if len(names) > 1 else ""),
        "Gflops": f"{p['gflops']:.3g}", "predicted FID": f"{p['fid']:.2f}",
        "95% interval": f"[{p['lo']:.2f}, {p['hi']:.2f}]"} for p in predictions])
    fit_disps = {n: _fit_table(f) for n, f in fits.items()}
    sweeps = ", ".join(str(Path(d)) for d in sweep_dirs)
    title = "DiT scaling report: FID vs Gflops"

    # One list of blocks, rendered as report.md and as a self-contained report.html.
    blocks = [("h1", title), ("p", f"Sweeps: `{sweeps}` — {df['run_path'].nunique()} runs, "
                                   f"{len(evaluated(df))} evaluations."), ("p", f"**FID:** {fid_text}.")]
    blocks += [("summary", line) for line in summary]
    blocks += [("p", f"Step used for the Gflops figure and fit: {step_note}."), ("h2", "Runs"), ("table", table_disp),
               ("note", "Every run x evaluated step: `results.csv`, next to this report."), ("h2", "Gflops vs FID fit")]
    for n, disp in fit_disps.items():
        blocks += ([("h3", n)] if len(names) > 1 else []) + [("table", disp)]
    blocks += [("p", note) for note in fit_notes]
    if paper_fit is not None:
        blocks.append(("p", f"Paper Table 4 (400K steps, 12 models, Inception FID-50K): r = {paper_fit.r:.3f} "
                            f"[{paper_fit.r_ci[0]:.3f}, {paper_fit.r_ci[1]:.3f}], slope = {paper_fit.slope:.3f} "
                            "(the paper reports r = -0.93)."))
    if predictions:
        blocks += [("h3", "Predicted FID of configs not in the grid"), ("table", pred_disp),
                   ("note", f"Interval: 95% {PREDICTION_INTERVAL}.")]
    blocks += [("h2", "Compute frontier"),
               ("p", "Best FID reached within each training-compute budget (Gflops x 10^9 x batch x steps x 3), "
                     "and which config reached it:"), ("table", frontier_disp), ("h2", "Figures")]
    blocks += [("figure", (name, captions[name])) for name in figures]
    if notes:
        blocks += [("h2", "Notes"), ("list", notes)]
    blocks.append(("note", f"Generated by `harness report` in {time.time() - started:.1f} s on "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}."))
    paths["md"] = out / "report.md"
    atomic_write_text(paths["md"], _markdown(blocks))
    paths["html"] = out / "report.html"
    atomic_write_text(paths["html"], _html_page(title, blocks, png))

    paths["json"] = out / "fits.json"
    atomic_write_json(paths["json"], {
        "step": step, "step_note": step_note, "fid_names": names, "fid": fid_text, "summary": summary,
        "fits": {n: asdict(f) for n, f in fits.items()}, "predictions": predictions,
        "prediction_interval": PREDICTION_INTERVAL,
        "paper_fit": asdict(paper_fit) if paper_fit is not None else None,
        "frontier": frontier.to_dict(orient="records"), "notes": notes,
    })
    replace_dir(out, final)
    return {key: final / path.relative_to(out) for key, path in paths.items()}
