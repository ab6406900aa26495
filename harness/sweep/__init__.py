"""Sweeps: grids of training runs through Hydra multirun and submitit, safe to launch again.

A sweep is a primary Hydra config in `sweeps/<name>.yaml`: `defaults: [train, launcher: slurm|local,
_self_]`, the values that differ from the train app, and `hydra.sweeper.params`, the grid (Hydra's
basic sweeper takes the cartesian product). Each grid point is one run in
`hydra.sweep.dir/hydra.sweep.subdir` (default `sweeps_out/<sweep_name>/<run_name>`).

`harness sweep NAME [overrides]` (`launch.launch_sweep`; `--dry-run`: `launch.plan_sweep`, `plan.format_plan`):
1. composes every grid point and validates it, and checks the files it will read (data, VAE, FID
   extractor and reference); all errors are reported at once, before anything is written or submitted;
2. checks that the sweep dir holds this sweep (`sweep.yaml`) and that no run's config changed;
3. with `--dry-run` plans the grid: its compute, a GPU-hour estimate and one job's sbatch script;
4. otherwise runs Hydra multirun with the harness launcher (`hydra_plugins/harness_launcher`), handing
   it the checked points. It skips runs that are done or whose job is still queued or running (asked
   of `squeue`, never of accounting), submits the rest (they resume from their checkpoints), records
   each submission in `submissions.jsonl`, and waits only as long as `hydra.launcher.wait_s`.

`harness status SWEEP_DIR` (`status.sweep_status`, `status.format_status`) reads the run dirs, the
submission records and `squeue`.

Modules, each importing only those before it:
- `schedulers`: the adapters to Hydra's multirun internals, submitit, SLURM and local processes;
- `status`: each run's state (not-submitted, pending, running, requeued, interrupted, failed, done);
- `plan`: the grid, its checks, which runs a launch submits, the GPU-hour estimate and the plan table;
- `launch`: `harness sweep` and `harness train -m`.

This file imports nothing: the modules import each other, and imports here would make cycles.
"""
