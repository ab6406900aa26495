"""Autoencoders: identity, the diffusers VAE path (on a tiny random AutoencoderKL), and the offline error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.autoencoders import build_autoencoder, check_autoencoder_source, to_uint8
from harness.config import compose, latent_geometry
from harness.errors import HarnessError
from helpers import make_image_folder, make_tiny_vae, tiny_vae_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


def vae_cfg(vae_dir, *overrides):
    return compose(["data=imagefolder", "data.root=/unused", "data.image_size=32", *tiny_vae_overrides(vae_dir),
                    *overrides])


def test_identity_round_trip():
    cfg = compose([])
    ae = build_autoencoder(cfg.autoencoder, cfg.data)
    assert (ae.name, ae.latent_channels, ae.downsample, ae.scale_factor) == ("identity", 1, 1, 1.0)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert torch.equal(z, x) and torch.equal(ae.decode(z), x)
    assert latent_geometry(cfg).in_channels == ae.latent_channels
    for override, message in (("autoencoder.latent_channels=3", "autoencoder.latent_channels=3 must equal "
                                                                 "data.channels=1 for identity"),
                              ("autoencoder.downsample=2", "autoencoder.downsample must be 1 for identity, got 2")):
        bad = compose([override])
        with pytest.raises(HarnessError) as err:
            build_autoencoder(bad.autoencoder, bad.data)
        assert str(err.value) == message


def test_to_uint8_is_the_released_conversion():
    x = torch.tensor([-1.0, -0.004, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 127, 128, 255, 255, 255]  # 127.5 x + 128, clamped, truncated


def test_a_relative_vae_path_is_a_local_directory_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = compose(["autoencoder=sd-vae-ft-ema", "autoencoder.path=./no_such_dir"])
    with pytest.raises(HarnessError, match=r"autoencoder.path='./no_such_dir' is not a directory"):
        check_autoencoder_source(cfg.autoencoder)


def test_vae_shapes_scale_factor_and_generator(tiny_vae):
    cfg = vae_cfg(tiny_vae)
    ae = build_autoencoder(cfg.autoencoder, cfg.data)
    assert (ae.name, ae.latent_channels, ae.downsample, ae.scale_factor) == ("sd-vae-ft-ema", 4, 2, 0.18215)
    assert latent_geometry(cfg).input_size == 16 and not any(p.requires_grad for p in ae.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 16, 16) and not z.requires_grad
    # latent = posterior sample x 0.18215, decode divides by it.
    posterior = ae.vae.encode(x).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(0)) * 0.18215
    assert torch.allclose(z, expected, atol=1e-6)
    assert not torch.allclose(z, posterior.mode() * 0.18215)  # a sample, not the mean
    assert torch.equal(ae.encode(x, generator=torch.Generator().manual_seed(0)), z)
    out = ae.decode(z)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, ae.vae.decode(z / 0.18215).sample, atol=1e-6)
    assert torch.allclose(ae.decode(z, batch_size=1), out, atol=1e-5)


def test_vae_config_must_match_the_weights(tiny_vae):
    cfg = vae_cfg(tiny_vae, "autoencoder.downsample=8")
    with pytest.raises(HarnessError, match="autoencoder.downsample=8 .* downsamples by 2"):
        build_autoencoder(cfg.autoencoder, cfg.data)
    cfg = vae_cfg(tiny_vae, "autoencoder.latent_channels=8")
    with pytest.raises(HarnessError, match="autoencoder.latent_channels=8"):
        build_autoencoder(cfg.autoencoder, cfg.data)


def test_missing_weights_name_the_key(tmp_path, monkeypatch):
    cfg = vae_cfg(tmp_path / "no_such_dir")
    with pytest.raises(HarnessError, match=r"autoencoder.path=.*no_such_dir.*local directory"):
        build_autoencoder(cfg.autoencoder, cfg.data)
    (tmp_path / "empty").mkdir()
    cfg = vae_cfg(tmp_path / "empty")
    with pytest.raises(HarnessError, match=r"autoencoder.path=.*empty.*local directory"):
        build_autoencoder(cfg.autoencoder, cfg.data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = vae_cfg("harness-tests/no-such-vae")
    start = time.time()
    with pytest.raises(HarnessError, match=r"autoencoder.path='harness-tests/no-such-vae'.*offline"):
        build_autoencoder(cfg.autoencoder, cfg.data)
    assert time.time() - start < 10


def test_the_vae_source_is_checked_without_loading_it(tiny_vae, tmp_path, monkeypatch):
    check_autoencoder_source(vae_cfg(tiny_vae).autoencoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=r"autoencoder.path=.*empty.* has no config.json"):
        check_autoencoder_source(vae_cfg(tmp_path / "empty").autoencoder)
    with pytest.raises(HarnessError, match=r"autoencoder.path=.*no_such_dir.* is not a directory"):
        check_autoencoder_source(vae_cfg(tmp_path / "no_such_dir").autoencoder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError, match=r"autoencoder.path='harness-tests/no-such-vae' is not in the hub cache"):
        check_autoencoder_source(vae_cfg("harness-tests/no-such-vae").autoencoder)
    check_autoencoder_source(compose([]).autoencoder)  # identity: nothing to find


def test_offline_cli_error_is_one_line_without_traceback(tmp_path):
    """`harness extract-latents` with the default hub id, offline and an empty hub cache: exit 2, one line."""
    root = make_image_folder(tmp_path / "img", classes=2, per_class=1, size=16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "harness.cli", "extract-latents", f"data.root={root}", "data.num_classes=2",
           "data.num_workers=0", f"out={tmp_path / 'out'}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("harness: error: autoencoder.path='stabilityai/sd-vae-ft-ema'")
    assert "local directory" in lines[0]
