"""The dry run: what a config costs (parameters, Gflops, training compute, memory per GPU) and one real CPU step
that proves it builds and trains, before any GPU time is spent."""

from __future__ import annotations

import math
import os
import time

import torch

from harness.config import compose, latent_geometry, to_yaml, with_paper_setting
from harness.config.checks import validate
from harness.errors import require
from harness.flops import count_flops, training_compute_flops
from harness.model import build_model, count_params
from harness.progress import Say, quiet
from harness.train.runtime import autocast_forward, fast_path_settings
from harness.train.step import build_training, step_draws, step_generator, train_step

ACTIVATION_WORDS_PER_BLOCK = 20  # fitted to H100 measurements (README, performance); the textbook count is 16


def estimate_training_memory(params: int, depth: int, tokens: int, hidden: int, batch_per_gpu: int,
                             precision: str, grad_checkpointing: bool, residual_precision: str = "fp32",
                             parallel: str = "ddp", gpus: int = 1, block_params: int = 0) -> dict:
    """Training memory per GPU, in GiB.

    State: 20 bytes/param (fp32 weights, grads, two Adam moments, EMA). Activations: per block
    20 16-bit words per token and channel per sample, doubled in fp32. Korthikanti et al. (2022) give 16
    (sbh*34 bytes less the two dropout masks DiT lacks; fused SDPA stores no T^2 attention matrix); the
    H100 peaks of compiled bf16 DiT-XL/2 training at batch 32-128 fit 20 within 5% (eager at batch 32
    measured ~22). With gradient checkpointing only each block's input is kept, plus one block's
    activations for the recomputation (measured within 2%). Under bf16 with a bf16 residual stream, the two
    LayerNorm inputs a block keeps take one word each instead of two: 18 words (XL/2 at batch 256 on an
    H200: 83.4 GiB estimated, 83.0 measured). The CUDA context (~0.5-1 GiB) is not included.

    Under FSDP (`parallel="fsdp"`, sharded per block) every rank keeps 1/`gpus` of the state (fp32 master
    weights, grads, Adam moments and EMA are all sharded), plus the working copy of the block it is running,
    gathered unsharded in the compute dtype (`block_params`, "gathered"); each rank still runs its own batch
    through every block, so activations are those of DDP. Not measured yet: FSDP2's prefetch of the next
    block and its reduce-scatter buffers may hold a second block's worth.
    """
    bytes_per_act = 2 if precision == "bf16" else 4
    words = ACTIVATION_WORDS_PER_BLOCK - (2 if precision == "bf16" and residual_precision == "bf16" else 0)
    per_block = words * tokens * hidden * bytes_per_act * batch_per_gpu
    if grad_checkpointing:
        activations = depth * tokens * hidden * bytes_per_act * batch_per_gpu + per_block
    else:
        activations = depth * per_block
    if parallel == "fsdp":
        state, gathered = 20 * params / gpus, block_params * bytes_per_act
    else:
        state, gathered = 20 * params, 0
    return {"state_gb": state / 2**30, "gathered_gb": gathered / 2**30, "activations_gb": activations / 2**30,
            "total_gb": (state + gathered + activations) / 2**30}


def gpus_to_fit(memory_at, global_batch: int, limit_gb: float, fewest: int = 1, most: int = 4096) -> int | None:
    """The fewest GPUs (from `fewest`, dividing the global batch) whose per-GPU estimate `memory_at(gpus)` fits
    `limit_gb`; None if no count up to `most` does. More GPUs mean a smaller batch per GPU, so fewer activations
    (and under FSDP a smaller shard of the state)."""
    for gpus in range(fewest, min(global_batch, most) + 1):
        if global_batch % gpus == 0 and memory_at(gpus)["total_gb"] <= limit_gb:
            return gpus
    return None


def block_param_count(model_cfg, geometry) -> int:
    """Parameters of one transformer block (what FSDP gathers at a time), from a weightless (meta) model."""
    model = build_model(model_cfg, geometry, device="meta", init_weights=False)
    return sum(p.numel() for p in model.blocks[0].parameters())


def memory_plan(tc, mc, params: int, block_params: int, tokens: int, precision: str) -> dict:
    """Memory per GPU on `trainer.gpus` GPUs under DDP and under FSDP, whether each fits `trainer.gpu_memory_gib`,
    and the fewest GPUs with which each would (None: no count does, e.g. DDP's unsharded state alone is too big)."""
    batch = int(tc.global_batch_size)

    def at(parallel: str, gpus: int) -> dict:
        return estimate_training_memory(params, int(mc.depth), tokens, int(mc.hidden_size), batch // gpus, precision,
                                        bool(tc.grad_checkpointing), str(tc.residual_precision), parallel, gpus,
                                        block_params)

    limit, gpus = float(tc.gpu_memory_gib), int(tc.gpus)
    plan = {"gpu_memory_gib": limit, "parallel": str(tc.parallel)}
    for parallel, fewest in (("ddp", 1), ("fsdp", 2)):  # FSDP shards over at least two processes
        memory = at(parallel, gpus)
        plan[parallel] = {**memory, "fits": gpus >= fewest and memory["total_gb"] <= limit,
                          "gpus_needed": gpus_to_fit(lambda n, p=parallel: at(p, n), batch, limit, fewest)}
    return plan


def dry_run(overrides: list[str], take_step: bool = True, say: Say = quiet) -> dict:
    """Resolve a config, count what it costs, and prove it builds and trains with one real CPU step (the train
    app's `train_step`, EMA included, at batch 2). `say` gets a line as each long phase starts (the CLI: stderr);
    composing and checking the config (a second or two) says nothing, so bad input stays one line."""
    cfg = compose(with_paper_setting(overrides))
    validate(cfg)
    geometry = latent_geometry(cfg)
    tc, mc = cfg.trainer, cfg.model
    flops = count_flops(mc, geometry, say=say)
    tokens = geometry.tokens(mc.patch_size)
    require(tc.global_batch_size % tc.gpus == 0,
            f"trainer.global_batch_size={tc.global_batch_size} is not divisible by trainer.gpus={tc.gpus}")
    batch_per_gpu = tc.global_batch_size // tc.gpus
    gpu_precision = fast_path_settings(tc, torch.device("cuda"))["precision"]  # the estimate is per GPU
    report = {
        "config": to_yaml(cfg), "model": mc.name, "conditioning": mc.conditioning, "geometry": vars(geometry),
        "tokens": tokens, "params": flops["params"], "gflops": flops["gflops"],
        "unsupported_ops": flops.get("unsupported_ops", {}),
        "global_batch_size": tc.global_batch_size, "max_steps": tc.max_steps, "gpus": int(tc.gpus),
        "train_compute_flops": training_compute_flops(flops["gflops"], tc.global_batch_size, tc.max_steps),
        "batch_per_gpu": batch_per_gpu, "precision": gpu_precision,
        "memory_plan": memory_plan(tc, mc, flops["params"], block_param_count(mc, geometry), tokens, gpu_precision),
    }
    # The estimate of the configured parallelism (DDP unless trainer.parallel says otherwise).
    report["memory"] = report["memory_plan"][report["memory_plan"]["parallel"]]
    step_needs_gb = 20 * flops["params"] / 2**30  # weights, grads, AdamW moments and EMA in fp32 on the CPU
    if take_step and step_needs_gb > available_memory_gb():
        report["step_skipped"] = (f"skipped: {mc.name}'s weights, grads, AdamW state and EMA need ~{step_needs_gb:.3g} GiB "
                                  f"of CPU memory, {available_memory_gb():.3g} GiB is available here")
        take_step = False
    if take_step:
        say(f"building {mc.name} ({flops['params'] / 1e6:.1f}M params), its EMA and optimizer on the CPU ...")
        start, cpu = time.time(), torch.device("cpu")
        model, ema, opt, diffusion = build_training(cfg, cpu)
        require(count_params(model) == flops["params"], "parameter count of the built model disagrees with the Gflops cache")
        forward = autocast_forward(model, model, fast_path_settings(tc, cpu), cpu)  # eager: a check, not a benchmark
        gen = step_generator(cfg.seed, 0, cpu)
        t, noise, drop = step_draws(gen, 2, slice(None), (geometry.in_channels, geometry.input_size, geometry.input_size),
                                    diffusion.num_timesteps, float(mc.class_dropout_prob), cpu)
        x = torch.randn(noise.shape, generator=gen)
        y = torch.randint(0, geometry.num_classes, (2,), generator=gen)
        say("one real training step on the CPU at batch 2 (forward, backward, AdamW, EMA) ...")
        loss = train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc)["loss"].mean().item()
        require(math.isfinite(loss), f"the dry-run step of {mc.name} gave a non-finite loss")
        report["step"] = {"loss": loss, "seconds": time.time() - start, "batch": 2, "device": "cpu"}
    return report


def available_memory_gb() -> float:
    """The memory this machine can still give a process (MemAvailable), in GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def fit_line(plan: dict, gpus: int) -> str:
    """Whether the run fits `trainer.gpu_memory_gib` under DDP and under FSDP on its GPUs, and on how many it would."""
    parts = []
    for name, est in (("DDP", plan["ddp"]), ("FSDP", plan["fsdp"])):
        on = f"{name} on {gpus} GPU{'s' if gpus > 1 else ''}: "
        if name == "FSDP" and gpus == 1:
            on += "not run (FSDP shards over 2 or more processes)"
        else:
            on += f"fits (~{est['total_gb']:.3g} GiB)" if est["fits"] else f"will NOT fit (~{est['total_gb']:.3g} GiB)"
        needed = est["gpus_needed"]
        if needed is not None:
            on += f", needs {needed} GPU{'s' if needed > 1 else ''}" + (f" (trainer.parallel=fsdp trainer.gpus={needed})" if name == "FSDP" else "")
        elif name == "DDP" and est["state_gb"] > plan["gpu_memory_gib"]:
            on += f", on any number of GPUs (its unsharded state alone is {est['state_gb']:.3g} GiB)"
        else:
            on += ", on any number of GPUs (one sample's activations are too many)"
        parts.append(on)
    return f"fits {plan['gpu_memory_gib']:g} GiB/GPU? {'; '.join(parts)} [trainer.parallel={plan['parallel']}]"


def format_dry_run(report: dict) -> str:
    plan = report["memory_plan"]
    m, f = plan["ddp"], plan["fsdp"]
    g = report["geometry"]
    lines = [
        report["config"].rstrip(),
        "---",
        f"model            {report['model']} ({report['conditioning']})",
        f"input            {g['in_channels']}x{g['input_size']}x{g['input_size']}, {g['num_classes']} classes",
        f"tokens           {report['tokens']}",
        f"params           {report['params']:,} ({report['params'] / 1e6:.1f}M)",
        f"forward Gflops   {report['gflops']:.3f} per image (fvcore: 1 multiply-add = 1 flop)",
        f"training compute {report['train_compute_flops']:.3e} flops "
        f"(Gflops x batch {report['global_batch_size']} x steps {report['max_steps']} x 3)",
        f"memory per GPU   ~{m['total_gb']:.3g} GiB under DDP at {report['precision']}, batch {report['batch_per_gpu']}/GPU "
        f"on {report['gpus']} GPU(s): state {m['state_gb']:.3g} GiB (20 B/param: fp32 weights, grads, Adam, EMA) "
        f"+ activations {m['activations_gb']:.3g} GiB (fitted to compiled bf16 on an H100)",
        f"  under FSDP     ~{f['total_gb']:.3g} GiB: state {f['state_gb']:.3g} GiB (sharded over {report['gpus']} GPU(s)) "
        f"+ one block gathered in {report['precision']} {f['gathered_gb']:.3g} GiB + activations {f['activations_gb']:.3g} GiB",
        fit_line(plan, report["gpus"]),
    ]
    if report.get("unsupported_ops"):
        lines.append(f"fvcore skipped   {report['unsupported_ops']}")
    if "step_skipped" in report:
        lines.append(f"one real step    {report['step_skipped']}")
    if "step" in report:
        s = report["step"]
        lines.append(f"one real step    loss {s['loss']:.4f}, the train step (forward, backward, AdamW, EMA) on batch "
                     f"{s['batch']} on the {s['device']} in {s['seconds']:.1f} s")
    return "\n".join(lines)
