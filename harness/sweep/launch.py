"""`harness sweep NAME` and `harness train -m`: the grid checked once, before Hydra writes anything, then
launched through Hydra multirun with the harness launcher (hydra_plugins/harness_launcher), which is
handed the checked points and submits the runs that still need a job."""

from __future__ import annotations

import gc

from omegaconf import DictConfig

from harness.config import CONF_DIR
from harness.errors import HarnessError
from harness.sweep import plan, schedulers
from harness.sweep.plan import RunSpec
from harness.sweep.status import sweep_status


def prepare_sweep(name: str, overrides: list[str], inputs: bool = True) -> tuple[DictConfig, list[RunSpec], str]:
    """Compose, validate and check a sweep's points (inside `plan.hydra_context()`); nothing is written."""
    base, specs = plan.expand_grid(name, overrides)
    executor = schedulers.executor_kind(base)
    plan.check_grid(name, specs, executor, inputs)
    return base, specs, executor


def check_multirun(overrides: list[str]) -> None:
    """`harness train -m overrides`: every point checked like a sweep's, before Hydra writes or launches anything;
    a harness launcher (launcher=slurm|local) is handed the checked points."""
    with plan.hydra_context(CONF_DIR):
        base, specs = plan.expand_grid("train", overrides)
        # Without launcher=slurm|local, Hydra's basic launcher runs the points one after another in this process.
        ours = "harness_launcher" in str(base.hydra.launcher.get("_target_", ""))
        plan.check_grid("train -m", specs, schedulers.executor_kind(base) if ours else None)
        plan.check_sweep_dir("train", specs)
        if ours:
            plan.hand_to_launcher(specs)


def plan_sweep(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """`harness sweep NAME --dry-run`: what a launch would do (`plan.format_plan` prints it); nothing is written.

    Keys: name, sweep_dir, executor, rows (`plan_row` per run), script (one job's sbatch script under SLURM),
    max_num_timeout, device (of the throughput table) and problems: what a launch from here would refuse,
    listed rather than refused (the input files, since the data of a cluster sweep may live on the cluster,
    and a sweep dir holding other runs), so the plan shows what the change would do.
    """
    with plan.hydra_context():
        base, specs, executor = prepare_sweep(name, list(overrides), inputs=False)
        sweep_dir = specs[0].sweep_dir
        problems = plan.input_problems(specs)
        try:
            plan.check_sweep_dir(name, specs)
        except HarnessError as err:
            problems.append(str(err))
        decisions = plan.plan_runs(specs, executor, schedulers.slurm_queue(strict=False) if executor == "slurm" else None)
        table = plan.load_throughput()
        first = next((d.spec for d in decisions if d.submit), specs[0])
        return {
            "name": name, "sweep_dir": sweep_dir, "executor": executor,
            "rows": [plan.plan_row(d.spec, table, d) for d in decisions],
            "script": (schedulers.sbatch_script(first.cfg, sweep_dir / schedulers.SUBMITIT_DIR / "%j")
                       if executor == "slurm" else None),
            "max_num_timeout": int(base.hydra.launcher.max_num_timeout) if executor == "slurm" else None,
            "device": table["device"], "problems": problems,
        }


def train_checked_point(cfg: DictConfig) -> dict:
    """The task of each launched point, in its job: the launch checked its config and files already."""
    from harness.train.loop import train  # in the job only: checking and planning a grid need no training loop

    result = train(cfg, checked=True)
    # The job exits next: its final garbage collection would walk every torch object for 2-4 s while the next run
    # of the sweep waits for this one's core.
    gc.freeze()
    return result


def launch_sweep(name: str, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """`harness sweep NAME [overrides]`: check the grid, then launch what is not done through Hydra multirun;
    the sweep's status rows (`sweep_status`) once the launcher returns."""
    overrides = list(overrides)
    with plan.hydra_context():
        _, specs, executor = prepare_sweep(name, overrides)
        plan.check_sweep_dir(name, specs)
        sweep_dir = specs[0].sweep_dir
        if executor == "slurm":
            schedulers.require_slurm_commands()
            # A controller that does not answer stops the launch before Hydra writes anything.
            schedulers.slurm_queue(strict=True)
        plan.hand_to_launcher(specs)
        # The jobs run where they are submitted from; an absolute sweep dir keeps them independent of cwd.
        hydra_args = [*overrides, f"hydra.sweep.dir={sweep_dir}", plan.searchpath_override()]
        schedulers.run_multirun(name, train_checked_point, hydra_args)
    return sweep_status(sweep_dir)
