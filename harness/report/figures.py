"""The report's figures (matplotlib), in the style of the DiT paper, and their shared visual code.

FID vs Gflops (Fig. 8), FID vs training steps (Fig. 6), FID vs training compute (Fig. 9) and a grid of
samples per config. Every figure marks model size by marker and patch size by colour (`_Style`), and
draws runs that have not finished hollow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

from harness.errors import require
from harness.report.collect import (SAMPLE_BOOTSTRAP, aggregate_replicas, check_extractors, check_overlay, evaluated,
                                    fid_names, last_samples, load_paper_table4, pick_step, rows_at_step, size_order)
from harness.report.laws import FrontierLaw, Prediction
from harness.report.stats import PowerLawFit, compute_frontier, fit_power_law, predict_fid

PATCH_COLORS = ("#1f4e9c", "#2a9d8f", "#e9a23b", "#c44e52", "#8172b3", "#7f7f7f")
SIZE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
EXTRACTOR_FILLS = ("full", "bottom", "left", "top")
DPI = 150


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
        return cls(size_order(frame), patches, names)

    def marker(self, size) -> str:
        return SIZE_MARKERS[self.sizes.index(str(size)) % len(SIZE_MARKERS)] if str(size) in self.sizes else "o"

    def patch_color(self, patch) -> str:
        return PATCH_COLORS[self.patches.index(int(patch)) % len(PATCH_COLORS)] if pd.notna(patch) else "0.4"

    def size_color(self, size):
        k = len(self.sizes)
        i = self.sizes.index(str(size)) if str(size) in self.sizes else 0
        return colormaps["plasma"](0.72 * i / max(k - 1, 1))

    def patch_line(self, patch):
        return LINESTYLES[self.patches.index(int(patch)) % len(LINESTYLES)] if pd.notna(patch) else "-"

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


def plot_fid_vs_gflops(df: pd.DataFrame, step: int | None = None, overlay_paper: bool = False,
                       mix_extractors: bool = False, show_fit: bool = True,
                       held_out: Prediction | None = None) -> Figure:
    """FID vs transformer Gflops at one training step, log-log (paper Fig. 8).

    Marker per model size, colour per patch size, hollow markers for runs not finished; with
    `show_fit`, the power-law fit per FID kind and its 95% prediction band; with `overlay_paper`
    (Inception-FID sweeps only), the paper's 12 models at 400K steps and their fit. `step=None`:
    the last step every finished run reached. Error bars (`aggregate_replicas`): configs with several seed replicas
    get the replicas' 95% t interval of the mean (black); a config with one replica gets its FID's 95% bootstrap
    interval over its samples (grey), where its row has one. `held_out` (an FID `Prediction` of `predict_held_out`)
    marks the held-out config's prediction and its prediction interval.
    """
    names = check_extractors(df, mix_extractors)
    step, _ = pick_step(df, step)
    at = rows_at_step(df, step)
    paper = None
    if overlay_paper:
        check_overlay(df)
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
    points = aggregate_replicas(at) if "replica_key" in at else pd.DataFrame({"n_replicas": [], "fid_lo": []})
    points = points[points["fid_lo"].notna()] if "fid_lo" in points else points.iloc[:0]
    for bars, color, label in (
            (points[points["n_replicas"] > 1], "black", "seed replicas: mean, 95% t interval"),
            (points[points.get("fid_interval_source", pd.Series(dtype=str)) == SAMPLE_BOOTSTRAP], "0.5",
             "one replica: 95% bootstrap\ninterval over its samples")):
        if len(bars):
            ax.errorbar(bars["gflops"], bars["fid_mean"], fmt="none", ecolor=color, elinewidth=1.2, capsize=4,
                        yerr=[bars["fid_mean"] - bars["fid_lo"], bars["fid_hi"] - bars["fid_mean"]], zorder=4)
            extra.append(Line2D([], [], color=color, marker="|", markersize=10, ls="none", label=label))
            ys += list(bars["fid_lo"]) + list(bars["fid_hi"])
    if held_out is not None:
        lo, hi = held_out.interval
        ax.errorbar([held_out.gflops], [held_out.predicted], yerr=[[held_out.predicted - lo], [hi - held_out.predicted]],
                    fmt="x", color="#c44e52", markersize=9, elinewidth=2, capsize=5, zorder=5)
        extra.append(Line2D([], [], color="#c44e52", marker="x", markersize=9,
                            label=f"held-out {held_out.config}:\nprediction, {held_out.level:.0%} interval"))
        ys += [lo, hi]
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
    ax.set_title(f"FID vs Gflops at step {step:,}  ({len(at)} run{'' if len(at) == 1 else 's'})")
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
    size, line style by model size (shrinking the patch). Hollow markers: runs not finished. Each evaluation
    with a bootstrap interval over its samples (fid_lo, fid_hi) gets it as an error bar; seed replicas are
    lines of their own.
    """
    check_extractors(df, mix_extractors)
    ev = evaluated(df)
    style = _Style.of(df)
    fig, (left, right) = _new_figure(13.0, 5.0, ncols=2)
    intervals = (ev[["fid_lo", "fid_hi"]].notna().all(axis=1) if {"fid_lo", "fid_hi"} <= set(ev)
                 else pd.Series(False, index=ev.index))
    for _, run in ev.groupby(["run_path", "fid_name"], dropna=False, sort=False):
        run = run.sort_values("step")
        first = run.iloc[0]
        bars = run[intervals.loc[run.index]]
        for ax, color, ls in ((left, style.size_color(first["size"]), style.patch_line(first["patch"])),
                              (right, style.patch_color(first["patch"]), style.size_line(first["size"]))):
            ax.plot(run["step"], run["fid"], color=color, ls=ls, lw=1.8, zorder=2)
            if len(bars):
                ax.errorbar(bars["step"], bars["fid"], yerr=[bars["fid"] - bars["fid_lo"], bars["fid_hi"] - bars["fid"]],
                            fmt="none", ecolor=color, elinewidth=1.0, capsize=3, alpha=0.7, zorder=2)
            for _, row in run.iterrows():
                _point(ax, row["step"], row["fid"], row, style, color=color, size=6.5)
    for ax in (left, right):
        ax.set_yscale("log")
        _log_ticks(ax.yaxis, list(ev["fid"]) + (list(ev.loc[intervals, "fid_lo"]) + list(ev.loc[intervals, "fid_hi"])
                                               if intervals.any() else []))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 5, 10]))
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
        ax.set_xlabel("Training steps")
    left.set_ylabel(_fid_axis_label(ev))
    left.set_title("Scaling model size (colour) at each patch size (line style)", fontsize=10.5)
    right.set_title("Shrinking the patch (colour) at each model size (line style)", fontsize=10.5)
    unfinished = [_unfinished_handle()] if (ev["state"] != "done").any() else []
    bar_handle = [Line2D([], [], color="0.4", marker="|", markersize=10, ls="none",
                         label="95% bootstrap interval\nover each FID's samples")] if intervals.any() else []
    _legend(left, style.size_handles(color=True) + style.line_handles("Patch size", style.patches, style.patch_line)
            + style.extractor_handles() + bar_handle)
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


def plot_loss_vs_compute(df: pd.DataFrame, law: FrontierLaw | None = None) -> Figure:
    """Validation loss vs training compute, log-log: each config's curve (colour per patch, marker per size) and,
    with `law` (`compute_frontier_law`), the frontier points, the fitted law L(C) = a C^-b (+ c) and its band (BCa
    bootstrap over the frontier's points, `fit_saturating_power_law`)."""
    pts = df.dropna(subset=["val_loss", "train_compute_flops"]) if "val_loss" in df else df.iloc[:0]
    require(len(pts) > 0, "plot_loss_vs_compute: no row has both val_loss and train_compute_flops")
    style = _Style.of(df)
    fig, (ax,) = _new_figure(8.6, 5.2)
    for _, run in pts.groupby("run_path", sort=False):
        run = run.sort_values("step")
        ax.plot(run["train_compute_flops"], run["val_loss"], color=style.patch_color(run.iloc[0]["patch"]), lw=1.4,
                alpha=0.8, zorder=2)
        for _, row in run.iterrows():
            _point(ax, row["train_compute_flops"], row["val_loss"], row, style, size=6)
    extra = []
    if law is not None:
        fit, front = law.fit, law.frontier
        ax.plot(front["train_compute_flops"], front["val_loss"], ls="none", marker="o", markersize=13,
                markerfacecolor="none", markeredgecolor="0.2", zorder=4)
        c = np.geomspace(front["train_compute_flops"].min() / 1.5, pts["train_compute_flops"].max() * 1.5, 100)
        ax.plot(c, fit.predict(c), color="black", ls="--", lw=1.4, zorder=3)
        band = np.isfinite(fit.band_lo) & np.isfinite(fit.band_hi) if len(fit.band_compute) else np.array([False])
        law_text = f"$L = {fit.a:.3g}\\,C^{{-{fit.b:.3f}}}" + (f" + {fit.c:.3g}$" if fit.model == "saturating" else "$")
        extra = [Line2D([], [], ls="none", marker="o", markersize=11, markerfacecolor="none", markeredgecolor="0.2",
                        label=f"compute frontier ({fit.n} points)"),
                 Line2D([], [], color="black", ls="--", label=f"fit: {law_text}\nb = {fit.b:.3f} "
                                                               f"[{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]")]
        if band.any():
            ax.fill_between(np.asarray(fit.band_compute)[band], np.asarray(fit.band_lo)[band],
                            np.asarray(fit.band_hi)[band], color="0.6", alpha=0.25, lw=0, zorder=1)
            extra.append(Line2D([], [], color="0.6", lw=8, alpha=0.4,
                                label=f"{fit.level:.0%} band of the law\n(BCa bootstrap of the frontier)"))
        else:
            extra.append(Line2D([], [], ls="none", label="no band: the bootstrap refits failed"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax.yaxis, pts["val_loss"])
    _log_ticks(ax.xaxis, pts["train_compute_flops"], sci=True)
    ax.set_xlabel("Training compute (FLOPs = Gflops × 10⁹ × batch × steps × 3)")
    ax.set_ylabel("Validation loss")
    ax.set_title("Validation loss vs training compute")
    _legend(ax, style.size_handles() + style.patch_handles() + ([_header("")] + extra if extra else []))
    return fig


def plot_sample_grid(df: pd.DataFrame) -> Figure:
    """The sample grid of every config at its last checkpoint: rows = model size, columns = patch size."""
    samples = last_samples(df)
    require(len(samples) > 0, "plot_sample_grid: no run dir holds samples/step_*.png")
    runs = df.drop_duplicates("config").set_index("config")
    style = _Style.of(df)
    cells: dict[tuple[int, int], str] = {}
    for config in samples:
        run = runs.loc[config]
        row = style.sizes.index(str(run["size"])) if str(run["size"]) in style.sizes else len(style.sizes)
        col = style.patches.index(int(run["patch"])) if pd.notna(run["patch"]) else len(style.patches)
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
