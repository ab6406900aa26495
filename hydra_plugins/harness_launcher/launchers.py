"""The harness's Hydra launchers: hydra-submitit-launcher, made idempotent and never blocking unboundedly.

Hydra instantiates launchers only from plugin classes under the `hydra_plugins` package, so these
live here; `conf/hydra/launcher/harness_{slurm,local}.yaml` name them by `_target_` and
`launcher=slurm|local` selects one. What differs from hydra-submitit-launcher's own `launch()`,
which submits one job array and then blocks until every job returns (forever, if a job dies where
accounting cannot see it):

- it launches the points that `harness sweep` or `harness train -m` checked before Hydra started
  (every job's config, its files and the sweep dir: harness.sweep.plan), handed over as they were
  checked rather than composed and checked again;
- runs that are done, or whose job is still queued or running (squeue; a live pid for local runs),
  are skipped; the others are submitted and resume from their checkpoints;
- each run is its own job with its own resources (GPUs, nodes, time from its config), recorded in
  the sweep dir's submissions.jsonl;
- waiting is bounded by `wait_s` and polls squeue, never sacct.

Running a job (`__call__`) and requeueing it (`checkpoint`, called by submitit on SIGUSR2 once the
training loop has saved its checkpoint) are the base class's: the requeued job runs the same
grid point again, and training resumes from the run dir.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from harness.sweep import plan, schedulers
from harness.sweep.plan import Decision


class HarnessSubmititLauncher(BaseSubmititLauncher):
    """Submits the runs of a sweep that still need a job; waits at most `wait_s` seconds."""

    _EXECUTOR = "abstract"

    def __call__(self, *args: Any) -> JobReturn:
        """Run one grid point inside the job; a failed run fails the job, with its traceback in the job's log."""
        result = super().__call__(*args)
        if result.status == JobStatus.FAILED:
            error = result._return_value
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            sys.stderr.flush()
            raise error
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        name = str(self.config.hydra.job.config_name)
        schedulers.set_hydra_config(self.config)  # jobs may read ${hydra:launcher...} (e.g. GPUs per model size)
        specs = plan.checked_specs(job_overrides)
        queue = schedulers.slurm_queue(strict=True) if self._EXECUTOR == "slurm" else None
        decisions = plan.plan_runs(specs, self._EXECUTOR, queue)
        sweep_dir = specs[0].sweep_dir
        for d in decisions:
            print(f"  {d.spec.run_name}: {'submit' if d.submit else 'skip'} ({d.reason})", flush=True)
        todo = [d for d in decisions if d.submit]
        print(f"sweep {name}: {len(todo)} of {len(decisions)} runs to submit ({self._EXECUTOR}); "
              f"sweep dir {sweep_dir}", flush=True)
        if todo:  # the record describes the last launch that submitted something
            plan.write_sweep_record(name, self.config, specs, [str(o) for o in self.config.hydra.overrides.task])
            self._run(todo, sweep_dir)
        return []

    def _submit(self, decision: Decision, sweep_dir: Path):
        """One run as one submitit job; returns the job handle (after recording it)."""
        spec = decision.spec
        folder = sweep_dir / schedulers.SUBMITIT_DIR / "%j"
        max_timeouts = int(spec.cfg.hydra.launcher.max_num_timeout)
        if self._EXECUTOR == "slurm":
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
            executor.update_parameters(**schedulers.slurm_parameters(spec.cfg))
        else:
            executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_timeouts)
            executor.update_parameters(**schedulers.local_parameters(spec.cfg))
        # The same arguments hydra-submitit-launcher gives each job: the job composes its config from them.
        job = executor.submit(self, list(spec.overrides), "hydra.sweep.dir", spec.index, f"job_id_for_{spec.index}",
                              Singleton.get_state())
        schedulers.record_submission(spec.cfg, sweep_dir, spec.run_dir, self._EXECUTOR, job, decision.reason)
        print(f"  submitted {spec.run_name}: job {job.job_id} ({decision.reason}), log {job.paths.stdout}", flush=True)
        return job

    def _run(self, todo: list[Decision], sweep_dir: Path) -> None:
        raise NotImplementedError


class HarnessSlurmLauncher(HarnessSubmititLauncher):
    """`launcher=slurm`: one sbatch job per run; returns at once unless `wait_s` > 0."""

    _EXECUTOR = "slurm"

    def _run(self, todo: list[Decision], sweep_dir: Path) -> None:
        job_ids = [str(self._submit(d, sweep_dir).job_id) for d in todo]
        wait_s = float(self.config.hydra.launcher.wait_s or 0)
        if wait_s <= 0:
            print(f"submitted {len(job_ids)} jobs; follow them with `harness status {sweep_dir}`", flush=True)
            return
        poll_s = max(1.0, float(self.config.hydra.launcher.poll_s))
        deadline = time.time() + wait_s
        while True:
            queue = schedulers.slurm_queue(strict=False)
            left = [j for j in job_ids if queue is None or j in queue]
            if not left:
                return
            if time.time() >= deadline:
                print(f"stopped waiting after {wait_s:.0f} s with {len(left)} jobs still queued or running "
                      f"({', '.join(left)}); they go on: `harness status {sweep_dir}`", flush=True)
                return
            time.sleep(min(poll_s, max(0.0, deadline - time.time())))


class HarnessLocalLauncher(HarnessSubmititLauncher):
    """`launcher=local`: local processes, at most `max_parallel` at a time (counting the runs of this sweep that an
    earlier launch still runs), waited on for at most `wait_s`."""

    _EXECUTOR = "local"

    def _run(self, todo: list[Decision], sweep_dir: Path) -> None:
        parallel, _ = schedulers.local_parallelism(todo[0].spec.cfg)
        wait_s = float(self.config.hydra.launcher.wait_s or 0)
        poll_s = max(0.2, float(self.config.hydra.launcher.poll_s))
        deadline = time.time() + wait_s
        pending, running, submitted = list(todo), [], set()
        elsewhere = schedulers.live_local_runs(sweep_dir, besides=submitted)
        print(f"running {len(todo)} run{'' if len(todo) == 1 else 's'} locally, {parallel} at a time"
              + (f" ({len(elsewhere)} already running from an earlier launch: {', '.join(elsewhere)})"
                 if elsewhere else ""), flush=True)
        first = True
        while pending or running:
            running = [job for job in running if not job.done()]
            elsewhere = schedulers.live_local_runs(sweep_dir, besides=submitted)
            for decision in [d for d in pending if d.spec.run_name in elsewhere]:  # another launch got there first
                print(f"  {decision.spec.run_name}: skip (started meanwhile by another launch)", flush=True)
                pending.remove(decision)
            busy = len(running) + len(elsewhere)
            # The first runs start at once if slots are free; later ones only while there is time left to wait.
            while pending and busy < parallel and (first or time.time() < deadline):
                decision = pending.pop(0)
                running.append(self._submit(decision, sweep_dir))
                submitted.add(decision.spec.run_name)
                busy += 1
            first = False
            if time.time() >= deadline:
                ids = ", ".join(str(job.job_id) for job in running)
                print(f"stopped waiting after {wait_s:.0f} s: {len(running)} runs still running (pids {ids}) and "
                      f"{len(pending)} not started; `harness status {sweep_dir}`, launch again to continue",
                      flush=True)
                return
            if pending or running:
                time.sleep(poll_s)
