"""`harness bench` and the fast paths: each switch trains like the plain eager fp32 path."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from harness.bench import format_bench, profile_summary, run_bench
from harness.config import compose
from harness.train.runtime import achieved_tflops, autocast_forward, compiled, fast_path_settings, mfu
from harness.train.step import build_training, train_step


def _positive_numbers(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _positive_numbers(value, f"{path}.{key}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_bench_writes_every_field_positive(tmp_path):
    log = tmp_path / "bench.jsonl"
    result = run_bench([*TINY, "eval.batch_size=8"], log=str(log), warmup=1, iters=2)
    for section in ("train", "sample", "features", "latents"):
        assert section in result
    assert {"images_per_s", "tflops", "mfu_measured", "peak_mem_gb", "step_s"} <= result["train"].keys()
    assert {"images_per_s_250_steps", "fid50k_sampling_hours"} <= result["sample"]["cfg_1.5"].keys()
    numbers = dict(_positive_numbers(result))
    assert numbers and all(value > 0 for value in numbers.values()), numbers
    assert result["peak_tflops_datasheet"] is None  # a CPU has no datasheet entry
    # The CPU by name and vector ISA: the demo's numbers repeat to the last digit only on the same one.
    isa, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    assert result["device"].startswith("cpu (") and result["device"].endswith(f"; {isa}; {threads} threads)")
    assert result["device"].removeprefix("cpu (").split(";")[0].strip()
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged[-1]["train"]["images_per_s"] == result["train"]["images_per_s"]
    # The flops of each measurement: a training step is 3 forwards, a guided sampling step a doubled batch.
    gflops, train = result["gflops"], result["train"]
    assert train["tflops"] == pytest.approx(achieved_tflops(gflops, train["images_per_s"], 3.0))
    for name, passes in (("no_guidance", 1.0), ("cfg_1.5", 2.0)):
        step = result["sample"][name]
        assert step["tflops"] == pytest.approx(achieved_tflops(gflops, step["images_per_s"], passes))
        assert step["images_per_s_250_steps"] == pytest.approx(step["images_per_s"] / 250)
        assert step["fid50k_sampling_hours"] == pytest.approx(50_000 / step["images_per_s_250_steps"] / 3600)


def test_bench_cli_takes_overrides_after_what_and_checks_the_log_first(tmp_path, capsys):
    from harness.cli import main

    assert main(["bench", "--what", "train", *TINY, "--log", str(tmp_path)]) == 2  # a directory, not a log file
    assert capsys.readouterr().err.strip() == f"harness: error: --log={tmp_path} is a directory; give a file path"
    assert main(["bench", "--what", "trian", *TINY]) == 2
    assert "--what trian: not one of train, sample, features, latents" in capsys.readouterr().err
    if not torch.cuda.is_available():  # CUDA asked for and missing: an error, not a CPU benchmark labelled as asked
        assert main(["bench", *TINY, "trainer.device=cuda"]) == 2
        assert capsys.readouterr().err.strip() == "harness: error: trainer.device=cuda but no CUDA device is visible"


def test_bench_profile_says_where_a_step_goes():
    result = run_bench(TINY, what=("train",), warmup=1, iters=1, profile=True)
    profile = result["train"]["profile"]
    assert profile["wall_ms_per_call"] > 0 and profile["gpu_busy_fraction"] is None  # no GPU here
    assert profile["kernels"] == []
    assert len(profile["top"]) == 12 and any("mm" in op["name"] for op in profile["top"])
    assert all(op["self_ms_per_call"] >= 0 and op["calls_per_call"] > 0 for op in profile["top"])
    assert "train step profile" in format_bench(result)


def test_gpu_busy_share_counts_each_kernel_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device_type, self_device_us, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                               self_cpu_time_total=10, count=2, is_user_annotation=annotation)

    events = [
        event("aten::mm", DeviceType.CPU, 3000),  # the time of the gemm kernel below, seen from its op
        event("Command Buffer Full", DeviceType.CPU, 10**9),  # the host ahead of the GPU: not an op
        event("sm90_gemm", DeviceType.CUDA, 3000),
        event("aten::_fused_adamw_", DeviceType.CPU, 1000),
        event("multi_tensor_apply_kernel", DeviceType.CUDA, 1000),
        event("Optimizer.step#AdamW.step", DeviceType.CUDA, 1000, annotation=True),  # spans the kernel above
        event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", DeviceType.CUDA, 400),
        event("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", DeviceType.CUDA, 600),
        event("triton_per_fused_native_layer_norm_0", DeviceType.CUDA, 200),
        event("triton_tem_fused_addmm_gelu_3", DeviceType.CUDA, 400),  # max-autotune: a GEMM, GELU in its epilogue
    ]
    summary = profile_summary(events, calls=2, wall_ms=4.0, cuda=True)
    assert summary["gpu_busy_fraction"] == pytest.approx((3.0 + 1.0 + 0.4 + 0.6 + 0.2 + 0.4) / 2 / 4.0)
    assert summary["kernel_ms_by_kind"] == pytest.approx(
        {"gemm": 2.0, "optimizer+ema": 0.5, "attention": 0.2, "fused elementwise (triton)": 0.1})
    assert list(summary["kernel_ms_by_kind"])[0] == "gemm"
    assert [op["name"] for op in summary["top"]] == ["aten::mm", "aten::_fused_adamw_"]
    assert summary["top"][0]["self_ms_per_call"] == pytest.approx(1.5)
    assert [(k["name"], k["kind"]) for k in summary["kernels"][:2]] == [("sm90_gemm", "gemm"),
                                                                         ("multi_tensor_apply_kernel", "optimizer+ema")]
    assert len(summary["kernels"]) == 6  # the annotation is not a kernel
    assert summary["kernels"][0]["ms_per_call"] == pytest.approx(1.5) and summary["kernels"][0]["launches_per_call"] == 1


def test_mfu_arithmetic_by_hand():
    # 0.5 Gflops (MACs) per image forward, 100 images/s, training = 3 forward-equivalents:
    # 0.5e9 MAC * 2 flop/MAC * 3 * 100 /s = 3.0e11 flop/s = 0.3 TFLOP/s.
    assert achieved_tflops(0.5, 100.0, 3.0) == pytest.approx(0.3)
    assert achieved_tflops(0.5, 100.0, 2.0) == pytest.approx(0.2)  # a guided sampling step: doubled batch
    assert mfu(0.3, 1.2) == pytest.approx(0.25)
    assert mfu(0.3, None) is None


def _losses(overrides: list[str], steps: int = 3) -> list[float]:
    """Losses of `steps` training steps on fixed batches, through the train app's own step."""
    cfg = compose([*TINY, *overrides])
    device = torch.device("cpu")
    fast = fast_path_settings(cfg.trainer, device)
    model, ema, opt, diffusion = build_training(cfg, device)
    forward = autocast_forward(compiled(model, fast), model, fast, device)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        t = torch.randint(0, 1000, (16,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        drop = torch.rand(16, generator=gen) < 0.1
        losses.append(train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, cfg.trainer)["loss"].mean().item())
    return losses


@pytest.mark.parametrize("switch, rel", [
    ("trainer.grad_checkpointing=true", 1e-6),
    ("trainer.fused_adamw=true", 1e-5),
    ("trainer.grad_clip=1000.0", 1e-6),  # clipping far above the gradient norm changes nothing
    ("trainer.attention=math", 1e-5),  # the reference kernel against PyTorch's fused CPU choice
    ("trainer.compile=true", 1e-4),  # inductor reorders float reductions
    ("trainer.compile=true trainer.compile_tuning=true", 1e-4),
    # bf16 autocast rounds activations to 8 mantissa bits: losses agree to about 1% (documented tolerance).
    ("trainer.precision=bf16", 2e-2),
    ("trainer.precision=bf16 trainer.residual_precision=bf16", 2e-2),  # the residual stream rounded too
])
def test_fast_path_matches_plain_path(switch, rel):
    plain = _losses(["trainer.precision=fp32", "trainer.compile=false", "trainer.fused_adamw=false"])
    fast = _losses(["trainer.precision=fp32", "trainer.compile=false", "trainer.fused_adamw=false", *switch.split()])
    assert fast == pytest.approx(plain, rel=rel)


@pytest.mark.parametrize("residual_precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_residual_precision_sets_the_dtype_between_blocks_in_training_only(residual_precision, dtype):
    cfg = compose([*TINY, "trainer.precision=bf16", f"trainer.residual_precision={residual_precision}"])
    model, ema, _, _ = build_training(cfg, torch.device("cpu"))
    seen = {"model": [], "ema": []}
    for name, module in (("model", model), ("ema", ema)):
        for block in module.blocks:
            block.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].dtype))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
        ema(x, t, y)  # FIDs sample from the EMA the way `harness eval` does: fp32 between blocks
    assert seen == {"model": [dtype] * len(model.blocks), "ema": [torch.float32] * len(ema.blocks)}


@pytest.mark.parametrize("mode, mode_options", [("default", {}), ("reduce-overhead", {"triton.cudagraphs": True})])
def test_compile_tuning_adds_kernel_tuning_to_the_mode(monkeypatch, mode, mode_options):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    fast = {"compile": True, "compile_mode": mode, "compile_tuning": False}
    compiled(torch.nn.Linear(2, 2), fast)
    compiled(torch.nn.Linear(2, 2), {**fast, "compile_tuning": True})
    assert calls == [{"mode": None if mode == "default" else mode},
                     {"options": {**mode_options, "coordinate_descent_tuning": True, "max_autotune_pointwise": True}}]


def test_cpu_defaults_are_the_plain_path():
    cfg = compose(TINY)
    assert fast_path_settings(cfg.trainer, torch.device("cpu")) == {"precision": "fp32", "compile": False,
                                                                    "compile_mode": "default",
                                                                    "compile_tuning": False, "attention": "auto"}
    assert fast_path_settings(cfg.trainer, torch.device("cuda")) == {"precision": "bf16", "compile": True,
                                                                     "compile_mode": "reduce-overhead",
                                                                     "compile_tuning": False, "attention": "auto"}
    assert fast_path_settings(cfg.trainer, torch.device("cuda"), world_size=2)["compile_mode"] == "default"
    assert fast_path_settings(cfg.trainer, torch.device("cuda"), sampling=True)["compile_mode"] == "default"
