"""Datasets, the batch stream, and the latent cache (extraction, resume after SIGKILL, corruption)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.cli import main
from harness.config import compose
from harness.data import (
    BatchStream,
    build_dataset,
    center_crop_arr,
    check_data_source,
    extract_latents,
    real_images_uint8,
    _subset,
    write_synthetic_latent_cache,
)
from harness.errors import HarnessError
from helpers import make_image_folder, make_tiny_vae, tiny_vae_overrides

REPO = Path(__file__).resolve().parent.parent


def data_cfg(*overrides):
    return compose(list(overrides)).data


def folder_cfg(root, *overrides):
    return data_cfg("data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_classes=2",
                    "data.num_workers=0", *overrides)


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split():
    train, held = build_dataset(data_cfg(), "train"), build_dataset(data_cfg(), "held_out")
    assert len(train) + len(held) == 1797 and len(held) == 360
    x, y = train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    assert train.images.min() < -0.99 and train.images.max() > 0.99  # uses the full range
    # Stratified: every class is ~20% held out.
    for k in range(10):
        n_train, n_held = int((train.labels == k).sum()), int((held.labels == k).sum())
        assert abs(n_held / (n_train + n_held) - 0.2) < 0.02
    # uint8 reference images are the same pixels.
    ref = real_images_uint8(data_cfg(), "held_out")
    assert ref.dtype == torch.uint8 and ref.shape == (360, 1, 16, 16)
    assert torch.allclose(ref.float() / 127.5 - 1.0, held.images, atol=1.0 / 255 + 1e-6)
    assert real_images_uint8(data_cfg(), "train", limit=100).shape == (100, 1, 16, 16)
    # A limit takes a fixed spread of the split, not its first images (which would be the first classes).
    spread = _subset(1437, 100)
    assert torch.equal(spread, _subset(1437, 100)) and torch.equal(spread, spread.sort().values)
    assert spread.max() > 1000 and not torch.equal(spread, torch.arange(100))
    assert len(build_dataset(data_cfg("data.held_out_fraction=0.5"), "held_out")) == 899  # ceil(1797 / 2)


def test_digits_split_is_seeded_and_scaling_exact_at_8px():
    from sklearn.datasets import load_digits

    a = build_dataset(data_cfg(), "held_out")
    b = build_dataset(data_cfg(), "held_out")
    c = build_dataset(data_cfg("data.split_seed=1"), "held_out")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    # At the native 8px the resize is the identity, so values are exactly raw / 8 - 1.
    native = build_dataset(data_cfg("data.image_size=8", "data.held_out_fraction=0.5"), "train")
    raw = torch.from_numpy(load_digits().images).float() / 8.0 - 1.0
    assert native.images.shape[1:] == (1, 8, 8)
    assert any(torch.equal(native.images[0, 0], r) for r in raw)


@pytest.mark.parametrize("override, key", [("data.num_classes=5", "data.num_classes"),
                                           ("data.held_out_fraction=1.5", "data.held_out_fraction"),
                                           ("data.channels=3", "data.channels")])
def test_digits_bad_config(override, key):
    with pytest.raises(HarnessError, match=key):
        build_dataset(data_cfg(override))


# ---------------------------------------------------------------------------------------------------- imagefolder


def test_adm_center_crop():
    rng = np.random.default_rng(0)
    for width, height, target in [(1024, 768, 256), (300, 200, 64), (40, 50, 64), (64, 64, 64)]:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        assert center_crop_arr(image, target).shape == (target, target, 3)
    # A centred white square stays centred and keeps its relative size through halving + bicubic + crop.
    pixels = np.zeros((600, 1000, 3), dtype=np.uint8)
    pixels[200:400, 400:600] = 255
    out = center_crop_arr(Image.fromarray(pixels), 60)
    rows, cols = np.nonzero(out[:, :, 0] > 127)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 39, 20, 39)
    # A short side of exactly twice the target is halved with BOX (ADM's >=), then only cropped.
    wide = rng.integers(0, 255, (512, 640, 3), dtype=np.uint8)
    halved = np.array(Image.fromarray(wide).resize((320, 256), resample=Image.BOX))
    assert np.array_equal(center_crop_arr(Image.fromarray(wide), 256), halved[:, 32:288])
    # An image already at the target size is untouched.
    same = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(same), 32), same)


def test_imagefolder_items_and_labels(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3, size=32)
    ds = build_dataset(folder_cfg(root))
    assert len(ds) == 6 and ds.classes == ["class_0", "class_1"]
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 1
    assert x.min() >= -1 and x.max() <= 1
    flipped, _ = ds.item(4, flip=True)
    assert torch.equal(flipped, x.flip(-1))
    ref = real_images_uint8(folder_cfg(root), "train")
    assert ref.shape == (6, 3, 32, 32) and ref.dtype == torch.uint8
    assert torch.allclose(ref[4].float() / 127.5 - 1, x)


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(HarnessError, match="data.root"):
        build_dataset(folder_cfg(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(HarnessError, match="no class folders"):
        build_dataset(folder_cfg(tmp_path / "flat"))
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3, size=16)
    with pytest.raises(HarnessError, match=r"data.num_classes=3 .* 2 class folders"):
        build_dataset(folder_cfg(root, "data.num_classes=3"))
    (root / "class_empty").mkdir()
    with pytest.raises(HarnessError, match="empty class folder.*class_empty"):
        build_dataset(folder_cfg(root, "data.num_classes=3"))
    (root / "class_empty").rmdir()


def test_imagefolder_unreadable_images_skip_or_fail(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3, size=32)
    (root / "class_0" / "garbage.png").write_bytes(b"this is not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = build_dataset(folder_cfg(root))
    assert len(ds) == 6 and ds.skipped == [str(root / "class_0" / "garbage.png")]
    with pytest.raises(HarnessError, match="garbage.png"):
        build_dataset(folder_cfg(root, "data.on_bad_image=fail"))
    (root / "class_0" / "garbage.png").unlink()

    # A valid header with truncated pixel data passes the scan and fails only when decoded.
    good = (root / "class_1" / "img_000.png").read_bytes()
    (root / "class_1" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = build_dataset(folder_cfg(root))
    assert len(ds) == 7
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("truncated.png"))
    with pytest.warns(UserWarning, match="truncated.png"):
        assert ds[bad] is None
    stream = BatchStream(ds, 7, seed=0)
    with pytest.warns(UserWarning):
        x, y = next(stream)
    assert x.shape == (6, 3, 32, 32) and len(y) == 6  # the undecodable image is dropped from its batch
    with pytest.raises(HarnessError, match="truncated.png"):
        build_dataset(folder_cfg(root, "data.on_bad_image=fail"))[bad]


def test_imagefolder_held_out_root(tmp_path):
    with pytest.raises(HarnessError, match="data.held_out_root"):
        build_dataset(folder_cfg(tmp_path), "held_out")
    held = make_image_folder(tmp_path / "val", classes=2, per_class=2, size=32)
    assert len(build_dataset(folder_cfg(tmp_path, f"+data.held_out_root={held}"), "held_out")) == 4


# ---------------------------------------------------------------------------------------------------- BatchStream


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_batch_stream_deterministic_epochs_and_seeds():
    ds = build_dataset(data_cfg(), "held_out")  # 360 samples: 5 batches of 64 per epoch, 40 dropped
    a, b = take(BatchStream(ds, 64, seed=3), 7), take(BatchStream(ds, 64, seed=3), 7)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other = take(BatchStream(ds, 64, seed=4), 1)[0]
    assert not torch.equal(a[0][0], other[0])
    stream = BatchStream(ds, 64, seed=3)
    take(stream, 5)
    assert stream.state_dict() == {"epoch": 0, "position": 320}
    next(stream)
    assert stream.state_dict() == {"epoch": 1, "position": 64}
    assert not torch.equal(a[0][0], a[5][0])  # each epoch is a new permutation


def test_batch_stream_is_a_permutation_per_epoch():
    ds = build_dataset(data_cfg(), "held_out")
    # Tag each sample by its index so batches reveal which samples they hold.
    tagged = type(ds)(torch.arange(len(ds), dtype=torch.float32).view(-1, 1, 1, 1), ds.labels, 10)
    seen = torch.cat([x.flatten() for x, _ in take(BatchStream(tagged, 60, seed=0), 6)]).long()
    assert sorted(seen.tolist()) == list(range(360))


def test_batch_stream_resume_mid_epoch_with_flips():
    ds = build_dataset(data_cfg(), "held_out")
    full = take(BatchStream(ds, 32, seed=1, hflip=True), 15)  # crosses the epoch boundary at 11
    first = BatchStream(ds, 32, seed=1, hflip=True)
    take(first, 6)
    state = first.state_dict()
    resumed = BatchStream(ds, 32, seed=1, hflip=True)
    resumed.load_state_dict(state)
    rest = take(resumed, 9)
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[6:]))
    # Flips happen, per sample: some samples in a batch are mirrored relative to the unflipped stream.
    plain = take(BatchStream(ds, 32, seed=1, hflip=False), 1)[0][0]
    mirrored = [not torch.equal(a, b) for a, b in zip(full[0][0], plain)]
    assert 0 < sum(mirrored) < 32
    plan = BatchStream(ds, 32, seed=1, hflip=True).plan  # half of the samples, drawn per sample
    flips = torch.cat([plan.slice(0, position)[1] for position in range(0, 320, 32)])
    assert 0.4 < flips.float().mean() < 0.6


def test_batch_stream_rank_slices_equal_single_process():
    ds = build_dataset(data_cfg(), "held_out")
    single = take(BatchStream(ds, 24, rank=0, world_size=1, seed=5, hflip=True), 20)
    ranks = [take(BatchStream(ds, 8, rank=r, world_size=3, seed=5, hflip=True), 20) for r in range(3)]
    for step in range(20):
        x = torch.cat([ranks[r][step][0] for r in range(3)])
        y = torch.cat([ranks[r][step][1] for r in range(3)])
        assert torch.equal(x, single[step][0]) and torch.equal(y, single[step][1])
    with pytest.raises(HarnessError, match="larger than the dataset"):
        BatchStream(ds, 200, rank=0, world_size=2)


def test_batch_stream_dataloader_path_matches_tensor_path():
    """Any (x, y) dataset goes through DataLoader workers and yields what the fast in-memory gather yields."""
    ds = build_dataset(data_cfg(), "held_out")
    generic = torch.utils.data.Subset(ds, range(len(ds)))  # no gather(), no item()
    fast = take(BatchStream(ds, 16, seed=7, hflip=True), 3)
    slow = take(BatchStream(generic, 16, seed=7, hflip=True, num_workers=1), 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fast, slow))


def test_batch_stream_dataloader_path_resume_and_ranks(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=5, size=32)
    ds = build_dataset(folder_cfg(root))
    full = take(BatchStream(ds, 4, seed=2, hflip=True, num_workers=2), 5)  # 10 images: 2 batches per epoch
    stream = BatchStream(ds, 4, seed=2, hflip=True)
    take(stream, 3)
    resumed = BatchStream(ds, 4, seed=2, hflip=True)
    resumed.load_state_dict(stream.state_dict())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(take(resumed, 2), full[3:]))
    halves = [take(BatchStream(ds, 2, rank=r, world_size=2, seed=2, hflip=True), 5) for r in range(2)]
    for step in range(5):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), full[step][0])


# ---------------------------------------------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """A 2-class x 6-image folder, the tiny VAE, and a complete single-rank reference extraction."""
    base = tmp_path_factory.mktemp("extract")
    root = make_image_folder(base / "img", classes=2, per_class=6, size=32)
    vae = make_tiny_vae(base / "vae")
    overrides = ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_classes=2",
                 "data.num_workers=0", *tiny_vae_overrides(vae), "extract.shard_size=2", "extract.batch_size=2"]
    ref = base / "ref"
    cfg = compose(overrides + [f"out={ref}"], config_name="extract_latents")
    summary = extract_latents(cfg, ref)
    return {"base": base, "root": root, "vae": vae, "overrides": overrides, "ref": ref, "summary": summary}


def latents_cfg(ex, root, *overrides):
    return compose(["data=latents", f"data.root={root}", "data.image_size=32", "data.num_classes=2",
                    *tiny_vae_overrides(ex["vae"]), *overrides])


def load_cache(ex, root):
    cfg = latents_cfg(ex, root)
    return build_dataset(cfg.data, "train", cfg.autoencoder)


def assert_same_cache(a, b):
    assert len(a) == len(b)
    for la, lb in zip(a.shard_latents, b.shard_latents):
        assert torch.equal(la, lb)
    assert torch.equal(a.labels, b.labels)


def test_extraction_writes_shards_and_index(extraction):
    import json

    from harness.io import sha256_file

    ref = extraction["ref"]
    assert extraction["summary"]["complete"] and extraction["summary"]["written"] == 6
    index = json.loads((ref / "index.json").read_text())
    assert index["num_images"] == 12 and index["num_classes"] == 2 and index["image_size"] == 32
    assert index["latent_shape"] == [4, 16, 16] and index["dtype"] == "float16"
    assert index["autoencoder"] == "sd-vae-ft-ema" and index["scale_factor"] == 0.18215
    assert [s["file"] for s in index["shards"]] == [f"shard_{i:05d}.pt" for i in range(6)]
    for shard in index["shards"]:
        assert shard["count"] == 2 and sha256_file(ref / shard["file"]) == shard["sha256"]
    ds = load_cache(extraction, ref)
    assert len(ds) == 12 and sorted(ds.labels.tolist()) == [0] * 6 + [1] * 6
    x, y = ds[0]
    flipped, _ = ds.item(0, flip=True)
    assert x.shape == (4, 16, 16) and x.dtype == torch.float32
    assert not torch.allclose(x, flipped)  # the flipped image has its own latent
    batch, labels = next(BatchStream(ds, 6, seed=0, hflip=True))
    assert batch.shape == (6, 4, 16, 16) and labels.shape == (6,)
    # The cache is checked against the training config.
    with pytest.raises(HarnessError, match="data.num_classes"):
        build_dataset(latents_cfg(extraction, ref, "data.num_classes=3").data)
    with pytest.raises(HarnessError, match="autoencoder.downsample"):
        cfg = latents_cfg(extraction, ref, "autoencoder.downsample=4")
        build_dataset(cfg.data, "train", cfg.autoencoder)
    # A finished extraction run again is a no-op.
    again = extract_latents(compose(extraction["overrides"] + [f"out={ref}"], config_name="extract_latents"), ref)
    assert again["written"] == 0 and again["reused"] == 6


def test_extraction_ranks_round_robin(extraction, tmp_path, monkeypatch):
    out = tmp_path / "ranks"
    overrides = extraction["overrides"] + [f"out={out}"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["extract-latents", *overrides]) == 0
    assert sorted(p.name for p in out.glob("shard_*.pt")) == ["shard_00001.pt", "shard_00003.pt", "shard_00005.pt"]
    assert not (out / "index.json").exists()  # rank 0's shards are still missing
    monkeypatch.setenv("RANK", "0")
    assert main(["extract-latents", *overrides]) == 0
    assert (out / "index.json").exists()
    assert_same_cache(load_cache(extraction, out), load_cache(extraction, extraction["ref"]))


def test_extraction_refuses_a_different_config_in_the_same_out(extraction, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(extraction["ref"], out)
    cfg = compose(extraction["overrides"] + [f"out={out}", "extract.shard_size=3"], config_name="extract_latents")
    with pytest.raises(HarnessError, match=r"out=.*different settings.*shard_size"):
        extract_latents(cfg, out)
    with pytest.raises(HarnessError, match="out is not set"):
        extract_latents(compose(extraction["overrides"], config_name="extract_latents"), None)


SLOW_EXTRACT = textwrap.dedent("""
    # Test hook only: every encoder call sleeps, so the parent can SIGKILL this process mid-extraction.
    import sys, time
    import harness.autoencoders as autoencoders
    encode = autoencoders.Autoencoder.encode
    def slow_encode(self, *args, **kwargs):
        time.sleep(0.7)
        return encode(self, *args, **kwargs)
    autoencoders.Autoencoder.encode = slow_encode
    from harness.cli import main
    sys.exit(main(["extract-latents", *sys.argv[1:]]))
""")


def test_extraction_resumes_after_sigkill(extraction, tmp_path):
    out = tmp_path / "killed"
    overrides = extraction["overrides"] + [f"out={out}"]
    # One thread, as in this test process: a different thread count may reorder float sums in the VAE.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while len(list(out.glob("shard_*.json"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "extraction subprocess made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = sorted(p.name for p in out.glob("shard_*.json"))
    assert 2 <= len(done) < 6 and not (out / "index.json").exists()
    stamps = {name: (out / name.replace(".json", ".pt")).stat().st_mtime_ns for name in done}
    # Loading the unfinished cache is refused, naming what is missing.
    with pytest.raises(HarnessError, match="index.json"):
        load_cache(extraction, out)
    summary = extract_latents(compose(overrides, config_name="extract_latents"), out)
    assert summary["complete"] and summary["reused"] >= len(done)
    assert all((out / name.replace(".json", ".pt")).stat().st_mtime_ns == t for name, t in stamps.items())
    assert not list(out.glob(".*.tmp"))
    assert_same_cache(load_cache(extraction, out), load_cache(extraction, extraction["ref"]))


def test_extraction_with_a_bad_out_or_device_writes_nothing(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=1, size=16)
    base = [f"data.root={root}", "data.num_classes=2", "data.image_size=16", "data.num_workers=0", "autoencoder=identity"]
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(HarnessError, match=r"out=.*taken is a file; give a directory path"):
        extract_latents(compose(base, config_name="extract_latents"), taken)
    with pytest.raises(HarnessError, match=r"extract.device='tpu' is not one of auto, cpu, cuda, cuda:N"):
        extract_latents(compose([*base, "extract.device=tpu"], config_name="extract_latents"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and taken.read_text() == "a file"


def test_corrupt_or_missing_shard_is_named(extraction, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(extraction["ref"], out)
    path = out / "shard_00003.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(HarnessError, match=r"corrupt latent shard .*shard_00003\.pt"):
        load_cache(extraction, out)
    # Re-running the extraction rewrites exactly the corrupt shard.
    summary = extract_latents(compose(extraction["overrides"] + [f"out={out}"], config_name="extract_latents"), out)
    assert summary["written"] == 1 and summary["reused"] == 5
    assert_same_cache(load_cache(extraction, out), load_cache(extraction, extraction["ref"]))
    (out / "shard_00002.pt").unlink()
    with pytest.raises(HarnessError, match=r"missing latent shard .*shard_00002\.pt"):
        load_cache(extraction, out)


def test_checksums_are_verified_unless_switched_off(extraction, monkeypatch):
    import harness.data as data

    def unreadable(path):
        raise AssertionError(f"checksummed {path}")

    monkeypatch.setattr(data, "sha256_file", unreadable)
    with pytest.raises(AssertionError, match="checksummed"):
        load_cache(extraction, extraction["ref"])
    cfg = latents_cfg(extraction, extraction["ref"], "data.verify_checksums=false")
    assert len(build_dataset(cfg.data, "train", cfg.autoencoder)) == 12


def test_batch_stream_resumed_in_place_drops_the_prefetched_batches(tmp_path):
    """On the DataLoader path (image folders), loading a state mid-stream restarts the loader there."""
    ds = build_dataset(folder_cfg(make_image_folder(tmp_path / "img", classes=2, per_class=6, size=32)))
    full = take(BatchStream(ds, 3, seed=2, hflip=True), 4)
    stream = BatchStream(ds, 3, seed=2, hflip=True)
    take(stream, 1)
    state = stream.state_dict()
    take(stream, 2)
    stream.load_state_dict(state)
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(take(stream, 3), full[1:]))


def test_data_source_check_reads_no_image_and_no_shard(tmp_path):
    """The sweep-time check names what a run would fail on, from listings and the index alone."""
    root = tmp_path / "cache"
    write_synthetic_latent_cache(root, 64, latent_shape=(4, 4, 4), num_classes=10, shard_size=32)
    cache = ["data=latents", f"data.root={root}", "data.image_size=32", "data.num_classes=10", "autoencoder=sd-vae-ft-ema"]
    cfg = compose(cache)
    check_data_source(cfg.data, cfg.autoencoder)
    with pytest.raises(HarnessError, match=r"data.root='.*nowhere' is not a directory"):
        check_data_source(data_cfg("data=latents", f"data.root={tmp_path / 'nowhere'}"))
    with pytest.raises(HarnessError, match=r"data.num_classes=1000 but .*index.json was extracted with 10"):
        cfg_1000 = compose([*cache, "data.num_classes=1000"])
        check_data_source(cfg_1000.data, cfg_1000.autoencoder)
    # Same size, garbage content: only opening the shard could tell, which this check leaves to the run.
    shard = next(root.glob("shard_*.pt"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    check_data_source(cfg.data, cfg.autoencoder)
    shard.unlink()
    with pytest.raises(HarnessError, match=r"missing latent shard .*shard_"):
        check_data_source(cfg.data, cfg.autoencoder)
    folder = make_image_folder(tmp_path / "img", classes=2, per_class=1, size=16)
    check_data_source(folder_cfg(folder))
    with pytest.raises(HarnessError, match=r"data.num_classes=3 .* 2 class folders"):
        check_data_source(folder_cfg(folder, "data.num_classes=3"))
    with pytest.raises(HarnessError, match="data.root is not set"):
        check_data_source(data_cfg("data=imagefolder"))
    check_data_source(data_cfg("data=digits"))


@pytest.mark.parametrize("latent_shape", [(4, 32, 32), (16, 64, 64)])  # 7 rows a cast slice; one row over the grain
def test_latent_batches_are_the_stored_values(tmp_path, latent_shape):
    """Batches hold exactly the stored latents (fp16 -> fp32), flipped or not, across shards. How fast they
    load is `harness bench --what latents`'s to measure, not a test's."""
    write_synthetic_latent_cache(tmp_path, 30, latent_shape=latent_shape, num_classes=1000, shard_size=10)
    cfg = data_cfg("data=latents", f"data.root={tmp_path}", f"data.image_size={8 * latent_shape[1]}")
    ds = build_dataset(cfg)
    indices = torch.tensor([5, 5, 9, 10, 29, 15, 0, 1, 2, 3, 4])
    flips = torch.tensor([False, True, True, False, True, False, False, True, False, True, False])
    x, y = ds.gather(indices, flips)
    stored = torch.stack([ds.shard_latents[i // 10][2 * (i % 10) + f].float() for i, f in zip(indices.tolist(), flips.tolist())])
    assert x.dtype == torch.float32 and torch.equal(x, stored) and torch.equal(y, ds.labels[indices])
    batch, _ = next(BatchStream(ds, 16, seed=0, hflip=True))
    assert batch.shape == (16, *latent_shape) and batch.dtype == torch.float32
    with pytest.raises(HarnessError, match="source"):
        real_images_uint8(cfg)
