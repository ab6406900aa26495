"""A sweep's grid and its plan: the points Hydra multirun would launch, every check a launch makes before
anything is written or submitted, what a launch would do with each run, and what the grid costs.

- `expand_grid`: the sweep's points, composed as Hydra's basic sweeper forms them (`RunSpec` each);
- `check_grid`, `input_problems`, `check_sweep_dir`: what stops a launch, all problems at once;
- `hand_to_launcher` / `checked_specs`: the checked points, from the launch that checked them to the harness
  launcher that Hydra starts next, which plans and submits them without checking them again;
- `plan_runs`: which runs to submit (not done, no job still queued or running) and why;
- `plan_row`, `format_plan`: compute, a GPU-hour estimate from `sweeps/throughput.yaml` and the plan table.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import (CONF_DIR, composition_error, evaluation_steps, latent_geometry, resolve_device,
                            samples_fid_at)
from harness.config.checks import check_run_inputs, validate
from harness.diffusion import parse_sampler, space_timesteps
from harness.errors import HarnessError, first_line, require
from harness.flops import count_flops, is_paper_setting, paper_gflops, training_compute_flops
from harness.io import atomic_write_text, check_output_path, read_jsonl, text_table
from harness.run_dir import RunDir
from harness.sweep import schedulers
from harness.sweep.status import SWEEP_RECORD, newest_checkpoint_step, read_sweep_record
from harness.train.runtime import achieved_tflops

REPO = Path(__file__).resolve().parents[2]
SWEEPS_DIR = REPO / "sweeps"
THROUGHPUT_FILE = SWEEPS_DIR / "throughput.yaml"
NOT_SWEEPS = {"throughput"}          # yaml files in sweeps/ that are not sweep definitions


def available_sweeps() -> list[str]:
    """The sweep definitions in sweeps/."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if p.stem not in NOT_SWEEPS)


#################################################################################
#                           Composing the grid                                  #
#################################################################################


@dataclass
class RunSpec:
    """One grid point: its overrides and composed config (with the `hydra` node), or why it did not compose."""

    index: int
    overrides: list[str]
    cfg: DictConfig | None = None
    error: str | None = None
    label: str = ""

    @property
    def run_name(self) -> str:
        return str(self.cfg.run_name)

    @property
    def sweep_dir(self) -> Path:
        return Path(str(self.cfg.hydra.sweep.dir)).absolute()

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / str(self.cfg.hydra.sweep.subdir)


def searchpath_override() -> str:
    """Sweeps are primary configs in sweeps/ that include `train` and the groups of conf/."""
    return f"hydra.searchpath=[file://{CONF_DIR}]"


@contextmanager
def hydra_context(config_dir: Path = SWEEPS_DIR):
    """Hydra initialised on sweeps/ (conf/ on the search path), as `harness sweep` runs it; on conf/ for the
    train app's own multirun."""
    with initialize_config_dir(config_dir=str(config_dir), job_name="train", version_base="1.3"):
        yield


def _compose(name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=name, overrides=[*overrides, searchpath_override()], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise HarnessError(composition_error(err)) from None


def _is_hydra_override(text: str) -> bool:
    key = text.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def expand_grid(name: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, list[RunSpec]]:
    """The sweep's base config and one RunSpec per grid point, as Hydra's basic sweeper forms them
    (`name="train"`: the grid of `harness train -m`).

    Command-line sweeps (`model=a,b`) replace the sweep file's values for that key. Points that do
    not compose carry their error instead of a config. Must run inside `hydra_context()`.
    """
    require(name in available_sweeps() or name == "train",
            f"unknown sweep {name!r}; available in {SWEEPS_DIR}: {', '.join(available_sweeps())}")
    parsed = schedulers.parse_overrides(list(overrides))
    hydra_overrides = [text for text, _ in parsed if _is_hydra_override(text)]
    task_overrides = [text for text, _ in parsed if not _is_hydra_override(text)]
    fixed = [text for text, sweeps in parsed if not sweeps]
    base = _compose(name, fixed)
    schedulers.set_hydra_config(base)
    params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
    try:
        points = schedulers.sweep_points([*params, *task_overrides])
    except HarnessError as err:
        raise HarnessError(f"sweep {name}: {err}") from None
    specs = []
    for index, point in enumerate(points):
        spec = RunSpec(index, point)
        try:
            spec.cfg = _compose(name, [*point, *hydra_overrides])
        except HarnessError as err:
            spec.error = str(err)
        specs.append(spec)
    label_points(specs)
    return base, specs


def label_points(specs: list[RunSpec]) -> None:
    """Name each point by the overrides that differ across the grid (e.g. `model=mini-S/2`)."""
    values: dict[str, set[str]] = {}
    for spec in specs:
        for o in spec.overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1}
    for spec in specs:
        spec.label = " ".join(o for o in spec.overrides if o.partition("=")[0] in varying) or " ".join(spec.overrides)


def task_config(cfg: DictConfig) -> DictConfig:
    """The config a run's task function sees: without the `hydra` node (as Hydra's run_job hands it over)."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


#################################################################################
#                       Checks before anything is submitted                     #
#################################################################################


def check_grid(name: str, specs: list[RunSpec], executor: str | None, inputs: bool = True) -> None:
    """Validate every point (config, job layout unless `executor` is None, unique run dirs and, with `inputs`,
    the files it will read); raise one error listing every problem."""
    found: dict[str, list[str]] = {}  # problem -> the points it stops
    for spec in specs:
        if spec.error is not None:
            found.setdefault(spec.error, []).append(spec.label)
            continue
        try:
            validate(spec.cfg)
            if executor != "slurm":  # the runs use this machine: a device it lacks is refused here
                resolve_device(spec.cfg.trainer.device, "trainer.device")
            if executor is not None:
                layout = schedulers.job_layout(spec.cfg, executor)
                batch = int(spec.cfg.trainer.global_batch_size)
                require(batch % layout.world_size == 0, f"trainer.global_batch_size={batch} is not divisible by the "
                                                        f"job's {layout.world_size} processes (nodes x tasks_per_node)")
        except HarnessError as err:
            found.setdefault(str(err), []).append(spec.label)
        except OmegaConfBaseException as err:
            found.setdefault(first_line(err), []).append(spec.label)
    errors = _problem_lines(found, len(specs))
    by_dir: dict[Path, list[str]] = {}
    for spec in specs:
        if spec.cfg is not None:
            by_dir.setdefault(spec.run_dir, []).append(spec.label)
    for run_dir, labels in by_dir.items():
        if len(labels) > 1:
            errors.append(f"{' | '.join(labels)}: share the run dir {run_dir}; put the swept key into run_name")
    if inputs and not errors:
        errors = input_problems(specs)
    if len(errors) == 1:
        raise HarnessError(f"sweep {name}: {errors[0]} (nothing was submitted)")
    if errors:
        raise HarnessError(f"sweep {name}: {len(errors)} problems in a grid of {len(specs)} runs; nothing was submitted:\n"
                           + "\n".join(f"  - {e}" for e in errors))


def _problem_lines(found: dict[str, list[str]], grid_size: int) -> list[str]:
    """One line per distinct problem, naming the points it stops ("every run" when it stops them all)."""
    return [f"{'every run' if len(labels) == grid_size > 1 else ' | '.join(labels)}: {problem}"
            for problem, labels in found.items()]


def input_problems(specs: list[RunSpec]) -> list[str]:
    """The files the points will read (data, VAE, FID extractor and reference: check_run_inputs), checked once per
    distinct setting; one line per problem, naming the points it stops."""
    checked: dict[str, str | None] = {}
    found: dict[str, list[str]] = {}
    for spec in specs:
        key = OmegaConf.to_yaml(OmegaConf.masked_copy(spec.cfg, ["data", "autoencoder", "eval", "diffusion"]), resolve=True)
        if key not in checked:
            try:
                check_run_inputs(spec.cfg)
                checked[key] = None
            except HarnessError as err:
                checked[key] = str(err)
        if checked[key] is not None:
            found.setdefault(checked[key], []).append(spec.label)
    return _problem_lines(found, len(specs))


def check_sweep_dir(name: str, specs: list[RunSpec]) -> None:
    """Refuse a sweep dir that cannot be written, holds another sweep, or holds runs whose config changed (unless
    on_config_change allows)."""
    if not specs:
        return
    sweep_dir = specs[0].sweep_dir
    check_output_path(sweep_dir, "hydra.sweep.dir", kind="dir")
    record = read_sweep_record(sweep_dir)
    if record is not None:
        old = record.get("name")
        require(old == name, f"{sweep_dir} holds the sweep {old!r}, not {name!r}; launch into another directory "
                             f"(hydra.sweep.dir=DIR) or remove it")
    changed = [f"{spec.run_name}: {difference}" for spec in specs
               if (difference := RunDir(spec.run_dir).difference(spec.cfg))]
    policy = str(specs[0].cfg.on_config_change)
    advice = "set on_config_change=resume to continue {} or on_config_change=overwrite to start over"
    if len(changed) == 1 and policy == "refuse":
        raise HarnessError(f"{sweep_dir} holds a run of sweep {name!r} with a different config ({changed[0]}); "
                           + advice.format("it"))
    if changed and policy == "refuse":
        raise HarnessError(f"{sweep_dir} holds runs of sweep {name!r} with a different config; {advice.format('them')}:\n"
                           + "\n".join(f"  - {c}" for c in changed))


# Hydra builds the launcher from the config, so a launch cannot hand it the points it checked as an argument: it
# leaves them here, keyed by their overrides (what Hydra hands the launcher), for the multirun it starts next.
_checked_points: dict[tuple[str, ...], RunSpec] = {}


def hand_to_launcher(specs: list[RunSpec]) -> None:
    """Leave the checked points of a grid for the harness launcher of the multirun that follows in this process."""
    _checked_points.clear()
    _checked_points.update((tuple(spec.overrides), spec) for spec in specs)


def checked_specs(job_overrides: Sequence[Sequence[str]]) -> list[RunSpec]:
    """The checked points of the jobs Hydra hands the launcher."""
    unchecked = [" ".join(overrides) for overrides in job_overrides if tuple(overrides) not in _checked_points]
    require(not unchecked, f"{unchecked[0] if unchecked else ''}: not a point of a checked grid; the harness launchers "
                           "launch the grids that `harness sweep` and `harness train -m` check")
    return [_checked_points[tuple(overrides)] for overrides in job_overrides]


def write_sweep_record(name: str, base: DictConfig, specs: list[RunSpec], overrides: list[str]) -> Path:
    """`sweep.yaml` in the sweep dir: the sweep's name, command-line overrides, grid and resolved config."""
    sweep_dir = specs[0].sweep_dir
    record = {
        "name": name,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "overrides": list(overrides),
        "grid": {spec.run_name: spec.overrides for spec in specs},
        "launcher": OmegaConf.to_container(base.hydra.launcher, resolve=False),
        "config": OmegaConf.to_container(task_config(base), resolve=True),
    }
    path = sweep_dir / SWEEP_RECORD
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(record)))
    return path


#################################################################################
#                       Which runs a launch submits                             #
#################################################################################


@dataclass
class Decision:
    spec: RunSpec
    submit: bool
    reason: str


def plan_runs(specs: list[RunSpec], executor: str, queue: dict[str, dict] | None) -> list[Decision]:
    """Which runs to submit: not done (or to be started over under on_config_change=overwrite) and no job of
    theirs still queued or running."""
    submissions = schedulers.last_submissions(specs[0].sweep_dir) if specs else {}
    decisions = []
    for spec in specs:
        run = RunDir(spec.run_dir)
        state = run.read_state()
        max_steps = int(spec.cfg.trainer.max_steps)
        overwrite = spec.cfg.on_config_change == "overwrite" and run.difference(spec.cfg)
        if state and state.state == "done" and int(state.step or 0) >= max_steps and not overwrite:
            decisions.append(Decision(spec, False, f"done at step {state.step}"))
            continue
        job = schedulers.active_job(spec.cfg, spec.sweep_dir, submissions.get(spec.run_name), state, executor, queue)
        if job is not None:
            decisions.append(Decision(spec, False, f"job {job[0]} is {job[1].lower()}"))
            continue
        step = newest_checkpoint_step(spec.run_dir)
        if overwrite:
            reason = f"start over: on_config_change=overwrite moves the old run aside ({overwrite})"
        elif step is not None:
            reason = f"resume from step {step}"
        elif state and state.state == "failed":
            reason = "retry (failed before its first checkpoint)"
        else:
            reason = "new"
        decisions.append(Decision(spec, True, reason))
    return decisions


#################################################################################
#                        Dry run: compute and GPU-hours                         #
#################################################################################


def sampling_steps(sampler: str, num_timesteps: int) -> int:
    """Denoising steps of one sample under `eval.sampler` (e.g. ddpm250 -> 250)."""
    return len(space_timesteps(num_timesteps, parse_sampler(sampler, num_timesteps)[1]))


def evaluation_count(ev, max_steps: int) -> tuple[int, int]:
    """A run's evaluations and, of those, the ones that sample for FID."""
    steps = evaluation_steps(ev, max_steps)
    return len(steps), sum(samples_fid_at(ev, step, max_steps) for step in steps)


def load_throughput(path: Path = THROUGHPUT_FILE) -> dict:
    require(Path(path).exists(), f"{path} is missing: it holds the throughput behind the GPU-hour estimate")
    table = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    require(table.get("device") in (table.get("devices") or {}),
            f"{path}: device={table.get('device')!r} is not one of its devices ({', '.join(table.get('devices') or {})})")
    return table


def _bench_rate(table: dict, device: str, model: str, kind: str, guided: bool) -> float | None:
    """images/s of `kind` (train, or one sampling step) from the newest `harness bench` row of this model and device."""
    if not table.get("bench_log"):
        return None
    path = Path(table["bench_log"])
    rate = None
    for row in read_jsonl(path if path.is_absolute() else Path.cwd() / path):
        if device.lower() not in str(row.get("device", "")).lower() or row.get("model") != model:
            continue
        result = row.get(kind) or {}
        if kind == "sample":  # bench times a step without guidance and with scale 1.5 (a doubled batch)
            result = result.get("cfg_1.5" if guided else "no_guidance") or {}
        if result.get("images_per_s"):
            rate = float(result["images_per_s"])
    return rate


def throughput(table: dict, model: str, gflops: float, kind: str, guided: bool = False) -> tuple[float, str]:
    """(images/s per GPU, source) for training (`train`) or one denoising step of sampling (`sample`)."""
    device = table["device"]
    what = "training" if kind == "train" else "sampling"
    measured = ((table.get("measured") or {}).get(device) or {}).get(model) or {}
    halve = 2.0 if guided and kind == "sample" else 1.0   # guidance runs a doubled batch
    if measured.get(f"{kind}_images_per_s"):
        return float(measured[f"{kind}_images_per_s"]) / halve, f"{what} measured ({THROUGHPUT_FILE.name})"
    if (rate := _bench_rate(table, device, model, kind, guided)) is not None:
        return rate, f"{what} measured by harness bench ({table.get('bench_log')})"
    spec = table["devices"][device]
    tflops_per_image = achieved_tflops(gflops, images_per_s=1.0, passes=3.0 if kind == "train" else 1.0)
    rate = spec["peak_tflops"] * spec[f"{kind}_mfu"] / tflops_per_image
    return rate / halve, f"{what} estimated at an assumed {spec[f'{kind}_mfu']:.0%} MFU of {spec['peak_tflops']:g} TFLOP/s"


def plan_row(spec: RunSpec, table: dict, decision: Decision | None = None) -> dict:
    """Everything the dry run says about one run."""
    cfg = spec.cfg
    m, tc, ev = cfg.model, cfg.trainer, cfg.eval
    geometry = latent_geometry(cfg)
    counted = count_flops(m, geometry)
    gflops = float(counted["gflops"])
    layout = schedulers.job_layout(cfg, "slurm")
    steps = int(tc.max_steps)
    batch = int(tc.global_batch_size)
    evals, fid_evals = evaluation_count(ev, steps)
    samples = fid_evals * int(ev.num_samples)
    guided = float(ev.cfg_scale) > 1.0
    train_rate, train_source = throughput(table, str(m.name), gflops, "train")
    sample_rate, sample_source = throughput(table, str(m.name), gflops, "sample", guided)
    denoise = sampling_steps(str(ev.sampler), int(cfg.diffusion.num_timesteps)) if fid_evals else 0
    on_gpu = layout.gpus > 0
    train_h = steps * batch / train_rate / 3600 if on_gpu else None
    eval_h = samples * denoise / sample_rate / 3600 if on_gpu else None
    total_h = (train_h or 0) + (eval_h or 0) if on_gpu else None
    wall_h = total_h / layout.gpus if on_gpu else None
    return {
        "run": spec.run_name, "model": str(m.name), "conditioning": str(m.conditioning), "patch": int(m.patch_size),
        "tokens": int(counted["tokens"]), "params": int(counted["params"]), "gflops": gflops,
        "paper_gflops": paper_gflops(str(m.name), str(m.conditioning)) if is_paper_setting(cfg) else None,
        "batch": batch, "steps": steps, "train_compute_flops": training_compute_flops(gflops, batch, steps),
        "evaluations": evals, "fid_samples": samples, "sampler": str(ev.sampler), "gpus": layout.gpus,
        "nodes": layout.nodes, "timeout_min": layout.timeout_min, "train_gpu_hours": train_h,
        "eval_gpu_hours": eval_h, "gpu_hours": total_h, "wall_hours": wall_h,
        "requeues_needed": math.ceil(wall_h * 60 / layout.timeout_min) - 1 if wall_h else 0,
        "sources": sorted({train_source, sample_source}) if on_gpu else [],
        "action": ("submit: " if decision.submit else "skip: ") + decision.reason if decision else "",
    }


def _fmt_gflops(value: float) -> str:
    return f"{value:.3f}" if value >= 0.1 else f"{value:.5f}"


def _fmt_hours(value) -> str:
    return "-" if value is None else f"{value:,.1f}"


def format_plan(plan: dict) -> str:
    """A `plan_sweep` as text: the table, totals, the source of the estimate, one sbatch script and what a launch
    from here would refuse."""
    name, sweep_dir, rows, executor = plan["name"], plan["sweep_dir"], plan["rows"], plan["executor"]
    script, max_num_timeout, device = plan["script"], plan["max_num_timeout"], plan["device"]
    header = ["run", "model", "patch", "tokens", "params (M)", "Gflops", "paper", "train compute", "FID samples",
              "GPUs", "GPU-h", "wall h", "action"]
    body = [[r["run"], r["model"] if r["conditioning"] == "adaln_zero" else f"{r['model']} {r['conditioning']}",
             str(r["patch"]), str(r["tokens"]), f"{r['params'] / 1e6:.1f}", _fmt_gflops(r["gflops"]),
             "" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}", f"{r['train_compute_flops']:.3g}",
             f"{r['fid_samples']:,}", str(r["gpus"]), _fmt_hours(r["gpu_hours"]), _fmt_hours(r["wall_hours"]),
             r["action"]] for r in rows]
    on_gpu = [r for r in rows if r["gpu_hours"] is not None]
    total = ["total", "", "", "", "", "", "", f"{sum(r['train_compute_flops'] for r in rows):.3g}",
             f"{sum(r['fid_samples'] for r in rows):,}", str(sum(r["gpus"] for r in rows)),
             _fmt_hours(sum(r["gpu_hours"] for r in on_gpu)) if on_gpu else "-", "", ""]
    lines = [f"sweep {name}: {len(rows)} runs in {sweep_dir} (launcher: {executor}; dry run, nothing submitted)",
             *text_table(header, [*body, total], left={0, 1, 12}), "",
             "Gflops: fvcore, one forward pass of one image (1 multiply-add = 1 flop); paper: Table 4 / Sec. 3.2.",
             "train compute = Gflops x batch x steps x 3 (paper Fig. 9); FID samples = evaluations that sample (eval.fid_every) x eval.num_samples."]
    models_by_source: dict[str, list[str]] = {}
    for r in rows:
        for source in r["sources"]:
            models_by_source.setdefault(source, []).append(r["model"])
    if models_by_source:
        lines.append(f"GPU-hours (training + FID sampling) on {device}; edit {THROUGHPUT_FILE.relative_to(REPO)} "
                     "or measure with `harness bench`:")
        lines += [f"  {source}: {', '.join(dict.fromkeys(models))}" for source, models in sorted(models_by_source.items())]
        lines.append("wall h = GPU-hours / GPUs of the run (perfect scaling assumed).")
    if len(on_gpu) < len(rows):
        lines.append("CPU runs (trainer.device=cpu) have no GPU-hour estimate.")
    if max_num_timeout is not None:
        for r in rows:
            if r["requeues_needed"] > max_num_timeout:
                lines.append(f"warning: {r['run']} needs ~{r['wall_hours']:.0f} h but gets {r['timeout_min']} min "
                             f"x {max_num_timeout + 1} jobs; raise hydra.launcher.timeout_min or max_num_timeout")
    if script is not None:
        lines += ["", f"sbatch script of one job ({rows[0]['run']}):", script.rstrip()]
    if plan["problems"]:
        lines += ["", f"not ready to launch here: {len(plan['problems'])} problem(s)",
                  *("  - " + p.replace("\n", "\n    ") for p in plan["problems"])]
    return "\n".join(lines)
