"""The adapters to Hydra's multirun, submitit and the schedulers (SLURM, local processes).

Together with `hydra_plugins/harness_launcher/launchers.py`, this is the only code that uses Hydra
or submitit beyond their public, documented API: Hydra's override grammar and basic sweeper (the
grid), its config singleton and multirun entry point, submitit's sbatch renderer. The versions they
were written against are pinned in pyproject.toml, and tests/test_sweep.py checks that the
installed ones are those.

Also here: what one run asks of the scheduler (`job_layout`, `slurm_parameters`, `local_parameters`),
which jobs are still queued or running (`slurm_queue`, the /proc probes of local jobs and hand-started
trainers) and the sweep dir's record of submitted jobs (`submissions.jsonl`).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from harness.config.values import check_values
from harness.errors import HarnessError, first_line, require
from harness.io import append_jsonl, read_jsonl
from harness.run_dir import RunState

SUBMISSIONS = "submissions.jsonl"    # one row per submitted job, in the sweep dir
SUBMITIT_DIR = ".submitit"           # submitit's pickles, sbatch scripts and job logs, in the sweep dir
# squeue states of a job whose run is training (the others are waiting for a node).
RUNNING_QUEUE_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT")


#################################################################################
#                                  Hydra                                        #
#################################################################################


def parse_overrides(overrides: list[str]) -> list[tuple[str, bool]]:
    """Each override as Hydra's grammar reads it: its text, and whether it sweeps (`key=a,b`)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise HarnessError(f"bad override: {first_line(err)}") from None
    return [(o.input_line, o.is_sweep_override()) for o in parsed]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The grid points of sweep overrides (the cartesian product), as Hydra's basic sweeper hands them to the
    launcher: the same overrides, in the same order."""
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    except HydraException as err:
        raise HarnessError(first_line(err)) from None
    return [list(point) for point in batches[0]]


def set_hydra_config(cfg: DictConfig) -> None:
    """Make `${hydra:...}` resolvable (sweeps take e.g. trainer.gpus from hydra.launcher.by_size)."""
    HydraConfig.instance().set_config(cfg)


def run_multirun(config_name: str, task_function: Callable, overrides: list[str]) -> None:
    """Hydra's multirun of `config_name`, as `-m` would run it; inside an initialized Hydra (plan.hydra_context)."""
    GlobalHydra.instance().hydra.multirun(config_name=config_name, task_function=task_function, overrides=overrides)


#################################################################################
#                       What one run asks of the scheduler                      #
#################################################################################


def executor_kind(cfg: DictConfig) -> str:
    """'slurm' or 'local', from the launcher the config selects."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    if "Slurm" in target:
        return "slurm"
    if "Local" in target:
        return "local"
    raise HarnessError(f"hydra.launcher._target_={target!r} is not a harness launcher; use launcher=slurm or launcher=local")


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
    check_values(p, "hydra.launcher")  # its ranges (harness.config.values.RULES); the schema checked the types
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


def job_name(cfg: DictConfig) -> str:
    return f"{cfg.sweep_name}/{cfg.run_name}"


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


def sbatch_script(cfg: DictConfig, folder: Path) -> str:
    """The sbatch script submitit writes for this run (rendered by submitit's own function)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg))


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


#################################################################################
#                      Which jobs are still queued or running                   #
#################################################################################


def require_slurm_commands() -> None:
    missing = [cmd for cmd in ("sbatch", "srun", "squeue") if shutil.which(cmd) is None]
    require(not missing, f"launcher=slurm needs the SLURM commands {', '.join(missing)} on PATH; "
                         "run on a cluster login node or use launcher=local")


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


def local_job_alive(submission: dict) -> bool:
    """Whether a local submitit job (its controller's pid) still runs on this host."""
    return _alive_here(submission.get("host"), submission.get("job_id"), b"submitit")


def trainer_alive(state: RunState | None) -> bool:
    """Whether the process that wrote the run state as running still runs on this host: how a run is seen that
    no launch of this sweep records (`harness train` by hand into the sweep dir)."""
    return state is not None and state.state == "running" and _alive_here(state.host, state.pid, b"submitit", b"harness")


def live_local_runs(sweep_dir: Path, besides: set[str]) -> list[str]:
    """Runs of this sweep, other than `besides`, whose local job is alive: started by an earlier launch that is
    still going, they hold slots of `max_parallel` as much as this launch's own runs do."""
    return sorted(name for name, row in last_submissions(sweep_dir).items()
                  if name not in besides and row.get("executor") == "local" and local_job_alive(row))


def active_job(cfg: DictConfig, sweep_dir: Path, submission: dict | None, state: RunState | None, executor: str,
               queue: dict[str, dict] | None) -> tuple[str, str] | None:
    """(job id, scheduler state) of a job of the run `cfg` still queued or running, else None; a trainer of the run
    still alive on this host (started by hand, say) counts as a running job, with its pid as the id."""
    job = _launched_job(cfg, sweep_dir, submission, state, executor, queue)
    if job is None and trainer_alive(state):
        return str(state.pid), "RUNNING"
    return job


def _launched_job(cfg: DictConfig, sweep_dir: Path, submission: dict | None, state: RunState | None, executor: str,
                  queue: dict[str, dict] | None) -> tuple[str, str] | None:
    if executor == "local":
        if submission and submission.get("executor") == "local" and local_job_alive(submission):
            return str(submission["job_id"]), "RUNNING"
        return None
    queue = queue or {}
    candidates = [str(x) for x in ((submission or {}).get("job_id"), state.slurm_job_id if state else None) if x]
    for job_id in candidates:
        if job_id in queue:
            return job_id, queue[job_id]["state"]
    # A job submitted but never recorded (e.g. the launcher was killed right after sbatch).
    name = job_name(cfg)
    for job_id, job in queue.items():
        if job["name"] == name and str(sweep_dir) in job["command"]:
            return job_id, job["state"]
    return None


#################################################################################
#                              Submission records                               #
#################################################################################


def last_submissions(sweep_dir: Path) -> dict[str, dict]:
    """Run name -> the newest submission record."""
    rows: dict[str, dict] = {}
    for row in read_jsonl(Path(sweep_dir) / SUBMISSIONS):
        if "run_name" in row:
            rows[row["run_name"]] = row
    return rows


def record_submission(cfg: DictConfig, sweep_dir: Path, run_dir: Path, executor: str, job, reason: str) -> dict:
    """Append a submitted job of the run `cfg` to the sweep dir's submissions.jsonl (what relaunches and status
    read); `job` is submitit's handle."""
    row = {
        "run_name": str(cfg.run_name), "run_dir": str(run_dir), "executor": executor, "job_id": str(job.job_id),
        "job_name": job_name(cfg), "host": socket.gethostname(), "reason": reason,
        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    append_jsonl(sweep_dir / SUBMISSIONS, row)
    return row
