"""`harness dry-run`: what a config costs, one real step, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from conftest import run_harness
from harness.config import compose, with_paper_setting
from harness.cli import main
from harness.train.dry_run import dry_run, estimate_training_memory, format_dry_run


def test_dry_run_reports_costs_and_takes_a_real_step():
    report = dry_run(["model=mini-S/4", "trainer.global_batch_size=64", "trainer.max_steps=1000"])
    assert report["tokens"] == 16 and report["geometry"] == {"input_size": 16, "in_channels": 1, "num_classes": 10}
    assert report["params"] > 0 and report["gflops"] > 0
    assert report["train_compute_flops"] == pytest.approx(report["gflops"] * 1e9 * 64 * 1000 * 3)
    assert report["step"]["loss"] > 0 and report["step"]["batch"] == 2
    text = format_dry_run(report)
    for needle in ("tokens           16", "forward Gflops", "training compute", "memory per GPU", "one real step"):
        assert needle in text


def test_the_command_says_its_phases_on_stderr_and_reports_on_stdout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))  # an empty Gflops cache: the count is traced
    said = []
    report = dry_run(["model=mini-S/4"], say=said.append)
    assert said == ["counting Gflops with fvcore (tracing mini-S/4) ...",
                    "building mini-S/4 (0.7M params), its EMA and optimizer on the CPU ...",
                    "one real training step on the CPU at batch 2 (forward, backward, AdamW, EMA) ..."]
    assert main(["dry-run", "model=mini-S/4"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == said[1:]  # the count is cached now
    # stdout is the report alone (its step time aside).
    assert out.rstrip("\n").rsplit(" in ", 1)[0] == format_dry_run(report).rsplit(" in ", 1)[0]


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
    # Checkpointing keeps each block's input (T x d) and one block's activations for the recomputation.
    assert ckpt["activations_gb"] == pytest.approx((2 * 16 * 64 * 2 * 4 + 20 * 16 * 64 * 2 * 4) / 2**30)
    # A bf16 residual stream: the two LayerNorm inputs per block are kept in one word each, not two.
    low = estimate_training_memory(10**6, 2, 16, 64, 4, "bf16", False, residual_precision="bf16")
    assert low["activations_gb"] == pytest.approx(18 / 20 * m["activations_gb"])
    assert estimate_training_memory(10**6, 2, 16, 64, 4, "fp32", False, residual_precision="bf16") == fp32


def test_memory_estimate_of_the_h200_measurements():
    """Out of sample: XL/2 on an H200 (tests/gpu/results/2026-11-27-h200-*)."""
    def xl2(batch, residual="fp32"):
        return estimate_training_memory(675_129_632, 28, 256, 1152, batch, "bf16", False, residual)["total_gb"]
    assert xl2(256) == pytest.approx(91.16, rel=0.01)
    assert xl2(320) == pytest.approx(111.08, rel=0.01)
    assert xl2(256, "bf16") == pytest.approx(83.01, rel=0.01)


def test_the_dry_run_estimates_memory_per_gpu():
    report = dry_run(["model=mini-S/4", "trainer.global_batch_size=64", "trainer.gpus=4"], take_step=False)
    assert report["batch_per_gpu"] == 16 and report["precision"] == "bf16"  # the estimate is for a GPU
    cfg = compose(["model=mini-S/4"])
    assert report["memory"].items() >= estimate_training_memory(report["params"], cfg.model.depth, report["tokens"],
                                                                cfg.model.hidden_size, 16, "bf16", False).items()


# Past XL (conf/model/DiT-G, DiT-5B; the yaml comments give the sources of their shapes).
PAST_XL = {"DiT-G": (40, 1408, 16), "DiT-5B": (32, 3072, 32)}


@pytest.mark.parametrize("size", sorted(PAST_XL))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_models_past_xl_compose_with_their_shapes(size, patch):
    cfg = compose(with_paper_setting([f"model={size}/{patch}"]))
    m = cfg.model
    assert (m.name, m.size, m.patch_size) == (f"{size}/{patch}", size.split("-")[1], patch)
    assert (m.depth, m.hidden_size, m.num_heads) == PAST_XL[size]
    assert cfg.data.name == "latents" and cfg.trainer.gpu_memory_gib == 80  # the paper's setting; an 80 GB GPU


@pytest.fixture(scope="module")
def past_xl():
    """The dry runs of DiT-G/2 and DiT-5B/2 planned on 8 GPUs (no CPU step: their state outgrows this machine)."""
    return {size: dry_run([f"model={size}/2", "trainer.gpus=8"], take_step=False) for size in PAST_XL}


def test_models_past_xl_cost_what_their_shapes_say(past_xl):
    g, big = past_xl["DiT-G"], past_xl["DiT-5B"]
    xl = 675_129_632  # DiT-XL/2 (the paper: 675M)
    for report, (depth, d, _) in ((g, PAST_XL["DiT-G"]), (big, PAST_XL["DiT-5B"])):
        # Each block: 18 d^2 weights (qkv 3, proj 1, MLP 8, adaLN-Zero 6) and 15 d biases; ~12 d^2 T flops + 2 T^2 d.
        blocks = depth * (18 * d * d + 15 * d)
        assert 0 < report["params"] - blocks < 0.01 * report["params"]  # embedders and final layer
        assert report["gflops"] == pytest.approx(depth * (12 * d * d * 256 + 2 * 256**2 * d + 6 * d * d) / 1e9, rel=0.01)
    assert 1.4e9 < g["params"] < 1.5e9 and 250 < g["gflops"] < 255 and g["params"] > 2 * xl
    assert 5.4e9 < big["params"] < 5.5e9 and 940 < big["gflops"] < 945


def test_fsdp_shards_the_state_but_not_the_activations(past_xl):
    plan = past_xl["DiT-5B"]["memory_plan"]
    ddp, fsdp = plan["ddp"], plan["fsdp"]
    d = 3072
    assert fsdp["state_gb"] == pytest.approx(ddp["state_gb"] / 8) == pytest.approx(20 * past_xl["DiT-5B"]["params"] / 8 / 2**30)
    assert fsdp["gathered_gb"] == pytest.approx((18 * d * d + 15 * d) * 2 / 2**30)  # one block in bf16
    assert ddp["gathered_gb"] == 0 and fsdp["activations_gb"] == ddp["activations_gb"]
    assert past_xl["DiT-5B"]["memory"] == ddp  # trainer.parallel defaults to ddp


def test_the_dry_run_says_what_will_not_fit_under_ddp_and_how_many_gpus_fsdp_needs(past_xl):
    g, big = past_xl["DiT-G"]["memory_plan"], past_xl["DiT-5B"]["memory_plan"]
    # DiT-G/2 fits an 80 GiB GPU either way on 8 GPUs.
    assert g["ddp"]["fits"] and g["fsdp"]["fits"] and g["ddp"]["total_gb"] < 80
    # DiT-5B/2: ~102 GiB of unsharded state alone under DDP, so no GPU count helps; FSDP fits on 8 (batch 32/GPU)
    # but not on 4 (batch 64/GPU: twice the activations).
    assert not big["ddp"]["fits"] and big["ddp"]["state_gb"] > 80 and big["ddp"]["gpus_needed"] is None
    assert big["fsdp"]["fits"] and big["fsdp"]["gpus_needed"] == 8
    text = format_dry_run(past_xl["DiT-5B"])
    assert ("DDP on 8 GPUs: will NOT fit (~132 GiB), on any number of GPUs (its unsharded state alone is 102 GiB)"
            in text)
    assert "FSDP on 8 GPUs: fits (~43.1 GiB), needs 8 GPUs (trainer.parallel=fsdp trainer.gpus=8)" in text
    # On an H200 (139 GiB) it fits under DDP too, with little room.
    h200 = dry_run(["model=DiT-5B/2", "trainer.gpus=8", "trainer.gpu_memory_gib=139"], take_step=False)["memory_plan"]
    assert h200["ddp"]["fits"] and h200["ddp"]["gpus_needed"] == 8


def test_the_past_xl_sweep_asks_for_the_nodes_and_tasks_its_models_fit_on():
    from harness.config import latent_geometry
    from harness.flops import count_flops
    from harness.sweep import plan, schedulers
    from harness.train.dry_run import block_param_count, memory_plan

    with plan.hydra_context():
        specs = {s.cfg.model.name: s for s in plan.expand_grid("past_xl", [])[1]}
    assert sorted(specs) == ["DiT-5B/2", "DiT-G/2"]
    layouts = {name: schedulers.slurm_parameters(s.cfg) for name, s in specs.items()}
    assert [layouts["DiT-G/2"][k] for k in ("nodes", "ntasks_per_node", "gpus_per_node")] == [1, 8, 8]
    assert [layouts["DiT-5B/2"][k] for k in ("nodes", "ntasks_per_node", "gpus_per_node")] == [2, 8, 8]
    for name, spec in specs.items():
        cfg = spec.cfg
        geometry = latent_geometry(cfg)
        memory = memory_plan(cfg.trainer, cfg.model, count_flops(cfg.model, geometry)["params"],
                             block_param_count(cfg.model, geometry), geometry.tokens(cfg.model.patch_size), "bf16")
        assert memory[str(cfg.trainer.parallel)]["fits"], name  # each runs the way it fits
    assert (specs["DiT-G/2"].cfg.trainer.parallel, specs["DiT-5B/2"].cfg.trainer.parallel) == ("ddp", "fsdp")
    assert specs["DiT-5B/2"].cfg.trainer.gpus == 16


def test_the_cpu_step_is_skipped_with_a_reason_when_the_model_outgrows_this_machine(monkeypatch):
    monkeypatch.setattr("harness.train.dry_run.available_memory_gb", lambda: 1e-6)
    report = dry_run(["model=mini-S/4"])
    assert "step" not in report and "GiB of CPU memory" in report["step_skipped"]
    assert "one real step    skipped: mini-S/4's weights" in format_dry_run(report)


def test_the_paper_setting_is_added_only_to_a_paper_model_alone():
    assert with_paper_setting(["model=DiT-S/8"]) == ["experiment=imagenet256", "model=DiT-S/8"]
    for chosen in (["autoencoder=identity"], ["data=digits"], ["+experiment=imagenet512"], ["experiment=imagenet512"]):
        assert with_paper_setting(["model=DiT-XL/2", *chosen]) == ["model=DiT-XL/2", *chosen]
    assert with_paper_setting(["model=mini-S/2"]) == ["model=mini-S/2"]


def test_an_unknown_flag_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["dry-run", "--no-step", "--bogus=1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "harness: error: unrecognized arguments: --bogus=1 (see harness --help)\n"


@pytest.mark.parametrize("overrides, message", [
    (["model=DiT-XXL/2"], "DiT-XXL/2"),
    (["model.conditioning=film"], "conditioning='film' is not one of adaln_zero, adaln, cross_attention, in_context"),
    (["model.patch_size=3"], "model.patch_size=3 does not divide the latent size 16"),
    (["model.num_heads=7"], "not divisible by model.num_heads=7"),
    (["model.depth=0"], "model.depth"),
    (["trainer.max_steps=0"], "trainer.max_steps must be a positive integer"),
    (["data.image_size=-16"], "data.image_size"),
    (["trainer.gpu_memory_gib=0"], "trainer.gpu_memory_gib must be a number > 0"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, overrides, message):
    assert main(["dry-run", "--no-step", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and message in lines[0], lines


def test_the_installed_command_reports_bad_input_without_a_traceback():
    result = run_harness(["dry-run", "--no-step", "model.num_heads=7"])
    assert result.returncode == 2
    assert result.stderr.strip() == "harness: error: model.hidden_size=96 is not divisible by model.num_heads=7"


def test_the_paper_setting_composes_the_paper_recipe():
    """experiment=imagenet256 is the recipe of dit-facts.md, value by value."""
    from harness.diffusion import create_diffusion

    cfg = compose(["experiment=imagenet256"])
    tc, ev, m = cfg.trainer, cfg.eval, cfg.model
    assert (m.name, m.class_dropout_prob, m.learn_sigma, m.mlp_ratio) == ("DiT-XL/2", 0.1, True, 4.0)
    assert (tc.lr, tc.weight_decay, tc.ema_decay, tc.global_batch_size, tc.max_steps) == (1e-4, 0.0, 0.9999, 256, 400_000)
    assert (tc.grad_clip, list(tc.betas)) == (0.0, [0.9, 0.999])
    assert cfg.data.hflip is True and (cfg.data.image_size, cfg.autoencoder.name) == (256, "sd-vae-ft-ema")
    diffusion = create_diffusion(cfg.diffusion)
    assert diffusion.num_timesteps == 1000
    assert diffusion.betas[0] == pytest.approx(1e-4) and diffusion.betas[-1] == pytest.approx(0.02)
    assert (ev.num_samples, ev.sampler, ev.cfg_scale, ev.every) == (50_000, "ddpm250", 1.0, 50_000)
