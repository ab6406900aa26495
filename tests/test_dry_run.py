"""`harness dry-run`: what a config costs, one real step, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from conftest import run_harness
from harness.cli import main
from harness.train import dry_run, estimate_training_memory, format_dry_run


def test_dry_run_reports_costs_and_takes_a_real_step():
    report = dry_run(["model=mini-S/4", "trainer.global_batch_size=64", "trainer.max_steps=1000"])
    assert report["tokens"] == 16 and report["geometry"] == {"input_size": 16, "in_channels": 1, "num_classes": 10}
    assert report["params"] > 0 and report["gflops"] > 0
    assert report["train_compute_flops"] == pytest.approx(report["gflops"] * 1e9 * 64 * 1000 * 3)
    assert report["step"]["loss"] > 0 and report["step"]["batch"] == 2
    text = format_dry_run(report)
    for needle in ("tokens           16", "forward Gflops", "training compute", "memory per GPU", "one real step"):
        assert needle in text


def test_paper_model_gets_the_paper_setting():
    report = dry_run(["model=DiT-S/8"], take_step=False)
    assert report["geometry"] == {"input_size": 32, "in_channels": 4, "num_classes": 1000}
    assert report["tokens"] == 16 and report["gflops"] == pytest.approx(0.36, rel=5e-3)


def test_memory_estimate_by_hand():
    # 1M params -> 20 MB of state; 2 blocks x 20 words x 16 tokens x 64 hidden x 2 B (bf16) x batch 4.
    m = estimate_training_memory(10**6, depth=2, tokens=16, hidden=64, batch_per_gpu=4,
                                 precision="bf16", grad_checkpointing=False)
    assert m["state_gb"] == pytest.approx(20e6 / 2**30)
    assert m["activations_gb"] == pytest.approx(2 * 20 * 16 * 64 * 2 * 4 / 2**30)  # depth x words x T x d x bf16 x batch
    fp32 = estimate_training_memory(10**6, 2, 16, 64, 4, "fp32", False)
    assert fp32["activations_gb"] == pytest.approx(2 * m["activations_gb"])
    ckpt = estimate_training_memory(10**6, 2, 16, 64, 4, "bf16", True)
    assert ckpt["activations_gb"] < m["activations_gb"]


@pytest.mark.parametrize("overrides, message", [
    (["model=DiT-XXL/2"], "DiT-XXL/2"),
    (["model.conditioning=film"], "conditioning='film' is not one of adaln_zero, adaln, cross_attention, in_context"),
    (["model.patch_size=3"], "model.patch_size=3 does not divide the latent size 16"),
    (["model.num_heads=7"], "not divisible by model.num_heads=7"),
    (["model.depth=0"], "model.depth"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
    (["data.image_size=-16"], "data.image_size"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, overrides, message):
    assert main(["dry-run", "--no-step", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and message in lines[0], lines


def test_the_installed_command_reports_bad_input_without_a_traceback():
    result = run_harness(["dry-run", "--no-step", "model.num_heads=7"])
    assert result.returncode == 2
    assert result.stderr.strip() == "harness: error: model.hidden_size=96 is not divisible by model.num_heads=7"
