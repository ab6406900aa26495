"""`harness bench`: how fast the harness is, in the field's terms.

For one config it times, after warm-up, (a) a training step (forward, backward, AdamW, EMA: the same
`train_step` the train app runs), (b) a sampling step with and without guidance, (c) torch-fidelity
feature extraction per image, and (d) latent-cache loading per image. Throughput becomes achieved
TFLOP/s through the fvcore Gflops (x3 for a training step; guidance doubles the batch) and MFU against
two peaks: a large matmul measured in the same run at the run's precision, and the datasheet where the
device is known. Results print as a table, return as a dict (JSON) and are appended to a benchmark log.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from harness.config import compose, latent_geometry, resolve_device
from harness.config.checks import validate
from harness.data import BatchStream, LatentDataset, write_synthetic_latent_cache
from harness.diffusion import create_diffusion
from harness.errors import HarnessError, require
from harness.evaluate.fid import resolve_extractor
from harness.flops import count_flops
from harness.io import append_jsonl, check_output_path
from harness.model import build_model
from harness.train.runtime import (achieved_tflops, apply_matmul_settings, autocast_forward, compiled, datasheet_peak_tflops,
                                   device_name, fast_path_settings, inference_forward, mfu, peak_memory_gb)
from harness.train.step import build_training, train_step

WHAT = ("train", "sample", "features", "latents")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# Kernel names by what they do, first match wins: where a step's GPU time goes, in terms a reader can act on.
KERNEL_KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|attention", re.I)),
    # Inductor's GEMM templates (max-autotune) are Triton kernels too: `triton_tem_*`, epilogue fused in.
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|^triton_tem_", re.I)),
    ("optimizer+ema", re.compile(r"multi_tensor_apply|fused_adam|foreach", re.I)),
    ("fused elementwise (triton)", re.compile(r"^triton_", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_summary(events, calls: int, wall_ms: float, cuda: bool, rows: int = 12, kernel_rows: int = 40) -> dict:
    """Per call: the host-side ops that cost most (by the time of the kernels each launched itself on a GPU,
    by their own CPU time on a CPU), the GPU's kernel time by kind (`KERNEL_KINDS`), the kernels that cost
    most (Inductor names its kernels after the ops it fused) and the share of wall time the GPU spent in
    kernels. Kernel events are counted once: an op's device time is its kernels' time, and GPU-side
    annotations span other kernels."""
    # CUPTI's "Command Buffer Full" is the host waiting for room in the launch queue: the host running ahead of
    # the GPU, not an op (on an H200 at XL/2 batch 256 it showed as seconds per step).
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.key != "Command Buffer Full"]
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]

    def self_ms(event):
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3 / calls

    top = sorted(ops, key=self_ms, reverse=True)[:rows]
    by_kind = {}
    for kernel in kernels:
        kind = kernel_kind(kernel.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + kernel.self_device_time_total / 1e3 / calls
    busy_ms = sum(by_kind.values())
    costly = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:kernel_rows] if cuda else []
    return {"wall_ms_per_call": wall_ms, "gpu_busy_fraction": busy_ms / wall_ms if cuda else None,
            "kernel_ms_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])) if cuda else None,
            "kernels": [{"name": e.key[:200], "kind": kernel_kind(e.key), "ms_per_call": e.self_device_time_total / 1e3 / calls,
                         "launches_per_call": e.count / calls} for e in costly],
            "top": [{"name": e.key[:80], "self_ms_per_call": self_ms(e), "calls_per_call": e.count / calls}
                    for e in top]}


def profile_calls(fn, device: torch.device, calls: int = 5) -> dict:
    """Where the time of `fn` goes: torch.profiler over `calls` calls, summarised by `profile_summary`. A GPU
    busy share well below 1 means the host (Python, kernel launches, syncs) keeps the GPU waiting."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    return profile_summary(prof.key_averages(), calls, wall_ms, cuda)


def measured_peak_tflops(device: torch.device, precision: str, size: int | None = None) -> float:
    """TFLOP/s of a large square matmul at the run's precision: the ceiling this device shows today."""
    size = size or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, warmup=2, iters=10 if device.type == "cuda" else 3)
    return 2 * size**3 / seconds / 1e12


def _throughput(images_per_s: float, gflops: float, passes: float, peaks: dict) -> dict:
    tflops = achieved_tflops(gflops, images_per_s, passes)
    return {"images_per_s": images_per_s, "tflops": tflops,
            "mfu_measured": mfu(tflops, peaks["measured"]), "mfu_datasheet": mfu(tflops, peaks["datasheet"])}


def bench_train(cfg: DictConfig, device: torch.device, gflops: float, peaks: dict, warmup: int, iters: int,
                profile: bool = False) -> dict:
    """One training step at `trainer.global_batch_size` on this device, as the train app runs it."""
    tc = cfg.trainer
    fast = fast_path_settings(tc, device)
    apply_matmul_settings(tc, device)
    geometry = latent_geometry(cfg)
    model, ema, opt, diffusion = build_training(cfg, device)
    forward = autocast_forward(compiled(model, fast), model, fast, device)
    batch = int(tc.global_batch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, geometry.in_channels, geometry.input_size, geometry.input_size, device=device, generator=gen)
    y = torch.randint(0, geometry.num_classes, (batch,), device=device, generator=gen)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device, generator=gen)
    noise = torch.randn(x.shape, device=device, generator=gen)
    drop = torch.zeros(batch, dtype=torch.bool, device=device)
    def step():
        train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc)

    _reset_peak_memory(device)
    seconds = _timed(step, device, warmup, iters)
    out = {"batch": batch, "step_s": seconds, **fast, "grad_checkpointing": bool(tc.grad_checkpointing),
           "residual_precision": str(tc.residual_precision),
           **_throughput(batch / seconds, gflops, 3.0, peaks), "peak_mem_gb": peak_memory_gb(device)}
    if profile:
        out["profile"] = profile_calls(step, device)
    return out


def bench_sample(cfg: DictConfig, device: torch.device, gflops: float, peaks: dict, warmup: int, iters: int) -> dict:
    """One reverse-diffusion step at `eval.batch_size`, without guidance and with scale 1.5 (a doubled batch)."""
    apply_matmul_settings(cfg.trainer, device)
    geometry = latent_geometry(cfg)
    model = build_model(cfg.model, geometry, device=device).eval().requires_grad_(False)
    forward = inference_forward(model, cfg, device)  # the sampling forward `harness eval` uses
    diffusion = create_diffusion(cfg.diffusion)
    batch = int(cfg.eval.batch_size)
    shape = (batch, geometry.in_channels, geometry.input_size, geometry.input_size)
    y = torch.arange(batch, device=device) % geometry.num_classes
    steps = 4
    out = {"batch": batch, "precision": forward.fast["precision"], "compile": forward.fast["compile"]}
    for name, scale in (("no_guidance", 1.0), ("cfg_1.5", 1.5)):
        def run():
            with torch.no_grad():
                diffusion.sample(forward, shape, y, sampler=f"ddpm{steps}", cfg_scale=scale,
                                 generator=torch.Generator(device=device).manual_seed(0), device=device)
        _reset_peak_memory(device)
        step_s = _timed(run, device, warmup=1, iters=max(1, iters // 4)) / steps
        passes = 2.0 if scale > 1 else 1.0  # guidance runs the doubled batch
        images_250 = batch / (250 * step_s)
        out[name] = {"step_s": step_s, **_throughput(batch / step_s, gflops, passes, peaks),
                     "images_per_s_250_steps": images_250, "fid50k_sampling_hours": 50_000 / images_250 / 3600,
                     "peak_mem_gb": peak_memory_gb(device)}
    return out


def bench_features(cfg: DictConfig, device: torch.device, warmup: int, iters: int) -> dict:
    """torch-fidelity feature extraction per image with the config's FID extractor."""
    try:
        extractor = resolve_extractor(cfg.eval, cfg.data)
    except HarnessError as err:
        return {"skipped": str(err)}
    size = int(cfg.data.image_size)
    batch = int(cfg.eval.batch_size)
    model = FEATURE_EXTRACTORS_REGISTRY[extractor.name](
        extractor.name, [extractor.feature_layer], feature_extractor_weights_path=str(extractor.weights)).to(device)
    images = torch.randint(0, 256, (batch, extractor.channels, size, size), dtype=torch.uint8, device=device)
    if extractor.channels == 3 and size != 299:
        images = torch.nn.functional.interpolate(images.float(), size=(299, 299)).to(torch.uint8)
    with torch.no_grad():
        seconds = _timed(lambda: model(images), device, warmup, iters)
    return {"extractor": extractor.name, "batch": batch, "images_per_s": batch / seconds}


def bench_latents(cfg: DictConfig, warmup: int, iters: int) -> dict:
    """Loading from a latent cache (synthetic, same format and shape) into training batches, on one core."""
    geometry = latent_geometry(cfg)
    shape = (geometry.in_channels, geometry.input_size, geometry.input_size)
    batch = int(cfg.trainer.global_batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_synthetic_latent_cache(tmp, num_images=max(4 * batch, 4096), latent_shape=shape,
                                         num_classes=geometry.num_classes, shard_size=1024)
            stream = BatchStream(LatentDataset(tmp), batch, hflip=True)
            seconds = _timed(lambda: next(stream), torch.device("cpu"), warmup, max(iters, 20))
    finally:
        torch.set_num_threads(threads)
    return {"batch": batch, "latent_shape": list(shape), "latents_per_s": batch / seconds}


def run_bench(overrides: list[str], what=WHAT, log: str | None = None, warmup: int = 3, iters: int = 10,
              profile: bool = False, show: Callable[[dict], None] | None = None) -> dict:
    """Benchmark the config of `overrides`; append the result to the JSONL `log` when given. `profile` adds
    where the training step's time goes (`profile_calls`). `show` gets the result before it is logged, so a log
    that fails to take it (a full disk, a lost mount) does not lose the measurements."""
    cfg = compose(overrides)
    validate(cfg)
    unknown = [w for w in what if w not in WHAT]
    require(not unknown, f"--what {' '.join(unknown)}: not one of {', '.join(WHAT)}")
    if log:
        check_output_path(log, "--log")
    device = resolve_device(cfg.trainer.device, "trainer.device")
    geometry = latent_geometry(cfg)
    flops = count_flops(cfg.model, geometry)
    precision = fast_path_settings(cfg.trainer, device)["precision"]
    peaks = {"measured": measured_peak_tflops(device, precision), "datasheet": datasheet_peak_tflops(device, precision)}
    result = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "overrides": list(overrides),
        "device": device_name(device),
        "torch": torch.__version__, "model": cfg.model.name, "tokens": geometry.tokens(cfg.model.patch_size),
        "params": flops["params"], "gflops": flops["gflops"], "precision": precision,
        "peak_tflops_measured": peaks["measured"], "peak_tflops_datasheet": peaks["datasheet"],
    }
    if "train" in what:
        result["train"] = bench_train(cfg, device, flops["gflops"], peaks, warmup, iters, profile)
    if "sample" in what:
        result["sample"] = bench_sample(cfg, device, flops["gflops"], peaks, warmup, iters)
    if "features" in what:
        result["features"] = bench_features(cfg, device, warmup, iters)
    if "latents" in what:
        result["latents"] = bench_latents(cfg, warmup, iters)
    if show is not None:
        show(result)
    if log:
        append_jsonl(Path(log), result)
    return result


def format_bench(result: dict) -> str:
    """The benchmark as a short table, then the full JSON."""
    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    lines = [f"{result['model']} ({result['tokens']} tokens, {result['gflops']:.4g} Gflops) on {result['device']}, "
             f"{result['precision']}; matmul peak measured {result['peak_tflops_measured']:.2f} TFLOP/s"
             + (f", datasheet {result['peak_tflops_datasheet']:.0f}" if result["peak_tflops_datasheet"] else "")]
    rows = []
    if "train" in result:
        r = result["train"]
        rows.append(("train step", r["batch"], r["images_per_s"], r["tflops"], r["mfu_measured"], r["mfu_datasheet"],
                     r["peak_mem_gb"]))
    for name in ("no_guidance", "cfg_1.5"):
        if "sample" in result:
            r = result["sample"][name]
            rows.append((f"sample step {name}", result["sample"]["batch"], r["images_per_s"], r["tflops"],
                         r["mfu_measured"], r["mfu_datasheet"], None))
    lines.append(f"{'what':<24}{'batch':>6}{'img/s':>12}{'TFLOP/s':>10}{'MFU(meas)':>11}{'MFU(sheet)':>11}{'mem GiB':>9}")
    for what, batch, ips, tf, m1, m2, mem in rows:
        lines.append(f"{what:<24}{batch:>6}{ips:>12.1f}{tf:>10.3f}{pct(m1):>11}{pct(m2):>11}"
                     f"{'-' if mem is None else f'{mem:.2f}':>9}")
    if "profile" in result.get("train", {}):
        r = result["train"]["profile"]
        busy = "" if r["gpu_busy_fraction"] is None else f", GPU busy {r['gpu_busy_fraction']:.0%}"
        lines.append(f"train step profile: {r['wall_ms_per_call']:.2f} ms per step{busy}")
        if r["kernel_ms_by_kind"]:
            lines.append("  GPU time by kind (ms per step): "
                         + ", ".join(f"{kind} {ms:.2f}" for kind, ms in r["kernel_ms_by_kind"].items()))
        if r["kernels"]:
            lines.append("  costliest kernels (ms per step):")
            lines += [f"  {k['ms_per_call']:8.3f}  x{k['launches_per_call']:<5g} {k['name'][:100]}" for k in r["kernels"][:20]]
        lines.append("  top self times (ms per step):")
        lines += [f"  {e['self_ms_per_call']:8.3f}  x{e['calls_per_call']:<5g} {e['name']}" for e in r["top"]]
    if "sample" in result:
        r = result["sample"]["cfg_1.5"]
        lines.append(f"250-step guided sampling: {r['images_per_s_250_steps']:.2f} img/s; "
                     f"a 50K-sample FID takes {r['fid50k_sampling_hours']:.1f} h on this device")
    if "features" in result:
        r = result["features"]
        lines.append(f"FID features: {r['skipped']}" if "skipped" in r else
                     f"FID features ({r['extractor']}): {r['images_per_s']:.0f} img/s")
    if "latents" in result:
        lines.append(f"latent cache: {result['latents']['latents_per_s']:.0f} latents/s on one core")
    return "\n".join(lines) + "\n" + json.dumps(result, indent=2, default=str)
