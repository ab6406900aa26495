"""The results table: every evaluation under one or more sweep dirs as one pandas DataFrame.

Also the choices a report or a notebook makes from that table (which step to compare the configs at,
which FID kind) and the per-run summary `run_table`. The run dirs are read through `harness.run_dir`,
which owns their layout and the results row (`ResultRow`, `RESULT_COLUMNS`).

FIDs computed in different feature spaces (the digits CNN's `fid_digits` vs Inception's
`fid_inception`) are different quantities; nothing here puts them on one axis unless asked.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, get_args, get_type_hints

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from harness.errors import HarnessError, require
from harness.flops import REFERENCE_DIR, training_compute_flops
from harness.io import read_yaml
from harness.run_dir import RESULT_COLUMNS, SAMPLES, ResultRow, RunDir, RunState, find_run_dirs

PAPER_TABLE4 = REFERENCE_DIR / "paper_table4.csv"  # shared with harness.flops

# What collect_results adds from the run dir itself.
RUN_COLUMNS = ("config", "state", "state_step", "max_steps", "error", "run_path", "sweep_dir", "train_seed", "replica_key")
# The config.yaml keys that do not make runs different configs: seed replicas differ only in these.
REPLICA_IGNORED_KEYS = ("seed", "run_name", "on_config_change", "logger")
# Read as numbers: a hand-edited or foreign results row may hold anything.
NUMERIC_COLUMNS = tuple(name for name, hint in get_type_hints(ResultRow).items()
                        if {int, float} & {hint, *get_args(hint)}) + ("state_step", "max_steps", "train_seed")


def _config_row(run: RunDir) -> dict:
    """What the run's config says about it: the table row of a run with no evaluation yet."""
    try:
        cfg = OmegaConf.to_container(read_yaml(run.config_file), resolve=False)
    except Exception:  # no config, or one we cannot parse: the row keeps the run dir and its state
        cfg = {}
    model, data, trainer = (cfg.get(k) or {} for k in ("model", "data", "trainer"))
    return {
        "run_id": cfg.get("run_name", run.path.name), "run_dir": str(run), "sweep": cfg.get("sweep_name"),
        "model": model.get("name"), "size": model.get("size"), "patch": model.get("patch_size"),
        "conditioning": model.get("conditioning"), "depth": model.get("depth"),
        "hidden_size": model.get("hidden_size"), "num_heads": model.get("num_heads"),
        "global_batch_size": trainer.get("global_batch_size"), "dataset": data.get("name"),
        "image_size": data.get("image_size"),
    }


def _replica_info(run: RunDir) -> dict:
    """The training seed (config.yaml `seed`; the results row's `seed` is the evaluation's) and a key shared by runs
    whose configs differ only in REPLICA_IGNORED_KEYS; without a readable config the run dir is its own key."""
    try:
        cfg = OmegaConf.to_container(read_yaml(run.config_file), resolve=False)
    except Exception:  # no config, or one we cannot parse: the run is a replica of nothing
        return {"train_seed": None, "replica_key": str(run)}
    rest = {k: v for k, v in cfg.items() if k not in REPLICA_IGNORED_KEYS}
    key = hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"train_seed": cfg.get("seed"), "replica_key": key}


def _run_rows(run: RunDir, sweep_dir: Path) -> list[dict]:
    state = run.read_state() or RunState(state=None, step=None, max_steps=None)
    info = {
        "state": str(state.state or "unknown"), "state_step": state.step, "max_steps": state.max_steps,
        "error": state.error, "run_path": str(run), "sweep_dir": str(sweep_dir), **_replica_info(run),
    }
    rows = run.results() or [_config_row(run)]
    return [{**row, **info} for row in rows]


def _config_labels(df: pd.DataFrame) -> pd.Series:
    """A short name per run: the model, plus the conditioning and where it came from where needed to tell runs apart."""
    runs = df.drop_duplicates("run_path").set_index("run_path")
    base = runs["model"].fillna(pd.Series(runs.index.map(lambda p: Path(p).name), index=runs.index)).astype(str)
    if runs["conditioning"].nunique(dropna=True) > 1:
        base = base + " " + runs["conditioning"].map(lambda value: "?" if pd.isna(value) else str(value))
    label = base.copy()
    # Runs of one model: name what tells them apart, the sweep, else the sweep dir, else its full path, and
    # within one sweep (seeds, a swept learning rate) the run dir.
    run_dir_names = pd.Series(runs.index.map(lambda p: Path(p).name), index=runs.index)
    for where in (runs["sweep"], runs["sweep_dir"].map(lambda p: Path(p).name), runs["sweep_dir"], run_dir_names):
        dup = label.duplicated(keep=False)
        if not dup.any():
            break
        where = where.map(lambda value: "?" if pd.isna(value) else str(value))
        tells = where[dup].groupby(label[dup]).transform("nunique") > 1
        named = tells[tells].index
        label[named] = label[named] + " (" + where[named] + ")"
    return df["run_path"].map(label)


def size_order(df: pd.DataFrame) -> list[str]:
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
        require(sweep_dir.is_dir(), f"sweep dir {sweep_dir}: does not exist or is not a directory")
        found = [row for run in find_run_dirs(sweep_dir) for row in _run_rows(RunDir(run), sweep_dir)]
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
            warnings.warn(f"{RunDir(run_path).results_file}: {col}={value} is not a number; read as missing",
                          stacklevel=2)
        df[col] = numbers
    missing = df["train_compute_flops"].isna()
    df.loc[missing, "train_compute_flops"] = training_compute_flops(df["gflops"], df["global_batch_size"], df["step"])[missing]
    df["config"] = _config_labels(df)
    size_rank = {s: i for i, s in enumerate(size_order(df))}
    df["_size_rank"] = df["size"].map(size_rank).fillna(len(size_rank))
    df = df.sort_values(["_size_rank", "patch", "config", "step"], ascending=[True, False, True, True])
    extra = [c for c in df.columns if c not in RESULT_COLUMNS + RUN_COLUMNS and not c.startswith("_")]
    first = ["config", "state", "step", "fid", "fid_name", "gflops"]
    order = first + [c for c in RESULT_COLUMNS + RUN_COLUMNS if c not in first] + extra
    return df[order].reset_index(drop=True)


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


def check_overlay(df: pd.DataFrame) -> None:
    """HarnessError unless the paper's points can share an axis with `df`'s FIDs (Inception FID only)."""
    names = fid_names(df)
    require(
        names == ["fid_inception"],
        f"overlay_paper: the paper's points are Inception FID-50K on ImageNet 256x256 at 400K steps; this sweep "
        f"reports {', '.join(names) or 'no FID kind'}, which is on a different scale: drop the overlay (--overlay-paper)",
    )


def fid_description(df: pd.DataFrame) -> str:
    """What the FIDs in `df` are, in words (fid_digits is never called Inception FID)."""
    ev = evaluated(df)
    parts = []
    for name, g in ev.groupby(ev["fid_name"].fillna("unknown").astype(str)):
        samples = ", ".join(f"{int(n):,}" for n in sorted(g["num_samples"].dropna().unique())) or "?"
        samplers = g["sampler"].map(lambda value: "?" if pd.isna(value) else str(value))
        proto = ", ".join(sorted({f"{s}, cfg scale {c:g}" for s, c in zip(samplers, g["cfg_scale"].fillna(1.0))}))
        if name == "fid_digits":
            what = ("fid_digits: the Frechet distance in the features of the harness's digits CNN, "
                    "NOT Inception FID and not comparable with the paper's ImageNet numbers")
        elif name == "fid_inception":
            what = "Inception FID (torch-fidelity inception-v3-compat features)"
        else:
            what = f"{name} (feature extractor {', '.join(g['feature_extractor'].dropna().astype(str).unique()) or '?'})"
        parts.append(f"{what}; {samples} samples; {proto}")
    return " | ".join(parts)


def load_paper_table4() -> pd.DataFrame:
    """The paper's Table 4 (12 models: params, Gflops, FID-50K at 400K steps), shipped as package data."""
    return pd.read_csv(PAPER_TABLE4)


def run_table(df: pd.DataFrame, step: int) -> pd.DataFrame:
    """One row per run: shape, Gflops, state, the FID at `step` with its bootstrap interval over the samples
    (`fid_lo_at_STEP`, `fid_hi_at_STEP`; NaN for rows written before it existed), the class accuracy of its samples at
    `step` (`class_accuracy_at_STEP`; NaN where the extractor does not classify the dataset), and the FID at its last
    evaluated step."""
    rows = []
    for config, run in df.groupby("config", sort=False):
        run_ev = evaluated(run).sort_values("step")
        first = run.iloc[0]
        at = run_ev[run_ev["step"] == step]
        last = run_ev.iloc[-1] if len(run_ev) else None

        def at_step(col):
            return at[col].iloc[-1] if len(at) and col in at else np.nan

        rows.append({
            "config": config, "size": first["size"], "patch": first["patch"],
            "params_M": first["params"] / 1e6 if pd.notna(first["params"]) else np.nan,
            "tokens": first["tokens"], "gflops": first["gflops"], "state": first["state"],
            "steps_done": first["state_step"], "max_steps": first["max_steps"],
            "last_eval_step": last["step"] if last is not None else np.nan,
            f"fid_at_{step}": at_step("fid"), f"fid_lo_at_{step}": at_step("fid_lo"),
            f"fid_hi_at_{step}": at_step("fid_hi"), f"class_accuracy_at_{step}": at_step("class_accuracy"),
            "fid_last": last["fid"] if last is not None else np.nan,
            "train_compute_flops": last["train_compute_flops"] if last is not None else np.nan,
        })
    return pd.DataFrame(rows)


REPLICA_STATS = ("fid", "val_loss", "class_accuracy")
# How aggregate_replicas' FID interval was made (its `fid_interval_source`).
REPLICA_T = "t over {n} replicas"
SAMPLE_BOOTSTRAP = "one replica: bootstrap over its samples"
UNKNOWN_SPREAD = "one replica: unknown (a row written before the FID's bootstrap interval was recorded)"


def _replica_group_label(group: pd.DataFrame) -> str:
    """The label of a config's replicas: their common label once each run dir's name is dropped from it (the
    labels name run dirs only to tell replicas apart), else the labels joined."""
    labels = {label.replace(f" ({Path(run_path).name})", "") for label, run_path in zip(group["config"], group["run_path"])}
    return labels.pop() if len(labels) == 1 else " + ".join(sorted(set(group["config"])))


def aggregate_replicas(df: pd.DataFrame, exclude_steps: Iterable[int] = (), level: float = 0.95) -> pd.DataFrame:
    """Seed replicas (runs sharing a `replica_key`) as one row per replica group and step.

    Columns: `config` (the group's label: its runs' labels joined), `replica_key`, `step`, `gflops`,
    `train_compute_flops`, `n_replicas`, `train_seeds`, and per quantity q in REPLICA_STATS present in `df`:
    `q_mean`, `q_std` (ddof 1), `q_lo`, `q_hi` (the `level` Student t interval of the mean over replicas,
    scipy.stats.t with n - 1 dof). With one replica the spread over replicas is unknown: std and interval are NaN,
    except the FID's, which is then the row's own bootstrap interval over its samples (fid_lo, fid_hi; see
    harness.evaluate.fid.fid_bootstrap). `fid_interval_source` says which: REPLICA_T, SAMPLE_BOOTSTRAP, or
    UNKNOWN_SPREAD for a row written before the bootstrap existed. HarnessError if a replica misses an evaluation step
    that another replica of its group has, unless the step is in `exclude_steps`.
    """
    ev = evaluated(df)
    ev = ev[~ev["step"].isin([int(s) for s in exclude_steps])]
    require(len(ev) > 0, "aggregate_replicas: no evaluated rows (after the excluded steps)")
    quantities = [q for q in REPLICA_STATS if q in ev and ev[q].notna().any()]
    rows = []
    for key, group in ev.groupby("replica_key", sort=False):
        steps = {run: set(g["step"]) for run, g in group.groupby("config")}
        every = set.union(*steps.values())
        for run, have in steps.items():
            missing = sorted(every - have)
            require(not missing, f"aggregate_replicas: replica {run} has no evaluation at step(s) "
                                 f"{_steps_text(missing)}, which other replicas of its config have; finish it, drop it, "
                                 "or exclude those steps (exclude_steps)")
        label = _replica_group_label(group)
        for step, at in group.groupby("step"):
            n = len(at)
            row = {"config": label, "replica_key": key, "step": int(step), "gflops": at["gflops"].iloc[0],
                   "train_compute_flops": at["train_compute_flops"].iloc[0], "n_replicas": n,
                   "train_seeds": ", ".join(str(int(s)) if pd.notna(s) else "?" for s in at["train_seed"])}
            for q in quantities:
                values = at[q].dropna().to_numpy(dtype=float)
                k = len(values)
                mean = float(values.mean()) if k else np.nan
                std = float(values.std(ddof=1)) if k > 1 else np.nan
                half = float(stats.t.ppf((1 + level) / 2, k - 1) * std / np.sqrt(k)) if k > 1 else np.nan
                row.update({f"{q}_mean": mean, f"{q}_std": std, f"{q}_n": k, f"{q}_lo": mean - half, f"{q}_hi": mean + half})
            if n > 1:
                row["fid_interval_source"] = REPLICA_T.format(n=n)
            elif pd.notna(at["fid_lo"].iloc[0]) and pd.notna(at["fid_hi"].iloc[0]):
                # One replica: the spread of its FID over its own samples is the uncertainty there is to show.
                row.update(fid_lo=float(at["fid_lo"].iloc[0]), fid_hi=float(at["fid_hi"].iloc[0]),
                           fid_interval_source=SAMPLE_BOOTSTRAP)
            else:
                row["fid_interval_source"] = UNKNOWN_SPREAD
            rows.append(row)
    return pd.DataFrame(rows)


def last_samples(df: pd.DataFrame) -> dict[str, tuple[Path, int]]:
    """Config -> (the sample grid PNG at the run's last checkpoint, its step), for runs that saved samples."""
    found = {}
    for (config, run_path), _ in df.groupby(["config", "run_path"], sort=False):
        pngs = []
        # RunDir names a step's sample file (sample_file) but has no listing of them.
        for p in (RunDir(run_path).path / SAMPLES).glob("step_*.png"):
            try:
                pngs.append((int(p.stem.split("_", 1)[1]), p))
            except ValueError:
                continue
        if pngs:
            step, path = max(pngs)
            found[config] = (path, step)
    return found
