"""Training one DiT config: data -> checkpoints, metrics and FID rows.

`Trainer` is assembled from components with hard boundaries, the way torchtitan arranges its trainer: the
runtime (device, distributed group, fast paths: `harness.train.runtime`), the checkpointer
(`harness.train.checkpoint`), preemption (`harness.train.preemption`), the step (`harness.train.step`), the
tracker (`harness.tracking`) and evaluation (`harness.evaluate`). `Trainer.fit` is the loop that calls them,
meant to be read in one sitting (nanoGPT-style).
"""

from __future__ import annotations

import os
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig

from harness.autoencoders import run_autoencoder
from harness.config import evaluates_at, latent_geometry, samples_fid_at
from harness.config.checks import check_run_inputs, validate
from harness.data import BatchStream, build_dataset
from harness.evaluate.run import evaluate_model, evaluated_before
from harness.evaluate.sampling import SamplingStopped
from harness.flops import count_flops
from harness.model import build_model, count_params
from harness.run_dir import RunDir
from harness.tracking import Tracker
from harness.train.checkpoint import Checkpointer
from harness.train.preemption import PreemptionFlag
from harness.train.runtime import (Dist, achieved_tflops, apply_matmul_settings, datasheet_peak_tflops, inference_forward,
                                   check_parallel, mfu, peak_memory_gb, setup_distributed, training_forward)
from harness.train.step import (LOGGED_LOSSES, NonFiniteWatch, build_training, gather_full_ema, learning_rate,
                                step_draws, step_generator, train_step)


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None, checked: bool = False) -> dict:
    """Train `cfg` in `run_dir` (default: Hydra's output dir, else the cwd), resuming if it holds checkpoints;
    one process at a time trains a run dir (`RunDir.lock`). `checked`: the launch that started this run has
    already checked the config and its files (`harness train`, `harness sweep`), so they are not checked again."""
    if not checked:
        validate(cfg)
        check_run_inputs(cfg)
    dist = setup_distributed(cfg.trainer.device)  # a device that is not there is refused before the run dir is made
    check_parallel(cfg.trainer, dist.world_size)
    run_dir = RunDir(run_dir if run_dir is not None else _hydra_output_dir())
    run_dir.check_checkpoints()  # an incomplete newest checkpoint directory: refused before anything is written
    run_dir.path.mkdir(parents=True, exist_ok=True)
    with run_dir.lock() if dist.is_main else nullcontext():
        return Trainer(cfg, run_dir, dist).fit()


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig  # Hydra's runtime state: only a run started by Hydra has one

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


class ThroughputWindow:
    """The logging window: images trained and per-sample losses since the last metrics row."""

    def __init__(self):
        self.start, self.images, self.losses = time.time(), 0, []

    def add(self, images: int, losses: dict) -> None:
        self.images += images
        self.losses.append(torch.stack([losses[key].detach() for key in LOGGED_LOSSES]))  # one copy, no sync

    def mean_losses(self, dist: Dist) -> dict:
        means = torch.stack(self.losses).mean((0, 2))
        if dist.world_size > 1:  # the global batch's means, as one process logs them (equal shares per rank)
            torch_dist.all_reduce(means)
            means /= dist.world_size
        return dict(zip(LOGGED_LOSSES, means.tolist()))

    def images_per_s(self) -> float:
        return self.images / max(time.time() - self.start, 1e-9)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside does not count: the window's rate is training's alone."""
        began = time.time()
        try:
            yield
        finally:
            self.start += time.time() - began


class Trainer:
    """One run in one run dir, claimed and resumed: build with the config, the run dir and this process's place
    in the job, then `fit()`."""

    def __init__(self, cfg: DictConfig, run_dir: RunDir, dist: Dist):
        tc = self.tc = cfg.trainer
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, dist.device
        local_batch = tc.global_batch_size // dist.world_size
        self.rank_slice = slice(dist.rank * local_batch, (dist.rank + 1) * local_batch)
        if dist.is_main:
            run_dir.claim(cfg)
        dist.barrier()
        apply_matmul_settings(tc, self.device)

        self.geometry = geometry = latent_geometry(cfg)
        self.model, self.ema, self.opt, self.diffusion = build_training(cfg, self.device, dist)
        self.flops = count_flops(cfg.model, geometry)
        self.params = count_params(self.model)
        dataset = build_dataset(cfg.data, "train", cfg.autoencoder)
        self.stream = BatchStream(dataset, local_batch, dist.rank, dist.world_size, cfg.seed, bool(cfg.data.hflip),
                                  num_workers=int(cfg.data.get("num_workers", 0)), pin_memory=self.device.type == "cuda")
        # Pixel data through a VAE is encoded on the fly; a latent cache and pixel-space models need nothing.
        self.encoder = (run_autoencoder(cfg, self.device)
                        if cfg.data.name != "latents" and cfg.autoencoder.name != "identity" else None)

        self.tracker = Tracker(cfg, run_dir, enabled=dist.is_main)
        if self.device.type == "cuda" and int(tc.gpus) > dist.world_size:
            self.tracker.print(f"note: trainer.gpus={tc.gpus} but this job has {dist.world_size} process(es); trainer.gpus "
                               f"only plans (sweeps, dry runs): start it with torchrun --nproc_per_node={tc.gpus} to use "
                               f"{tc.gpus} GPUs")
        self.checkpointer = Checkpointer(run_dir, cfg, dist, meta={
            "model": cfg.model.name, "params": self.params, "gflops": self.flops["gflops"], "geometry": vars(geometry)})
        self.step = self.checkpointer.resume(self.model, self.ema, self.opt, self.stream, say=self.tracker.print)
        if dist.is_main:  # the checkpoint fits: the dir is this config's run now
            run_dir.write_config(cfg)
            self.tracker.resumed_at(self.step)
        self.forward, fast = training_forward(self.model, tc, dist)

        self.max_steps = int(tc.max_steps)
        self.eval_every = cfg.eval.every
        self.peak = tc.peak_tflops or datasheet_peak_tflops(self.device, fast["precision"])
        self.sample_shape = (geometry.in_channels, geometry.input_size, geometry.input_size)
        self.preemption = PreemptionFlag()
        self.nonfinite = NonFiniteWatch(self.device)
        # Evaluation samples from the EMA; under FSDP from a whole copy gathered before each evaluation.
        self.eval_ema = self.ema
        if tc.parallel == "fsdp" and self.eval_every is not None:
            self.eval_ema = build_model(cfg.model, geometry, device=self.device, init_weights=False)
            self.eval_ema.requires_grad_(False).eval()
        self.sample_forward = inference_forward(self.eval_ema, cfg, self.device) if self.eval_every is not None else None

    # ------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train from the resumed step to `trainer.max_steps`, logging, saving and evaluating on schedule."""
        cfg, tc, dist, step, max_steps = self.cfg, self.tc, self.dist, self.step, self.max_steps
        if dist.is_main:
            self.run_dir.write_state("running", step, max_steps)
            self.tracker.print(f"training {cfg.model.name} ({self.params / 1e6:.2f}M params, "
                               f"{self.flops['gflops']:.4g} Gflops, {self.geometry.tokens(cfg.model.patch_size)} tokens) "
                               f"on {self.device} x{dist.world_size}, step {step}/{max_steps}")
            if step >= max_steps:
                self.tracker.print(f"already at step {step}, trainer.max_steps={max_steps}: nothing to train")
        try:
            if 0 < step < max_steps and evaluates_at(cfg.eval, step, max_steps):
                self.evaluate(step)  # resumed from a checkpoint whose evaluation a kill cut short (one done is skipped)
            self.model.train()
            window = ThroughputWindow()
            while step < max_steps:
                losses = self.train_one(step)
                step += 1
                self.nonfinite.note(losses["loss"], step)
                self.tracker.progress(step, max_steps)
                window.add(tc.global_batch_size, losses)
                if step % tc.log_every == 0 or step == max_steps:
                    self.log(step, window)
                    window = ThroughputWindow()
                elif step == self.step + 1:  # a first line at once, not after log_every steps (no metrics row)
                    self.log(step, window, row=False)
                if self.checkpointer.is_save_step(step):  # before this step's evaluation: a kill while sampling keeps it
                    self.save(step)
                self.stop_if_preempted(step)
                if step < max_steps and evaluates_at(cfg.eval, step, max_steps):
                    with window.paused():  # sampling time is not training time
                        self.evaluate(step)
            self.tracker.close_bar()  # training is over: the final evaluation has its own progress
            if evaluates_at(cfg.eval, step, max_steps):
                self.evaluate(step)
            self.checkpointer.wait()  # a background save of the last step is committed before the run is done
            if dist.is_main:
                self.run_dir.write_state("done", step, max_steps)
                self.tracker.print(f"done at step {step}: {self.run_dir}")
        except BaseException as err:
            if dist.is_main and not isinstance(err, SystemExit):
                error = "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]
                self.run_dir.write_state("failed", step, max_steps, error=error)
                self.tracker.write_log(f"failed at step {step}: {error}")
            raise
        finally:
            self.preemption.restore()
            self.tracker.finish()
        return {"run_dir": str(self.run_dir), "step": step, "params": self.params, "gflops": self.flops["gflops"]}

    # ------------------------------------------------------------------------- what the loop calls

    def train_one(self, step: int) -> dict:
        """The optimizer step that takes the run from `step` to `step + 1`: this rank's batch and draws."""
        cfg, device = self.cfg, self.device
        x, y = next(self.stream)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.encoder is not None:  # the posterior sample of this rank's images, reproducible on resume
            x = self.encoder.encode(x, generator=step_generator(cfg.seed, step, device, 1, self.dist.rank))
        gen = step_generator(cfg.seed, step, device)
        t, noise, drop = step_draws(gen, self.tc.global_batch_size, self.rank_slice, self.sample_shape,
                                    self.diffusion.num_timesteps, float(cfg.model.class_dropout_prob), device)
        lr = learning_rate(self.tc, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return train_step(self.forward, self.diffusion, self.model, self.ema, self.opt, x, y, t, noise, drop, self.tc)

    def log(self, step: int, window: ThroughputWindow, row: bool = True) -> None:
        """One metrics row (with `row`; else only the printed line): the window's mean losses, throughput and MFU."""
        self.nonfinite.check(self.dist)
        images_per_s = window.images_per_s()
        tflops = achieved_tflops(self.flops["gflops"], images_per_s / self.dist.world_size)
        metrics = {"step": step, **window.mean_losses(self.dist), "lr": self.opt.param_groups[0]["lr"],
                   "images_per_s": images_per_s, "tflops_per_device": tflops, "mfu": mfu(tflops, self.peak),
                   "peak_mem_gb": peak_memory_gb(self.device), "time": time.time()}
        if row:
            self.tracker.log_metrics(metrics)
        self.tracker.print(f"step {step}/{self.max_steps} loss {metrics['loss']:.4f} {images_per_s:.1f} img/s "
                           f"{tflops:.3g} TFLOP/s" + (f" MFU {metrics['mfu']:.1%}" if self.peak else ""))

    def save(self, step: int) -> None:
        self.nonfinite.check(self.dist)  # nothing a non-finite loss touched reaches the disk
        self.checkpointer.save(step, self.model, self.ema, self.opt, self.stream)

    def stop_if_preempted(self, step: int) -> None:
        """On SIGUSR2 or SIGTERM (on any rank): `step` saved, the run marked preempted, then requeue or exit."""
        if not self.dist.any_rank(self.preemption.raised):
            return
        requeue = self.dist.any_rank(self.preemption.requeues)  # USR2 on one rank requeues the whole job
        if not self.checkpointer.is_save_step(step):
            self.save(step)
        self.checkpointer.wait()  # a background save is committed before the job is requeued or exits
        if self.dist.is_main:
            self.run_dir.write_state("preempted", step, self.max_steps)
            self.tracker.print(f"preempted at step {step}: checkpoint saved, requeueing" if requeue
                               else f"stopped at step {step} (SIGTERM): checkpoint saved, launching again resumes")
        self.tracker.finish()
        self.preemption.requeue_or_exit(requeue)

    def evaluate(self, step: int) -> None:
        """The EMA's validation loss at `step` and, where eval.fid_every says, its FID; unless results.jsonl has
        them with this eval config. A preemption while sampling stops at the next batch and saves."""
        self.nonfinite.check(self.dist)
        fid = samples_fid_at(self.cfg.eval, step, self.max_steps)
        if evaluated_before(self.run_dir, step, self.cfg.eval, fid=fid):
            self.tracker.print(f"step {step}: already evaluated with this eval config (results.jsonl); not again")
            return
        if self.eval_ema is not self.ema:
            gather_full_ema(self.ema, self.eval_ema)
        self.preemption.sampling = True
        try:
            row = evaluate_model(self.eval_ema, self.cfg, step, self.run_dir, dist=self.dist, flops=self.flops,
                                 params=self.params, log_fn=self.tracker.log_result, say=self.tracker.print,
                                 forward=self.sample_forward, fid=fid,
                                 stop=lambda: self.dist.any_rank(self.preemption.raised))
        except SamplingStopped:  # preempted while sampling: the resumed run samples this step again
            self.stop_if_preempted(step)
            raise  # not reached: stop_if_preempted exits
        finally:
            self.preemption.sampling = False
        if row is not None and fid:
            self.tracker.print(f"step {step}: {row['fid_name']} {row['fid']:.4g} ({row['num_samples']} samples, "
                               f"{row['sampler']}, cfg {row['cfg_scale']:g})")
