"""Writing the sweep report: report.md, report.html, results.csv, fits.json and the figures.

`write_report(sweep_dirs, out_dir)` is what `harness report` runs. Both documents are Jinja2 templates
(templates/) filled from one context; the HTML one is self-contained, its tables written by pandas and
its figures embedded as base64 PNG. The directory is built aside and swapped in whole.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from harness.errors import HarnessError, require
from harness.io import (atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_path, replace_dir,
                        staging_dir)
from harness.report.collect import (SAMPLE_BOOTSTRAP, UNKNOWN_SPREAD, aggregate_replicas, check_extractors,
                                    check_overlay, collect_results, evaluated, fid_description, last_samples,
                                    load_paper_table4, pick_step, rows_at_step, run_table)
from harness.report.figures import (figure_bytes, plot_fid_vs_compute, plot_fid_vs_gflops, plot_fid_vs_steps,
                                    plot_loss_vs_compute, plot_sample_grid)
from harness.report.laws import (FrontierLaw, LogLogFit, compute_frontier_law, fit_loglog, predict_config,
                                 predict_held_out)
from harness.report.stats import (PREDICTION_INTERVAL, PowerLawFit, compute_frontier, fit_power_law, predict_fid,
                                  prediction_points)

# What a report directory holds, by the key write_report returns each path under.
REPORT_FILES = {"md": "report.md", "html": "report.html", "csv": "results.csv", "json": "fits.json",
                "figures": "figures"}
TITLE = "DiT scaling report: FID vs Gflops"
CAPTIONS = {
    "fid_vs_gflops": "FID vs transformer Gflops at step {step:,} (paper Fig. 8): marker = model size, colour = patch size; "
                     "error bars: 95% t interval over seed replicas (black), or one replica's 95% bootstrap interval "
                     "over its samples (grey).",
    "fid_vs_steps": "FID over training for every config (paper Fig. 6 style).",
    "fid_vs_compute": "FID vs total training compute, Gflops x batch x steps x 3 (paper Fig. 9), with the compute frontier.",
    "samples": "Samples of each config at its last checkpoint.",
    "loss_vs_compute": "Validation loss vs training compute per config, with the compute frontier, its fitted law and "
                       "the law's 95% BCa bootstrap band (resampling the frontier's points).",
}


def _markdown_table(table: pd.DataFrame) -> str:
    # pandas' to_markdown pads every column to its widest cell; these rows stay one cell per `|`.
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(table: pd.DataFrame) -> Markup:
    return Markup(table.to_html(index=False, border=0, escape=True))


_TEMPLATES = Environment(loader=PackageLoader("harness.report"), autoescape=select_autoescape(["html.j2"]),
                         trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_TEMPLATES.filters.update(markdown_table=_markdown_table, html_table=_html_table,
                          base64=lambda data: base64.b64encode(data).decode())


def render_markdown(context: dict) -> str:
    """report.md: the report with its figures linked from figures/."""
    return _TEMPLATES.get_template("report.md.j2").render(context)


def render_html(context: dict) -> str:
    """report.html: the report as one self-contained page (figures embedded as base64 PNG)."""
    return _TEMPLATES.get_template("report.html.j2").render(context)


def write_results_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """The results table as CSV (written atomically)."""
    path = Path(path)
    atomic_write_text(path, df.to_csv(index=False))
    return path


def save_figure(fig, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write `name`.png and `name`.svg under `out_dir`; returns {"png": path, "svg": path}."""
    out = {}
    for fmt in ("png", "svg"):
        out[fmt] = Path(out_dir) / f"{name}.{fmt}"
        atomic_write_bytes(out[fmt], figure_bytes(fig, fmt))
    return out


def _fmt(v, kind: str = "g") -> str:
    if not pd.notna(v):
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


def _fit_table(fit: PowerLawFit) -> pd.DataFrame:
    return pd.DataFrame([
        ("configs in the fit", f"{fit.n}"),
        ("slope (log10 FID per log10 Gflops)", f"{fit.slope:.3f}  [{fit.slope_ci[0]:.3f}, {fit.slope_ci[1]:.3f}]"),
        ("intercept (log10 FID at 1 Gflop)", f"{fit.intercept:.3f}"),
        ("R²", f"{fit.r2:.3f}"),
        ("Pearson r (log-log)", f"{fit.r:.3f}  [{fit.r_ci[0]:.3f}, {fit.r_ci[1]:.3f}]"),
        ("law", f"FID ≈ {10 ** fit.intercept:.3g} × Gflops^{fit.slope:.3f}"),
        ("intervals", fit.interval),
    ], columns=["quantity", "value"])


def _run_display(table: pd.DataFrame, step: int) -> pd.DataFrame:
    step_col, lo, hi, acc = (f"{q}_at_{step}" for q in ("fid", "fid_lo", "fid_hi", "class_accuracy"))
    table = table.copy()
    # One column for the interval: "[lo, hi]", or "–" for rows written before the bootstrap existed.
    table[lo] = [f"[{_fmt(a, 'fid')}, {_fmt(b, 'fid')}]" if pd.notna(a) and pd.notna(b) else "–"
                 for a, b in zip(table[lo], table[hi])]
    table[acc] = [f"{v:.1%}" if pd.notna(v) else "–" for v in table[acc]]
    return _display(
        table.drop(columns=[hi]),
        {"params_M": "g", "tokens": "int", "gflops": "g", "steps_done": "int", "max_steps": "int",
         "last_eval_step": "int", step_col: "fid", "fid_last": "fid", "train_compute_flops": "sci", "patch": "int"},
        {"params_M": "params (M)", "gflops": "Gflops", "steps_done": "steps done", "max_steps": "max steps",
         "last_eval_step": "last eval step", step_col: f"FID @ {step:,}",
         lo: "FID 95% interval (bootstrap over samples)", acc: f"class accuracy @ {step:,}",
         "fid_last": "FID (last eval)", "train_compute_flops": "train compute (FLOPs, last eval)"},
    )


def _frontier_display(frontier: pd.DataFrame) -> pd.DataFrame:
    return _display(
        frontier[["train_compute_flops", "fid", "config", "step", "fid_name"]],
        {"train_compute_flops": "sci", "fid": "fid", "step": "int"},
        {"train_compute_flops": "compute budget (FLOPs)", "fid": "best FID", "config": "reached by", "step": "at step"},
    )


def _prediction_display(predictions: list[dict], tagged: bool) -> pd.DataFrame:
    return pd.DataFrame([{
        "config not in the grid": p["where"] + (f" [{p['fid_name']}]" if tagged else ""),
        "Gflops": f"{p['gflops']:.3g}", "predicted FID": f"{p['fid']:.2f}",
        "95% interval": f"[{p['lo']:.2f}, {p['hi']:.2f}]"} for p in predictions])


def _fits(at: pd.DataFrame, names: list[str]) -> tuple[dict[str, PowerLawFit], list[str]]:
    """The power-law fit of each FID kind at the chosen step, and why a kind has none."""
    fits: dict[str, PowerLawFit] = {}
    notes: list[str] = []
    for name in names:
        group = at[at["fid_name"] == name]
        try:
            fits[name] = fit_power_law(group["gflops"], group["fid"])
        except HarnessError as err:
            notes.append(f"{name}: no fit ({err})")
    return fits, notes


def _predictions(fits: dict[str, PowerLawFit], at: pd.DataFrame) -> list[dict]:
    predictions = []
    for name, fit in fits.items():
        for where, g in prediction_points(at.loc[at["fid_name"] == name, "gflops"]):
            fid, lo, hi = predict_fid(fit, g)
            predictions.append({"fid_name": name, "where": where, "gflops": g, "fid": fid, "lo": lo, "hi": hi})
    return predictions


def _has_val_loss(df: pd.DataFrame) -> bool:
    return "val_loss" in df and bool(df["val_loss"].notna().any())


def _loss_lines(df: pd.DataFrame, at: pd.DataFrame, step: int) -> tuple[list[str], FrontierLaw | None, LogLogFit | None]:
    """The val loss headline lines (vs Gflops at `step`, and the compute-frontier law), that law and the fit vs Gflops."""
    if not _has_val_loss(df):
        return ["loss vs compute: not fitted; no result row has val_loss (results written before validation loss "
                "was recorded)"], None, None
    lines, vs_gflops = [], None
    if _has_val_loss(at):
        points = aggregate_replicas(at).dropna(subset=["val_loss_mean"])
        try:
            vs_gflops = fit_loglog(points["gflops"], points["val_loss_mean"], labels=points["config"],
                                   what="val loss vs Gflops")
            lo, hi = vs_gflops.exponent_ci
            lines.append(f"val loss vs Gflops: exponent {vs_gflops.exponent:.3f} [{lo:.3f}, {hi:.3f}], "
                         f"r = {vs_gflops.r:.2f} ({vs_gflops.n} configs at step {step:,}; 95% BCa bootstrap)")
        except HarnessError as err:
            lines.append(f"val loss vs Gflops: not fitted; {str(err).removeprefix('val loss vs Gflops: ')}")
    try:
        law = compute_frontier_law(df)
    except HarnessError as err:
        return lines + [f"loss vs compute: not fitted; {err}"], None, vs_gflops
    fit = law.fit
    c_text = (f"c = {fit.c:.4g} kept by an F-test (p = {fit.f_pvalue:.3g})" if fit.model == "saturating"
              else f"c = 0: the F-test did not support a floor (p = {fit.f_pvalue:.3g})")
    lines.append(f"loss vs compute: L(C) = a C^-b{' + c' if fit.model == 'saturating' else ''}, b = {fit.b:.3f} "
                 f"[{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}] (frontier of {fit.n} points; {c_text})")
    return lines, law, vs_gflops


def _class_accuracy(at: pd.DataFrame) -> dict | None:
    """The class accuracy of the best config's samples (lowest FID, replicas averaged) and of every config; None
    where no row measured it."""
    if "class_accuracy" not in at or not at["class_accuracy"].notna().any():
        return None
    points = aggregate_replicas(at).dropna(subset=["class_accuracy_mean"])
    best = points.loc[points["fid_mean"].idxmin()]
    return {"best_config": best["config"], "best_fid": float(best["fid_mean"]),
            "best_accuracy": float(best["class_accuracy_mean"]), "replicas": int(best["n_replicas"]),
            "by_config": {row.config: float(row.class_accuracy_mean) for row in points.itertuples()}}


def _accuracy_line(accuracy: dict | None, step: int) -> str:
    if accuracy is None:
        return ("class accuracy: not measured (only an extractor that classifies the dataset's classes measures it, "
                "the digits CNN on digits; rows written before it was recorded have none)")
    n, by_config = accuracy["replicas"], accuracy["by_config"].values()
    over = f", mean of {n} replicas" if n > 1 else ""
    return (f"class accuracy: best config {accuracy['best_config']} (FID {accuracy['best_fid']:.2f} at step {step:,}): "
            f"{accuracy['best_accuracy']:.1%} of its samples classified as the class they were conditioned on "
            f"(digits CNN{over}); {min(by_config):.1%} to {max(by_config):.1%} over {len(by_config)} configs")


def _interval_note(at: pd.DataFrame) -> str:
    """Which FID intervals the report shows, in words."""
    sources = set(aggregate_replicas(at)["fid_interval_source"])
    parts = []
    if any(s.startswith("t over") for s in sources):
        parts.append("configs with several seed replicas: the 95% Student t interval of the mean over replicas")
    if SAMPLE_BOOTSTRAP in sources:
        parts.append("a config with one replica: its FID's 95% bootstrap interval over its samples (the sample "
                     "features resampled with scipy.stats.bootstrap, seeded, against the fixed reference statistics; "
                     "the normal interval from the bootstrap standard error, which is conservative)")
    if UNKNOWN_SPREAD in sources:
        parts.append("configs whose rows predate the bootstrap interval have none")
    return "FID intervals: " + "; ".join(parts) + "."


def _headline(fits: dict[str, PowerLawFit], fit_notes: list[str], step: int, tagged: bool, replicas: bool) -> list[str]:
    points = "runs (seed replicas as separate points)" if replicas else "configs"
    lines = []
    for name, fit in fits.items():
        tag = f" ({name})" if tagged else ""
        lines.append(f"FID vs Gflops{tag}: r = {fit.r:.2f} [{fit.r_ci[0]:.2f}, {fit.r_ci[1]:.2f}], exponent "
                     f"{fit.slope:.3f} [{fit.slope_ci[0]:.2f}, {fit.slope_ci[1]:.2f}] ({fit.n} {points} at step "
                     f"{step:,}; {fit.level:.0%} BCa bootstrap)")
    return lines + [f"FID vs Gflops: not fitted; {note}" for note in fit_notes]


def _replica_display(at: pd.DataFrame) -> pd.DataFrame | None:
    """Mean and 95% interval per config where configs have several seed replicas at the step, else None."""
    points = aggregate_replicas(at)
    if not (points["n_replicas"] > 1).any():
        return None
    rows = []
    for r in points.itertuples(index=False):
        row = {"config": r.config, "replicas": r.n_replicas, "train seeds": r.train_seeds, "Gflops": _fmt(r.gflops),
               "FID mean": _fmt(r.fid_mean, "fid"), "FID 95% interval": f"[{_fmt(r.fid_lo, 'fid')}, {_fmt(r.fid_hi, 'fid')}]",
               "interval from": r.fid_interval_source}
        if hasattr(r, "class_accuracy_mean"):
            row["class accuracy (mean)"] = f"{r.class_accuracy_mean:.1%}" if pd.notna(r.class_accuracy_mean) else "–"
        if hasattr(r, "val_loss_mean"):
            row.update({"val loss mean": _fmt(r.val_loss_mean, "g"),
                        "val loss 95% interval": f"[{_fmt(r.val_loss_lo)}, {_fmt(r.val_loss_hi)}]"})
        rows.append(row)
    return pd.DataFrame(rows)


def _notes(df: pd.DataFrame, table: pd.DataFrame, step: int, names: list[str]) -> list[str]:
    """What a reader needs to know before trusting the picture."""
    missing = [r for r in table.itertuples(index=False) if not pd.notna(getattr(r, f"fid_at_{step}"))]
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
    return notes


def write_report(sweep_dirs, out_dir, step: int | None = None, overlay_paper: bool = False,
                 mix_extractors: bool = False, holdout: str | None = None,
                 predict: list[tuple[str, float]] = ()) -> dict[str, Path]:
    """Write the sweep report under `out_dir` and return the paths written.

    Files: report.md, report.html (self-contained: figures embedded as base64 PNG), results.csv
    (every run x evaluated step), fits.json, and figures/<name>.png|svg for fid_vs_gflops, fid_vs_steps (when a
    run has FID at two steps or more), fid_vs_compute, loss_vs_compute (with validation losses) and samples (when
    runs saved sample grids). Keys of the returned
    dict: "md", "html", "csv", "json", "figures" (the figures dir) and "<name>.png" / "<name>.svg".
    `step=None` uses the last step that every finished run reached. `holdout`: a config left out of the fit vs
    Gflops and predicted (`predict_held_out`); `predict`: (label, Gflops) of configs outside the grid
    (`predict_config`). report.md opens with the headline lines: the fits, the loss law and the predictions.
    """
    started = time.time()
    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    final = check_output_path(out_dir, "-o", kind="dir")
    if final.is_dir():  # the directory is replaced whole: it may hold only a previous report
        foreign = sorted(p.name for p in final.iterdir() if p.name not in REPORT_FILES.values())
        require(not foreign, f"-o={final} holds files that are not part of a report ({', '.join(foreign[:5])}); "
                             "give a new directory, an empty one or a previous report's")
    df = collect_results(sweep_dirs)
    names = check_extractors(df, mix_extractors)
    if overlay_paper:
        check_overlay(df)
    step, step_note = pick_step(df, step)
    at = rows_at_step(df, step)
    held_out = predict_held_out(df, holdout, step) if holdout else []
    outside = [p for label, gflops in predict for p in predict_config(df, gflops, step, label=label)]
    loss_lines, law, loss_vs_gflops = _loss_lines(df, at, step)
    accuracy = _class_accuracy(at)
    # Written in a staging directory and swapped in whole: a kill leaves the previous report or the new one.
    out = staging_dir(final)
    paths = {key: out / name for key, name in REPORT_FILES.items()}
    write_results_csv(df, paths["csv"])

    figures = {
        "fid_vs_gflops": plot_fid_vs_gflops(df, step, overlay_paper=overlay_paper, mix_extractors=mix_extractors,
                                            held_out=next((p for p in held_out if p.quantity == "FID"), None)),
    }
    if evaluated(df).groupby("run_path")["step"].nunique().max() > 1:  # not when each run took FID once (eval.fid_every)
        figures["fid_vs_steps"] = plot_fid_vs_steps(df, mix_extractors=mix_extractors)
    figures["fid_vs_compute"] = plot_fid_vs_compute(df, mix_extractors=mix_extractors)
    if _has_val_loss(df):
        figures["loss_vs_compute"] = plot_loss_vs_compute(df, law)
    if last_samples(df):
        figures["samples"] = plot_sample_grid(df)
    for name, fig in figures.items():
        for fmt, path in save_figure(fig, paths["figures"], name).items():
            paths[f"{name}.{fmt}"] = path

    fits, fit_notes = _fits(at, names)
    tag = (lambda n: f" ({n})") if len(names) > 1 else (lambda n: "")
    summary = [f"{fit.summary()}{tag(n)} (log-log, {fit.n} configs at step {step:,}; "
               f"{fit.interval})" for n, fit in fits.items()]
    summary += [f"Gflops vs FID: not fitted; {note}" for note in fit_notes]
    replicas = _replica_display(at)
    headline = (_headline(fits, fit_notes, step, len(names) > 1, replicas is not None) + loss_lines
                + [p.line() for p in held_out + outside] + [_accuracy_line(accuracy, step)])
    predictions = _predictions(fits, at)
    frontier = compute_frontier(df)
    table = run_table(df, step)
    paper_fit = paper_line = None
    if overlay_paper:
        paper = load_paper_table4()
        paper_fit = fit_power_law(paper["gflops"], paper["fid50k_400k"])
        paper_line = (f"Paper Table 4 (400K steps, 12 models, Inception FID-50K): r = {paper_fit.r:.3f} "
                      f"[{paper_fit.r_ci[0]:.3f}, {paper_fit.r_ci[1]:.3f}], slope = {paper_fit.slope:.3f} "
                      "(the paper reports r = -0.93).")
    fid_text = fid_description(df)
    notes = [_interval_note(at)] + _notes(df, table, step, names)

    context = {
        "title": TITLE, "files": REPORT_FILES, "sweeps": ", ".join(str(Path(d)) for d in sweep_dirs),
        "n_runs": df["run_path"].nunique(), "n_evaluations": len(evaluated(df)),
        "n_loss_only": int((df["fid"].isna() & df["step"].notna() & df["val_loss"].notna()).sum()), "fid_text": fid_text,
        "headline": headline, "replicas": replicas,
        "summary": summary, "step_note": step_note, "runs": _run_display(table, step),
        "fits": {n: _fit_table(f) for n, f in fits.items()}, "several_kinds": len(names) > 1, "fit_notes": fit_notes,
        "paper_line": paper_line, "predictions": _prediction_display(predictions, len(names) > 1) if predictions else None,
        "prediction_interval": PREDICTION_INTERVAL, "frontier": _frontier_display(frontier),
        "figures": [{"name": name, "caption": CAPTIONS[name].format(step=step), "png": paths[f"{name}.png"].read_bytes()}
                    for name in figures],
        "notes": notes, "seconds": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(paths["md"], render_markdown(context))
    atomic_write_text(paths["html"], render_html(context))
    atomic_write_json(paths["json"], {
        "step": step, "step_note": step_note, "fid_names": names, "fid": fid_text, "summary": summary,
        "headline": headline, "held_out": [asdict(p) for p in held_out],
        "predicted_configs": [asdict(p) for p in outside], "loss_law": asdict(law.fit) if law is not None else None,
        "val_loss_vs_gflops": asdict(loss_vs_gflops) if loss_vs_gflops is not None else None, "class_accuracy": accuracy,
        "fits": {n: asdict(f) for n, f in fits.items()}, "predictions": predictions,
        "prediction_interval": PREDICTION_INTERVAL,
        "paper_fit": asdict(paper_fit) if paper_fit is not None else None,
        "frontier": frontier.to_dict(orient="records"), "notes": notes,
    })
    replace_dir(out, final)
    return {key: final / path.relative_to(out) for key, path in paths.items()}
