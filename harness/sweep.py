"""Sweeps: grids of training runs through Hydra multirun and submitit, safe to launch again.

A sweep is a primary Hydra config in `sweeps/<name>.yaml`: `defaults: [train, launcher: slurm|local,
_self_]`, the values that differ from the train app, and `hydra.sweeper.params`, the grid (Hydra's
basic sweeper takes the cartesian product). Each grid point is one run in
`hydra.sweep.dir/hydra.sweep.subdir` (default `sweeps_out/<sweep_name>/<run_name>`).

`harness sweep NAME [overrides]` (`launch_sweep`; `--dry-run`: `plan_sweep`, `format_plan`):
1. composes every grid point and validates it, and checks the files it will read (data, VAE, FID
   extractor and reference); all errors are reported at once, before anything is written or submitted;
2. checks that the sweep dir holds this sweep (`sweep.yaml`) and that no run's config changed;
3. with `--dry-run` plans the grid: its compute, a GPU-hour estimate and one job's sbatch script;
4. otherwise runs Hydra multirun with the harness launcher (`hydra_plugins/harness_launcher`). It
   skips runs that are done or whose job is still queued or running (asked of `squeue`, never of
   accounting), submits the rest (they resume from their checkpoints), records each submission in
   `submissions.jsonl`, and waits only as long as `hydra.launcher.wait_s`.

`harness status SWEEP_DIR` (`sweep_status`, `format_status`) reads the run dirs, the submission
records and `squeue`.
"""

from __future__ import annotations

import getpass
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.config import CONF_DIR, composition_error
from harness.config.checks import validate
from harness.errors import HarnessError, first_line, require
from harness.io import append_jsonl, atomic_write_text, read_json, read_jsonl, read_yaml, text_table

REPO = Path(__file__).resolve().parent.parent
SWEEPS_DIR = REPO / "sweeps"
THROUGHPUT_FILE = SWEEPS_DIR / "throughput.yaml"
NOT_SWEEPS = {"throughput"}          # yaml files in sweeps/ that are not sweep definitions
SWEEP_RECORD = "sweep.yaml"          # the sweep's name, grid and resolved config, in the sweep dir
SUBMISSIONS = "submissions.jsonl"    # one row per submitted job, in the sweep dir
SUBMITIT_DIR = ".submitit"           # submitit's pickles, sbatch scripts and job logs, in the sweep dir
ERROR_TAIL_LINES = 6


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


def _searchpath_override() -> str:
    """Sweeps are primary configs in sweeps/ that include `train` and the groups of conf/."""
    return f"hydra.searchpath=[file://{CONF_DIR}]"


@contextmanager
def hydra_context(config_dir: Path = SWEEPS_DIR):
    """Hydra initialised on sweeps/ (conf/ on the search path), as `harness sweep` runs it; on conf/ for the
    train app's own multirun."""
    import harness.config  # noqa: F401  (registers the `slug` resolver the configs use)
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), job_name="train", version_base="1.3"):
        yield


def _compose(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name=name, overrides=[*overrides, _searchpath_override()], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise HarnessError(composition_error(err)) from None


def _set_hydra_config(cfg: DictConfig) -> None:
    """Make `${hydra:...}` resolvable (sweeps take e.g. trainer.gpus from hydra.launcher.by_size)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)


def _is_hydra_override(text: str) -> bool:
    key = text.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def expand_grid(name: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, list[RunSpec]]:
    """The sweep's base config and one RunSpec per grid point, as Hydra's basic sweeper forms them
    (`name="train"`: the grid of `harness train -m`).

    Command-line sweeps (`model=a,b`) replace the sweep file's values for that key. Points that do
    not compose carry their error instead of a config. Must run inside `hydra_context()`.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    require(name in available_sweeps() or name == "train",
            f"unknown sweep {name!r}; available in {SWEEPS_DIR}: {', '.join(available_sweeps())}")
    overrides = list(overrides)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as err:
        raise HarnessError(f"bad override: {first_line(err)}") from None
    hydra_overrides = [o.input_line for o in parsed if _is_hydra_override(o.input_line)]
    task_overrides = [o.input_line for o in parsed if not _is_hydra_override(o.input_line)]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = _compose(name, fixed)
    _set_hydra_config(base)
    params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
    try:
        points = BasicSweeper.split_arguments(parser.parse_overrides([*params, *task_overrides]), None)[0]
    except HydraException as err:
        raise HarnessError(f"sweep {name}: {first_line(err)}") from None
    specs = []
    for index, point in enumerate(points):
        spec = RunSpec(index, list(point))
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


#################################################################################
#                       Checks before anything is submitted                     #
#################################################################################


@dataclass
class Layout:
    """What one run asks of the scheduler: nodes x tasks_per_node processes, GPUs per node, time."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int | None
    timeout_min: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def job_layout(cfg: DictConfig, executor: str) -> Layout:
    """Nodes, tasks and GPUs for a run: one task (DDP rank) per GPU, `trainer.gpus` GPUs in all.

    CPU runs (`trainer.device=cpu`) ask for no GPU and `tasks_per_node` (default 1) processes.
    Explicit `hydra.launcher.gpus_per_node` / `nodes` / `tasks_per_node` win over the derivation.
    """
    p = cfg.hydra.launcher
    on_cpu = str(cfg.trainer.device) == "cpu"
    gpus = 0 if on_cpu else int(cfg.trainer.gpus)
    require(gpus >= 0, f"trainer.gpus must be >= 0, got {gpus}")
    per_node = p.get("gpus_per_node")
    if per_node is None:
        per_node = min(gpus, int(p.get("max_gpus_per_node") or 8)) if gpus else 0
    per_node = 0 if on_cpu else int(per_node)
    nodes = p.get("nodes")
    nodes = int(nodes) if nodes is not None else (math.ceil(gpus / per_node) if per_node else 1)
    if executor == "local":
        require(nodes == 1, f"the local launcher runs on one node, but the run asks for {nodes} nodes")
    if gpus and p.get("gpus_per_node") is None and p.get("nodes") is None:
        require(gpus % per_node == 0, f"trainer.gpus={gpus} does not fill nodes of {per_node} GPUs; "
                                      "set hydra.launcher.gpus_per_node and hydra.launcher.nodes")
    tasks = p.get("tasks_per_node")
    tasks = int(tasks) if tasks is not None else max(per_node, 1)
    require(nodes >= 1 and tasks >= 1, f"hydra.launcher.nodes={nodes} and tasks_per_node={tasks} must be >= 1")
    cpus = p.get("cpus_per_task")
    return Layout(nodes, tasks, per_node, int(cpus) if cpus is not None else None, int(p.timeout_min))


def check_grid(name: str, specs: list[RunSpec], executor: str | None, inputs: bool = True) -> None:
    """Validate every point (config, job layout unless `executor` is None, unique run dirs and, with `inputs`,
    the files it will read); raise one error listing every problem."""
    from omegaconf.errors import OmegaConfBaseException

    found: dict[str, list[str]] = {}  # problem -> the points it stops
    for spec in specs:
        if spec.error is not None:
            found.setdefault(spec.error, []).append(spec.label)
            continue
        try:
            validate(spec.cfg)
            if executor is not None:
                layout = job_layout(spec.cfg, executor)
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
    """The files the points will read (data, VAE, FID extractor and reference: harness.train.check_run_inputs),
    checked once per distinct setting; one line per problem, naming the points it stops."""
    from harness.config.checks import check_run_inputs

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


def task_config(cfg: DictConfig) -> DictConfig:
    """The config a run's task function sees: without the `hydra` node (as Hydra's run_job hands it over)."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


def check_sweep_dir(name: str, specs: list[RunSpec]) -> None:
    """Refuse a sweep dir that holds another sweep, or runs whose config changed (unless on_config_change allows)."""
    if not specs:
        return
    sweep_dir = specs[0].sweep_dir
    record = sweep_dir / SWEEP_RECORD
    if record.exists():
        old = read_yaml(record).get("name")
        require(old == name, f"{sweep_dir} holds the sweep {old!r}, not {name!r}; launch into another directory "
                             f"(hydra.sweep.dir=DIR) or remove it")
    from harness.run_dir import RunDir

    changed = [f"{spec.run_name}: {difference}" for spec in specs
               if (difference := RunDir(spec.run_dir).difference(spec.cfg))]
    policy = str(specs[0].cfg.on_config_change)
    if changed and policy == "refuse":
        raise HarnessError(f"{sweep_dir} holds runs of sweep {name!r} with a different config; set "
                           "on_config_change=resume to continue them or on_config_change=overwrite to start over:\n"
                           + "\n".join(f"  - {c}" for c in changed))


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


def executor_kind(cfg: DictConfig) -> str:
    """'slurm' or 'local', from the launcher the config selects."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if "Slurm" in target:
        return "slurm"
    if "Local" in target:
        return "local"
    raise HarnessError(f"hydra.launcher._target_={target!r} is not a harness launcher; use launcher=slurm or launcher=local")


def require_slurm_commands() -> None:
    missing = [cmd for cmd in ("sbatch", "srun", "squeue") if shutil.which(cmd) is None]
    require(not missing, f"launcher=slurm needs the SLURM commands {', '.join(missing)} on PATH; "
                         "run on a cluster login node or use launcher=local")


#################################################################################
#                        Run state, queue and plan                              #
#################################################################################


def slurm_queue(strict: bool = True) -> dict[str, dict] | None:
    """This user's jobs in SLURM: job id -> {name, state, command}. None if squeue fails and not strict."""
    if shutil.which("squeue") is None:
        if strict:
            raise HarnessError("squeue is not on PATH: cannot tell which runs are still queued")
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j|%T|%o"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        out = subprocess.CompletedProcess([], 1, "", str(err))
    if out.returncode != 0:
        if strict:
            raise HarnessError(f"squeue failed ({first_line(Exception(out.stderr or out.stdout))}); cannot tell "
                               "which runs are still queued, so nothing was submitted")
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            jobs[parts[0]] = {"name": parts[1], "state": parts[2], "command": parts[3]}
    return jobs


def _alive_here(host: str | None, pid, *markers: bytes) -> bool:
    """Whether process `pid` of this host runs a command line holding one of `markers` (a reused pid would not)."""
    if host != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError, TypeError):
        return False
    return any(marker in cmdline for marker in markers)


def local_job_alive(row: dict) -> bool:
    """Whether a local submitit job (its controller's pid) still runs on this host."""
    return _alive_here(row.get("host"), row.get("job_id"), b"submitit")


def trainer_alive(state: dict) -> bool:
    """Whether the process that wrote `run_state.json` as running still runs on this host: how a run is seen that
    no launch of this sweep records (`harness train` by hand into the sweep dir)."""
    return state.get("state") == "running" and _alive_here(state.get("host"), state.get("pid"), b"submitit", b"harness")


def live_local_runs(sweep_dir: Path, besides: set[str]) -> list[str]:
    """Runs of this sweep, other than `besides`, whose local job is alive: started by an earlier launch that is
    still going, they hold slots of `max_parallel` as much as this launch's own runs do."""
    return sorted(name for name, row in last_submissions(sweep_dir).items()
                  if name not in besides and row.get("executor") == "local" and local_job_alive(row))


def last_submissions(sweep_dir: Path) -> dict[str, dict]:
    """Run name -> the newest submission record."""
    rows: dict[str, dict] = {}
    for row in read_jsonl(Path(sweep_dir) / SUBMISSIONS):
        if "run_name" in row:
            rows[row["run_name"]] = row
    return rows


def job_name(cfg: DictConfig) -> str:
    return f"{cfg.sweep_name}/{cfg.run_name}"


def active_job(spec: RunSpec, submission: dict | None, state: dict, executor: str,
               queue: dict[str, dict] | None) -> tuple[str, str] | None:
    """(job id, scheduler state) of a job of this run still queued or running, else None; a trainer of the run
    still alive on this host (started by hand, say) counts as a running job, with its pid as the id."""
    job = _launched_job(spec, submission, state, executor, queue)
    if job is None and trainer_alive(state):
        return str(state["pid"]), "RUNNING"
    return job


def _launched_job(spec: RunSpec, submission: dict | None, state: dict, executor: str,
                  queue: dict[str, dict] | None) -> tuple[str, str] | None:
    if executor == "local":
        if submission and submission.get("executor") == "local" and local_job_alive(submission):
            return str(submission["job_id"]), "RUNNING"
        return None
    queue = queue or {}
    candidates = [str(x) for x in ((submission or {}).get("job_id"), state.get("slurm_job_id")) if x]
    for job_id in candidates:
        if job_id in queue:
            return job_id, queue[job_id]["state"]
    # A job submitted but never recorded (e.g. the launcher was killed right after sbatch).
    name, sweep_dir = job_name(spec.cfg), str(spec.sweep_dir)
    for job_id, job in queue.items():
        if job["name"] == name and sweep_dir in job["command"]:
            return job_id, job["state"]
    return None


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step a relaunch resumes from: the newest checkpoint whose zip directory reads (a truncated file's does
    not; checking it reads a few bytes, where loading one to be sure would read gigabytes)."""
    from harness.run_dir import RunDir, checkpoint_step

    newest = RunDir(run_dir).newest_checkpoint()
    return checkpoint_step(newest) if newest is not None else None


@dataclass
class Decision:
    spec: RunSpec
    submit: bool
    reason: str


def plan_runs(specs: list[RunSpec], executor: str, queue: dict[str, dict] | None) -> list[Decision]:
    """Which runs to submit: not done (or to be started over under on_config_change=overwrite) and no job of
    theirs still queued or running."""
    from harness.run_dir import RunDir

    submissions = last_submissions(specs[0].sweep_dir) if specs else {}
    decisions = []
    for spec in specs:
        state = read_json(spec.run_dir / "run_state.json", {}) or {}
        max_steps = int(spec.cfg.trainer.max_steps)
        overwrite = spec.cfg.on_config_change == "overwrite" and RunDir(spec.run_dir).difference(spec.cfg)
        if state.get("state") == "done" and int(state.get("step") or 0) >= max_steps and not overwrite:
            decisions.append(Decision(spec, False, f"done at step {state.get('step')}"))
            continue
        job = active_job(spec, submissions.get(spec.run_name), state, executor, queue)
        if job is not None:
            decisions.append(Decision(spec, False, f"job {job[0]} is {job[1].lower()}"))
            continue
        step = newest_checkpoint_step(spec.run_dir)
        if overwrite:
            reason = f"start over: on_config_change=overwrite moves the old run aside ({overwrite})"
        elif step is not None:
            reason = f"resume from step {step}"
        elif state.get("state") == "failed":
            reason = "retry (failed before its first checkpoint)"
        else:
            reason = "new"
        decisions.append(Decision(spec, True, reason))
    return decisions


def record_submission(spec: RunSpec, executor: str, job, reason: str) -> dict:
    """Append the submission to the sweep dir's submissions.jsonl (what relaunches and status read)."""
    row = {
        "run_name": spec.run_name, "run_dir": str(spec.run_dir), "executor": executor, "job_id": str(job.job_id),
        "job_name": job_name(spec.cfg), "host": socket.gethostname(), "reason": reason,
        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    append_jsonl(spec.sweep_dir / SUBMISSIONS, row)
    return row


#################################################################################
#                       Scheduler parameters (submitit)                         #
#################################################################################


def setup_lines(p: DictConfig, threads: int | None) -> list[str]:
    """Shell lines before the job: the thread count its CPUs allow, then the user's setup."""
    lines = [f"export OMP_NUM_THREADS={threads}"] if threads else []
    return lines + [str(line) for line in (p.get("setup") or [])]


def slurm_parameters(cfg: DictConfig) -> dict:
    """The run's sbatch parameters, in the names of submitit's SlurmExecutor / `_make_sbatch_string`."""
    p = cfg.hydra.launcher
    layout = job_layout(cfg, "slurm")
    mem_gb = p.get("mem_gb")
    params = {
        "job_name": job_name(cfg), "partition": p.get("partition"), "account": p.get("account"),
        "qos": p.get("qos"), "constraint": p.get("constraint"), "exclude": p.get("exclude"),
        "comment": p.get("comment"), "gres": p.get("gres"), "time": layout.timeout_min, "nodes": layout.nodes,
        "ntasks_per_node": layout.tasks_per_node, "cpus_per_task": layout.cpus_per_task,
        "gpus_per_node": layout.gpus_per_node if layout.gpus_per_node and not p.get("gres") else None,
        "mem": f"{mem_gb}GB" if mem_gb else None, "signal_delay_s": int(p.signal_delay_s),
        "setup": setup_lines(p, layout.cpus_per_task), "stderr_to_stdout": bool(p.get("stderr_to_stdout", False)),
        "additional_parameters": _plain(p.get("additional_parameters")) or {},
    }
    return {k: v for k, v in params.items() if v is not None}


def _plain(node):
    """A config node as plain Python (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def local_parallelism(cfg: DictConfig) -> tuple[int, int]:
    """(runs at once, threads per process) for the local launcher."""
    p = cfg.hydra.launcher
    layout = job_layout(cfg, "local")
    cores = os.cpu_count() or 1
    parallel = p.get("max_parallel")
    if parallel is None:
        parallel = 1 if layout.gpus_per_node else max(1, cores // max(1, layout.cpus_per_task or 1))
    threads = layout.cpus_per_task or max(1, cores // (int(parallel) * layout.tasks_per_node))
    return int(parallel), int(threads)


def local_parameters(cfg: DictConfig) -> dict:
    """The run's parameters for submitit's LocalExecutor."""
    p = cfg.hydra.launcher
    layout = job_layout(cfg, "local")
    _, threads = local_parallelism(cfg)
    return {"timeout_min": layout.timeout_min, "gpus_per_node": layout.gpus_per_node,
            "tasks_per_node": layout.tasks_per_node, "signal_delay_s": int(p.signal_delay_s),
            "stderr_to_stdout": bool(p.get("stderr_to_stdout", False)), "setup": setup_lines(p, threads)}


def sbatch_script(cfg: DictConfig, folder: Path) -> str:
    """The sbatch script submitit writes for this run (rendered by submitit's own function)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg))


#################################################################################
#                        Dry run: compute and GPU-hours                         #
#################################################################################


def sampling_steps(sampler: str, num_timesteps: int) -> int:
    """Denoising steps of one sample under `eval.sampler` (e.g. ddpm250 -> 250)."""
    from harness.diffusion import parse_sampler, space_timesteps

    return len(space_timesteps(num_timesteps, parse_sampler(sampler, num_timesteps)[1]))


def num_evaluations(every, max_steps: int) -> int:
    """Evaluations in a run: every `every` steps before the end, and at the end (none if every is null)."""
    if every is None:
        return 0
    every = int(every)
    return (len(range(every, max_steps, every)) if every > 0 else 0) + 1


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
    from harness.train.runtime import achieved_tflops

    spec = table["devices"][device]
    tflops_per_image = achieved_tflops(gflops, images_per_s=1.0, passes=3.0 if kind == "train" else 1.0)
    rate = spec["peak_tflops"] * spec[f"{kind}_mfu"] / tflops_per_image
    return rate / halve, f"{what} estimated at an assumed {spec[f'{kind}_mfu']:.0%} MFU of {spec['peak_tflops']:g} TFLOP/s"


def plan_row(spec: RunSpec, table: dict, decision: Decision | None = None) -> dict:
    """Everything the dry run says about one run."""
    from harness.config import latent_geometry
    from harness.flops import count_flops, is_paper_setting, paper_gflops, training_compute_flops

    cfg = spec.cfg
    m, tc, ev = cfg.model, cfg.trainer, cfg.eval
    geometry = latent_geometry(cfg)
    counted = count_flops(m, geometry)
    gflops = float(counted["gflops"])
    layout = job_layout(cfg, "slurm")
    steps = int(tc.max_steps)
    batch = int(tc.global_batch_size)
    evals = num_evaluations(ev.every, steps)
    samples = evals * int(ev.num_samples)
    guided = float(ev.cfg_scale) > 1.0
    train_rate, train_source = throughput(table, str(m.name), gflops, "train")
    sample_rate, sample_source = throughput(table, str(m.name), gflops, "sample", guided)
    denoise = sampling_steps(str(ev.sampler), int(cfg.diffusion.num_timesteps)) if evals else 0
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
             "train compute = Gflops x batch x steps x 3 (paper Fig. 9); FID samples = evaluations x eval.num_samples."]
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


#################################################################################
#                                  Launch                                       #
#################################################################################


def prepare_sweep(name: str, overrides: list[str], inputs: bool = True) -> tuple[DictConfig, list[RunSpec], str]:
    """Compose, validate and check a sweep's points (inside `hydra_context()`); nothing is written."""
    base, specs = expand_grid(name, overrides)
    executor = executor_kind(base)
    check_grid(name, specs, executor, inputs)
    return base, specs, executor


def check_multirun(overrides: list[str]) -> None:
    """`harness train -m overrides`: every point checked like a sweep's, before Hydra writes or launches anything."""
    with hydra_context(CONF_DIR):
        base, specs = expand_grid("train", overrides)
        # Without launcher=slurm|local, Hydra's basic launcher runs the points one after another in this process.
        ours = "harness_launcher" in str(base.hydra.launcher.get("_target_", ""))
        check_grid("train -m", specs, executor_kind(base) if ours else None)


def plan_sweep(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """`harness sweep NAME --dry-run`: what a launch would do (`format_plan` prints it); nothing is written.

    Keys: name, sweep_dir, executor, rows (`plan_row` per run), script (one job's sbatch script under SLURM),
    max_num_timeout, device (of the throughput table) and problems: what a launch from here would refuse,
    listed rather than refused (the input files, since the data of a cluster sweep may live on the cluster,
    and a sweep dir holding other runs), so the plan shows what the change would do.
    """
    with hydra_context():
        base, specs, executor = prepare_sweep(name, list(overrides), inputs=False)
        sweep_dir = specs[0].sweep_dir
        problems = input_problems(specs)
        try:
            check_sweep_dir(name, specs)
        except HarnessError as err:
            problems.append(str(err))
        decisions = plan_runs(specs, executor, slurm_queue(strict=False) if executor == "slurm" else None)
        table = load_throughput()
        first = next((d.spec for d in decisions if d.submit), specs[0])
        return {
            "name": name, "sweep_dir": sweep_dir, "executor": executor,
            "rows": [plan_row(d.spec, table, d) for d in decisions],
            "script": sbatch_script(first.cfg, sweep_dir / SUBMITIT_DIR / "%j") if executor == "slurm" else None,
            "max_num_timeout": int(base.hydra.launcher.max_num_timeout) if executor == "slurm" else None,
            "device": table["device"], "problems": problems,
        }


def launch_sweep(name: str, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """`harness sweep NAME [overrides]`: check the grid, then launch what is not done through Hydra multirun;
    the sweep's status rows (`sweep_status`) once the launcher returns."""
    overrides = list(overrides)
    with hydra_context():
        base, specs, executor = prepare_sweep(name, overrides)
        check_sweep_dir(name, specs)
        sweep_dir = specs[0].sweep_dir
        if executor == "slurm":
            require_slurm_commands()
            slurm_queue(strict=True)  # a controller that does not answer stops the launch before Hydra writes anything
        from harness.train.loop import train
        from hydra.core.global_hydra import GlobalHydra

        # The jobs run where they are submitted from; an absolute sweep dir keeps them independent of cwd.
        hydra_args = [*overrides, f"hydra.sweep.dir={sweep_dir}", _searchpath_override()]
        GlobalHydra.instance().hydra.multirun(config_name=name, task_function=train, overrides=hydra_args)
    return sweep_status(sweep_dir)


#################################################################################
#                                  Status                                       #
#################################################################################

RUN_FILES = ("run_state.json", "config.yaml", ".hydra", "checkpoints")


def _tail(path: str | Path | None, lines: int = ERROR_TAIL_LINES) -> list[str]:
    if not path:
        return []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _last_step(run_dir: Path, state: dict, checkpoint: int | None) -> int | None:
    """The furthest step a run is known to have reached: run_state.json is only written at start and end."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = [s for s in (state.get("step"), metrics[-1].get("step") if metrics else None, checkpoint) if s is not None]
    return max(steps) if steps else None


def sweep_status(sweep_dir: str | os.PathLike) -> list[dict]:
    """One row per run of a sweep dir: state, job, progress, last FID, log and (if failed) the error."""
    sweep_dir = Path(sweep_dir).absolute()
    require(sweep_dir.is_dir(), f"{sweep_dir} is not a directory")
    require(not (sweep_dir / "run_state.json").exists(),
            f"{sweep_dir} is a run dir, not a sweep dir: give the sweep dir above it ({sweep_dir.parent})")
    record = read_yaml(sweep_dir / SWEEP_RECORD) if (sweep_dir / SWEEP_RECORD).exists() else {}
    submissions = last_submissions(sweep_dir)
    names = {p.name for p in sweep_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".") and any((p / f).exists() for f in RUN_FILES)}
    names |= set((record.get("grid") or {}).keys()) | set(submissions)
    require(names, f"{sweep_dir} holds no runs (no run dirs, {SWEEP_RECORD} or {SUBMISSIONS})")
    needs_queue = any(s.get("executor") == "slurm" for s in submissions.values())
    queue = slurm_queue(strict=False) if needs_queue else None
    return [_run_status(sweep_dir, name, submissions.get(name), queue, needs_queue) for name in sorted(names)]


def _run_status(sweep_dir: Path, name: str, submission: dict | None, queue: dict | None, needs_queue: bool) -> dict:
    run_dir = sweep_dir / name
    state_file = run_dir / "run_state.json"
    state = read_json(state_file, {}) or {}
    results = read_jsonl(run_dir / "results.jsonl")
    last = results[-1] if results else {}
    checkpoint = newest_checkpoint_step(run_dir)
    submission = submission or {}
    job_errors = _tail(submission.get("stderr"))
    executor = submission.get("executor")
    job_id = str(submission.get("job_id") or state.get("slurm_job_id") or "") or None
    queued = None
    if executor == "local":
        queued = "RUNNING" if local_job_alive(submission) else ""
    elif queue is not None and job_id:
        queued = queue.get(job_id, {}).get("state", "")
    if not queued and trainer_alive(state):
        queued = "RUNNING"
    saved = state.get("state")
    if saved == "done":
        status = "done"
    elif queued:
        running = queued in ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT")
        requeued = saved == "preempted" or int(state.get("requeues") or 0) > 0
        status = "running" if running else ("requeued" if requeued else "pending")
    elif saved == "failed":
        status = "failed"
    elif queued is None and needs_queue:
        status = f"{saved or 'submitted'} (queue unknown)"   # squeue did not answer
    elif submission and not saved:  # its job ended before training started: an error, or cancelled while queued
        status = "failed" if job_errors else "interrupted"
    elif saved in ("running", "preempted"):
        status = "interrupted"   # its job is gone without finishing: launching again resumes it
    else:
        status = "not-submitted"
    log = submission.get("stdout")
    if not log or not Path(log).exists():
        log = str(run_dir / "train.log") if (run_dir / "train.log").exists() else log
    error = []
    if status in ("failed", "interrupted"):
        if state.get("error"):
            error += str(state["error"]).strip().splitlines()[-ERROR_TAIL_LINES:]
        elif submission and not saved:
            error.append(f"job {job_id} ended before training started"
                         + ("" if status == "failed" else ", its error log empty (cancelled while queued?)"))
        error += [f"| {line}" for line in job_errors]
    if state_file.exists() and not state:
        error.insert(0, f"{state_file} is not readable JSON: the state shown is a guess")
    return {
        "run": name, "run_dir": str(run_dir), "state": status, "job_id": job_id, "queue_state": queued or None,
        "step": _last_step(run_dir, state, checkpoint), "max_steps": state.get("max_steps"),
        "checkpoint": checkpoint, "requeues": state.get("requeues"),
        "fid": last.get("fid"), "fid_step": last.get("step"), "fid_name": last.get("fid_name"),
        "log": log, "error": error,
    }


def format_status(rows: list[dict]) -> str:
    """The status rows as a table, then the error lines of failed or interrupted runs."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    header = ["run", "state", "job", "step", "checkpoint", "requeues", "last FID (step)", "log"]
    body = []
    for r in rows:
        step = "" if r["step"] is None else f"{r['step']}/{r['max_steps']}"
        fid = "" if r["fid"] is None else f"{r['fid']:.2f} ({r['fid_step']}) {r['fid_name'] or ''}".rstrip()
        checkpoint = "" if r["checkpoint"] is None else str(r["checkpoint"])  # where a relaunch resumes
        body.append([r["run"], r["state"], r["job_id"] or "", step, checkpoint, str(r["requeues"] or 0), fid,
                     r["log"] or ""])
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [f"{len(rows)} run{'' if len(rows) == 1 else 's'}: {summary}",
             *text_table(header, body, left=range(len(header)))]
    for r in rows:
        if r["error"]:
            lines += ["", f"{r['run']} ({r['state']}):", *(f"  {line}" for line in r["error"])]
    return "\n".join(lines)
