"""The validation loss: the EMA's diffusion loss on the held-out digits at fixed timesteps with fixed noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from harness.config import compose, latent_geometry
from harness.evaluate.run import evaluate_model
from harness.evaluate.val_loss import validation_loss
from harness.model import build_model, load_weights
from harness.run_dir import RunDir
from harness.train.loop import train
from test_evaluate import TINY_EVAL, cfg, fid_cache, tiny_model  # noqa: F401 (cfg, fid_cache: fixtures)

CPU = torch.device("cpu")
VAL_FIELDS = {"val_loss", "val_loss_se", "val_vb_bpd", "val_vb_bpd_se", "val_images", "val_timesteps"}


def test_the_same_weights_give_the_same_value_bitwise_and_leave_the_global_rng_alone(cfg):
    model = tiny_model(cfg)
    state = torch.get_rng_state()
    first, second = validation_loss(model, cfg, CPU), validation_loss(model, cfg, CPU)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from
    assert first == second
    assert first["val_images"] == 360 and first["val_timesteps"] == 10  # every held-out digit, default grid
    assert 0 < first["val_loss_se"] < first["val_loss"] and 0 < first["val_vb_bpd_se"] < first["val_vb_bpd"]
    assert not model.training  # its mode as it was


def test_the_value_does_not_depend_on_the_batch_size(cfg):
    model = tiny_model(cfg)
    by_batch = [validation_loss(model, compose([*TINY_EVAL, f"eval.batch_size={bs}"]), CPU) for bs in (7, 64, 360)]
    for other in by_batch[1:]:
        assert other == pytest.approx(by_batch[0], rel=1e-6)


def test_val_limit_caps_the_images_and_val_timesteps_sets_the_grid(cfg):
    model = tiny_model(cfg)
    small = validation_loss(model, compose([*TINY_EVAL, "eval.val_limit=50", "eval.val_timesteps=3"]), CPU)
    assert small["val_images"] == 50 and small["val_timesteps"] == 3
    assert validation_loss(model, compose([*TINY_EVAL, "eval.val_timesteps=0"]), CPU) is None


def test_a_short_training_lowers_the_validation_loss(tmp_path):
    run_cfg = compose([*TINY, "trainer.max_steps=150", "trainer.ckpt_every=150", "trainer.lr=2e-3",
                       "trainer.ema_decay=0.9", "trainer.device=cpu", "eval.val_limit=100"])
    torch.manual_seed(run_cfg.seed)  # the initial weights, as the trainer draws them
    model = build_model(run_cfg.model, latent_geometry(run_cfg))
    before = validation_loss(model, run_cfg, CPU)
    train(run_cfg, tmp_path)
    load_weights(RunDir(tmp_path).checkpoints()[-1], model, which="ema")
    after = validation_loss(model, run_cfg, CPU)
    assert after["val_loss"] < before["val_loss"] - 5 * (before["val_loss_se"] + after["val_loss_se"])


def test_the_row_carries_the_validation_loss_and_the_fid_does_not_change(cfg, tmp_path, fid_cache):
    off_cfg = compose([*TINY_EVAL, "eval.save_npz=true", f"eval.cache_dir={fid_cache}", "eval.val_timesteps=0"])
    on_cfg = compose([*TINY_EVAL, "eval.save_npz=true", f"eval.cache_dir={fid_cache}"])
    model = tiny_model(cfg)
    off = evaluate_model(model, off_cfg, 10, tmp_path / "off", say=lambda text: None)
    on = evaluate_model(model, on_cfg, 10, tmp_path / "on", say=lambda text: None)
    assert not VAL_FIELDS & set(off)
    assert {k: on[k] for k in VAL_FIELDS} == validation_loss(model, on_cfg, CPU)
    assert on["fid"] == off["fid"] and on["fid_floor"] == off["fid_floor"]
    samples = [np.load(tmp_path / run / "samples" / "step_0000010.npz")["arr_0"] for run in ("off", "on")]
    assert np.array_equal(*samples)


def test_data_without_a_held_out_split_give_no_validation_loss_and_say_so_once(tmp_path):
    said = []
    latents = compose([*TINY_EVAL, "data=latents", f"data.root={tmp_path}"])
    assert validation_loss(tiny_model(compose(TINY_EVAL)), latents, CPU, say=said.append) is None
    assert said == ["no validation loss: data=latents has no held-out split"]
