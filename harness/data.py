"""Training data: the three datasets, the deterministic batch stream, and the latent cache.

- `digits`: scikit-learn's bundled 8x8 digits resized to `data.image_size`, 1 channel in [-1, 1], with a
  fixed seeded stratified train/held-out split. Held in memory.
- `imagefolder`: `root/<class>/<image>` (class index = sorted folder order), ADM's centre crop, RGB in
  [-1, 1]. Unreadable images are skipped and counted, or fatal, per `data.on_bad_image`.
- `latents`: a cache written by `extract_latents`: shards holding the latent of every image and of its
  horizontal flip, plus an `index.json` with a sha256 per shard, memory-mapped when loaded.

`BatchStream` turns any of them into an infinite, seeded, resumable sequence of per-rank batches whose
union over ranks does not depend on the world size (so DDP on W ranks sees what 1 process sees).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harness.autoencoders import build_autoencoder, check_autoencoder_source
from harness.config import latent_geometry, resolve_device
from harness.errors import HarnessError, require
from harness.io import atomic_write_bytes, atomic_write_json, check_output_path, read_json, sha256_file

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "held_out")
INDEX_FILE = "index.json"
META_FILE = "extract_meta.json"
CACHE_FORMAT = "harness-latents-v1"
LATENT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (e.g. (seed, epoch, position)), well mixed by SeedSequence."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------------
# In-memory datasets (digits)
# ----------------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) float32 in [-1, 1] and int64 labels held in memory; flips are done on the fly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images, self.labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].clone(), self.labels[i].clone()

    def gather(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch by tensor indexing (far faster than collating items); `flips` mirrors chosen samples."""
        x = self.images.index_select(0, indices)
        if flips.any():
            x[flips] = x[flips].flip(-1)
        return x, self.labels.index_select(0, indices)


@functools.lru_cache(maxsize=8)
def _digits_split(image_size: int, held_out_fraction: float, split_seed: int) -> dict:
    """Processed digits per split: float images in [-1, 1], the uint8 version, labels (cached: tiny)."""
    from sklearn.datasets import load_digits  # scikit-learn takes a second to import: only the digits data need it
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw = torch.from_numpy(digits.images).float().unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    labels = torch.from_numpy(digits.target).long()
    # Bilinear keeps every value a convex combination of its neighbours, so no overshoot beyond 0..16 (bicubic
    # rings around the strokes) and no 2x2 blocks (nearest would make patch 1 see duplicated pixels);
    # antialias matters only when shrinking below 8px.
    resized = torch.nn.functional.interpolate(raw, size=(image_size, image_size), mode="bilinear",
                                              antialias=True, align_corners=False).clamp(0.0, 16.0)
    images = resized / 8.0 - 1.0
    images_uint8 = (resized * (255.0 / 16.0)).round().to(torch.uint8)
    train_idx, held_idx = train_test_split(np.arange(len(labels)), test_size=held_out_fraction,
                                           stratify=digits.target, random_state=split_seed)
    out = {}
    for split, idx in (("train", np.sort(train_idx)), ("held_out", np.sort(held_idx))):
        idx = torch.from_numpy(idx)
        out[split] = (images[idx].contiguous(), images_uint8[idx].contiguous(), labels[idx].contiguous())
    return out


def _digits(data_cfg: DictConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = int(data_cfg.image_size)
    fraction = float(data_cfg.get("held_out_fraction", 0.2))
    require(size > 0, f"data.image_size must be a positive integer, got {data_cfg.image_size}")
    require(0.0 < fraction < 1.0, f"data.held_out_fraction must be in (0, 1), got {fraction}")
    require(10 <= round(1797 * fraction) <= 1787,
            f"data.held_out_fraction={fraction} leaves a split with fewer images than the 10 classes")
    require(int(data_cfg.num_classes) == 10, f"data.num_classes={data_cfg.num_classes} but digits has 10 classes")
    require(int(data_cfg.channels) == 1, f"data.channels={data_cfg.channels} but digits has 1 channel")
    return _digits_split(size, fraction, int(data_cfg.get("split_seed", 0)))[split]


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side is >= 2x the target, BICUBIC to the target, crop."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _header_ok(path: str) -> bool:
    """Whether PIL recognises the file (reads the header only; full decoding happens when loaded)."""
    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except Exception:
        return False


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>`; items are (float32 CxSxS in [-1, 1], int64 label), or None for an unreadable
    image found while loading under `on_bad_image="skip"` (batches drop it)."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, num_classes: int | None = None,
                 on_bad_image: str = "skip", scan_threads: int = 8, root_key: str = "data.root"):
        root = Path(str(root)).expanduser()
        require(on_bad_image in ("skip", "fail"), f"data.on_bad_image={on_bad_image!r} is not one of skip, fail")
        require(channels in (1, 3), f"data.channels={channels}: image folders are read as 1 (L) or 3 (RGB) channels")
        require(int(image_size) > 0, f"data.image_size must be a positive integer, got {image_size}")
        self.root, self.image_size, self.channels, self.on_bad_image = root, int(image_size), channels, on_bad_image
        self.classes = class_folders(root, num_classes, root_key)
        files = {c: _image_files(root / c) for c in self.classes}
        empty = [c for c in self.classes if not files[c]]
        require(not empty, f"{root_key}={str(root)!r}: empty class folder(s) with no images: {', '.join(empty[:10])}")
        candidates = [(path, label) for label, c in enumerate(self.classes) for path in files[c]]
        with ThreadPoolExecutor(max(1, scan_threads)) as pool:
            ok = list(pool.map(_header_ok, (path for path, _ in candidates), chunksize=64))
        bad = [path for (path, _), good in zip(candidates, ok) if not good]
        if bad and on_bad_image == "fail":
            raise HarnessError(f"unreadable image {bad[0]} (data.on_bad_image=fail; set skip to skip such files)")
        self.skipped = bad
        self.samples = [item for item, good in zip(candidates, ok) if good]
        counts = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        unreadable = [c for c, n in zip(self.classes, counts) if n == 0]
        require(not unreadable, f"{root_key}={str(root)!r}: class folder(s) with no readable image: {', '.join(unreadable[:10])}")
        if bad:
            warnings.warn(f"{root_key}={str(root)!r}: skipped {len(bad)} unreadable image(s) (data.on_bad_image=skip), "
                          f"e.g. {bad[0]}", stacklevel=2)
        self.num_classes = len(self.classes)

    @classmethod
    def from_cfg(cls, data_cfg: DictConfig, split: str = "train") -> "ImageFolderDataset":
        root, key = _image_folder_root(data_cfg, split)
        return cls(root, int(data_cfg.image_size), int(data_cfg.channels), int(data_cfg.num_classes),
                   str(data_cfg.get("on_bad_image", "skip")), scan_threads=2 * max(1, int(data_cfg.get("num_workers", 4))),
                   root_key=key)

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, i: int, flip: bool = False) -> np.ndarray | None:
        """The cropped image as uint8 HxWxC, or None when it cannot be decoded and bad images are skipped."""
        path = self.samples[i][0]
        try:
            with Image.open(path) as image:
                image.load()
                arr = center_crop_arr(image.convert("RGB" if self.channels == 3 else "L"), self.image_size)
        except Exception as err:
            if self.on_bad_image == "fail":
                raise HarnessError(f"unreadable image {path} ({type(err).__name__}; data.on_bad_image=fail)") from None
            warnings.warn(f"skipped unreadable image {path} (data.on_bad_image=skip)", stacklevel=2)
            return None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.ascontiguousarray(arr[:, ::-1] if flip else arr)

    def item(self, i: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        arr = self.load_uint8(i, flip)
        if arr is None:
            return None
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, torch.tensor(self.samples[i][1], dtype=torch.int64)

    def __getitem__(self, i: int):
        return self.item(i)


def _image_folder_root(data_cfg: DictConfig, split: str) -> tuple[str, str]:
    """(root, its config key) of data=imagefolder's `split`: data.root, or data.held_out_root for held_out."""
    key = "data.root" if split == "train" else "data.held_out_root"
    root = data_cfg.get("root") if split == "train" else data_cfg.get("held_out_root")
    require(root not in (None, "", "???"), f"{key} is not set: point it at a folder of <class>/<image> files")
    return root, key


def class_folders(root: Path, num_classes: int | None = None, root_key: str = "data.root") -> list[str]:
    """The sorted class folders of an image folder (class index = position), checked against `num_classes`."""
    require(root.is_dir(), f"{root_key}={str(root)!r} is not a directory (expected {root_key}/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    require(classes, f"{root_key}={str(root)!r} has no class folders (expected {root_key}/<class>/<image>)")
    if num_classes is not None:
        require(int(num_classes) == len(classes),
                f"data.num_classes={num_classes} but {root_key}={str(root)!r} has {len(classes)} class folders")
    return classes


def _image_files(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return found


# ----------------------------------------------------------------------------------------------------
# The latent cache (read side)
# ----------------------------------------------------------------------------------------------------


def read_latent_index(root: Path, root_key: str = "data.root") -> dict:
    """The index of a finished latent cache, every shard it lists present at its recorded size (no shard is read)."""
    require(root.is_dir(), f"{root_key}={str(root)!r} is not a directory (a cache written by harness extract-latents)")
    index_path = root / INDEX_FILE
    require(index_path.is_file(), f"{index_path} not found: {root_key} is not a finished latent cache "
                                  f"(run or resume `harness extract-latents ... out={root}`)")
    index = read_json(index_path)
    require(isinstance(index, dict) and index.get("format") == CACHE_FORMAT,
            f"{index_path} is not a {CACHE_FORMAT} latent cache index")
    for shard in index["shards"]:
        path = root / shard["file"]
        require(path.is_file(), f"missing latent shard {path} (listed in {index_path}); re-run extract-latents to rewrite it")
        require(path.stat().st_size == int(shard["bytes"]),
                f"corrupt latent shard {path}: {path.stat().st_size} bytes, index says {shard['bytes']}; re-run extract-latents")
    return index


def check_cache_fits(index: dict, where: Path, data_cfg: DictConfig, ae_cfg: DictConfig | None = None) -> None:
    """A latent cache's index must describe the images and autoencoder the config declares."""
    for key in ("image_size", "channels", "num_classes"):
        require(int(data_cfg[key]) == int(index[key]), f"data.{key}={data_cfg[key]} but {where} was extracted with {index[key]}")
    if ae_cfg is not None:
        require(abs(float(ae_cfg.scale_factor) - float(index["scale_factor"])) < 1e-9,
                f"autoencoder.scale_factor={ae_cfg.scale_factor} but {where} was extracted with {index['scale_factor']}")
        channels, size = int(index["latent_shape"][0]), int(index["latent_shape"][1])
        if ae_cfg.latent_channels is not None:
            require(int(ae_cfg.latent_channels) == channels,
                    f"autoencoder.latent_channels={ae_cfg.latent_channels} but {where} holds {channels}-channel latents")
        require(int(index["image_size"]) // int(ae_cfg.downsample) == size,
                f"autoencoder.downsample={ae_cfg.downsample} but {where} holds {size}x{size} latents of {index['image_size']}px images")


class LatentDataset(Dataset):
    """A latent cache: items are (latent float32 CxHxW, int64 label); `flip` picks the flipped image's latent.

    Shards are memory-mapped, so ranks on a node share the page cache instead of each holding a copy.
    """

    def __init__(self, root: str | os.PathLike, verify_checksums: bool = True, root_key: str = "data.root"):
        self.root = Path(str(root)).expanduser()
        index_path = self.root / INDEX_FILE
        self.index = index = read_latent_index(self.root, root_key)
        self.num_classes = int(index["num_classes"])
        self.latent_shape = tuple(index["latent_shape"])
        latents, labels, ends = [], [], []
        for shard in index["shards"]:
            path = self.root / shard["file"]
            if verify_checksums:
                require(sha256_file(path) == shard["sha256"],
                        f"corrupt latent shard {path}: sha256 does not match {index_path}; re-run extract-latents to rewrite it")
            try:
                content = torch.load(path, mmap=True, weights_only=True)
            except Exception as err:
                raise HarnessError(f"corrupt latent shard {path}: cannot be read ({type(err).__name__})") from None
            lat, lab = content["latents"], content["labels"]
            require(tuple(lat.shape) == (int(shard["count"]), 2, *self.latent_shape) and len(lab) == int(shard["count"]),
                    f"corrupt latent shard {path}: shape {tuple(lat.shape)} does not match {index_path}")
            latents.append(lat.view(-1, *self.latent_shape))  # row 2*i is image i, row 2*i+1 its flip
            labels.append(lab)
            ends.append((ends[-1] if ends else 0) + len(lab))
        self.shard_latents = latents
        self._arrays = [lat.numpy() for lat in latents]  # zero-copy views of the mapped files
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self.shard_starts = torch.tensor([0] + ends[:-1], dtype=torch.int64)
        require(len(self.labels) > 0, f"{index_path}: the latent cache holds no latents")

    def check_against(self, data_cfg: DictConfig, ae_cfg: DictConfig | None = None) -> None:
        """The cache must describe the images and autoencoder the config declares."""
        check_cache_fits(self.index, self.root / INDEX_FILE, data_cfg, ae_cfg)

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, i: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        shard = int(torch.searchsorted(self.shard_starts, torch.tensor(i), right=True)) - 1
        row = 2 * (i - int(self.shard_starts[shard])) + int(flip)
        return self.shard_latents[shard][row].float(), self.labels[i].clone()

    def __getitem__(self, i: int):
        return self.item(i)

    def gather(self, indices: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch read straight from the mapped shards.

        One numpy row copy per sample: a random batch from an ImageNet-sized cache touches hundreds of
        shards, where per-shard torch indexing costs several times more in per-call overhead.
        """
        shards = torch.searchsorted(self.shard_starts, indices, right=True) - 1
        rows = 2 * (indices - self.shard_starts[shards]) + flips.long()
        out = np.empty((len(indices), *self.latent_shape), dtype=self._arrays[0].dtype)
        for j, (shard, row) in enumerate(zip(shards.tolist(), rows.tolist())):
            out[j] = self._arrays[shard][row]
        return _serial_float(torch.from_numpy(out)), self.labels.index_select(0, indices)


TORCH_PARALLEL_GRAIN = 32768  # elements: torch runs an elementwise op on its intra-op threads from this size on


def _serial_float(x: torch.Tensor) -> torch.Tensor:
    """`x.float()` in slices under torch's parallel grain, so each runs on the calling thread. A whole batch's
    cast runs on the intra-op threads and waits for the slowest: with one of 2 cores busy, 7.9 ms for a batch
    of 32 against 0.25 ms, and the train loop's main thread casts every batch (README, performance)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    rows = max(1, (TORCH_PARALLEL_GRAIN - 1) // max(1, math.prod(x.shape[1:])))
    for start in range(0, len(x), rows):
        out[start:start + rows] = x[start:start + rows]
    return out


# ----------------------------------------------------------------------------------------------------
# Entry points used by train and evaluate
# ----------------------------------------------------------------------------------------------------


def build_dataset(data_cfg: DictConfig, split: str = "train", ae_cfg: DictConfig | None = None) -> Dataset:
    """The dataset of `data_cfg` for `split` ("train" | "held_out"); items are (x float32 CxHxW, int64 label).

    For `latents` items are (latent, label); `ae_cfg`, when given, is checked against the cache's index.
    """
    require(split in SPLITS, f"split={split!r} is not one of {', '.join(SPLITS)}")
    name = str(data_cfg.name)
    if name == "digits":
        images, _, labels = _digits(data_cfg, split)
        return TensorImageDataset(images, labels, 10)
    if name == "imagefolder":
        return ImageFolderDataset.from_cfg(data_cfg, split)
    if name == "latents":
        dataset = LatentDataset(_latent_cache_root(data_cfg, split), bool(data_cfg.get("verify_checksums", True)))
        dataset.check_against(data_cfg, ae_cfg)
        return dataset
    raise HarnessError(f"data.name={name!r} is not one of digits, imagefolder, latents")


def check_data_source(data_cfg: DictConfig, ae_cfg: DictConfig | None = None) -> None:
    """What `build_dataset(data_cfg, "train", ae_cfg)` will read exists and fits the config, judged from directory
    listings and the cache index alone (no image decoded, no shard read): cheap enough to run for every point
    of a sweep before anything is submitted."""
    name = str(data_cfg.name)
    if name == "latents":
        root = Path(str(_latent_cache_root(data_cfg, "train"))).expanduser()
        check_cache_fits(read_latent_index(root), root / INDEX_FILE, data_cfg, ae_cfg)
    elif name == "imagefolder":
        root, key = _image_folder_root(data_cfg, "train")
        class_folders(Path(str(root)).expanduser(), int(data_cfg.num_classes), key)
    else:
        require(name == "digits", f"data.name={name!r} is not one of digits, imagefolder, latents")


def _latent_cache_root(data_cfg: DictConfig, split: str) -> str:
    """data.root of data=latents, which has only a train split."""
    require(split == "train", "data=latents has no held_out split (a latent cache is extracted from training images)")
    root = data_cfg.get("root")
    require(root not in (None, "", "???"), "data.root is not set: point it at a latent cache (out= of extract-latents)")
    return root


def _subset(n: int, limit: int | None) -> torch.Tensor:
    """All indices, or a fixed seeded spread of `limit` of them (the first N would all be the first classes)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    require(limit > 0, f"limit must be positive, got {limit}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values


def real_images_uint8(data_cfg: DictConfig, split: str = "train", limit: int | None = None) -> torch.Tensor:
    """Real images of a split as uint8 NCHW, processed as for training (the FID reference set)."""
    require(split in SPLITS, f"split={split!r} is not one of {', '.join(SPLITS)}")
    name = str(data_cfg.name)
    if name == "digits":
        _, images, _ = _digits(data_cfg, split)
        return images.index_select(0, _subset(len(images), limit))
    if name == "latents":
        root = _latent_cache_root(data_cfg, split)
        index = read_json(Path(str(root)).expanduser() / INDEX_FILE)
        require(isinstance(index, dict) and index.get("source_root"),
                f"data.root={root!r}: no latent cache index naming its source images (needed for FID references)")
        dataset = ImageFolderDataset(index["source_root"], int(index["image_size"]), int(index["channels"]),
                                     int(index["num_classes"]), str(data_cfg.get("on_bad_image", "skip")),
                                     root_key="the latent cache's source_root")
    else:
        dataset = build_dataset(data_cfg, split)
    indices = _subset(len(dataset), limit).tolist()
    loader = DataLoader(indices, batch_size=64, num_workers=int(data_cfg.get("num_workers", 0)),
                        collate_fn=functools.partial(_load_uint8_batch, dataset))
    batches = [batch for batch in loader if len(batch)]
    require(batches, f"no readable images in data.root={data_cfg.get('root')!r}")
    return torch.cat(batches)


def _load_uint8_batch(dataset: ImageFolderDataset, indices: list[int]) -> torch.Tensor:
    arrays = [a for a in (dataset.load_uint8(i) for i in indices) if a is not None]
    if not arrays:
        return torch.zeros(0, dataset.channels, dataset.image_size, dataset.image_size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# The batch stream
# ----------------------------------------------------------------------------------------------------


class _Plan:
    """Which samples (and flips) global batch `(epoch, position)` holds, and this rank's slice of it."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, hflip: bool):
        self.n, self.batch_size, self.rank, self.seed, self.hflip = num_samples, batch_size, rank, seed, hflip
        self.global_batch = batch_size * world_size
        self._perm_epoch, self._perm = None, None

    def advance(self, epoch: int, position: int) -> tuple[int, int]:
        """Where the next batch starts: the last partial global batch of an epoch is dropped."""
        return (epoch + 1, 0) if position + self.global_batch > self.n else (epoch, position)

    def slice(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)), epoch
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        indices = self._perm[position + lo:position + hi]
        if not self.hflip:
            return indices, torch.zeros(len(indices), dtype=torch.bool)
        # Drawn for the whole global batch, so each sample's flip does not depend on the world size.
        flips = torch.rand(self.global_batch, generator=seeded_generator(self.seed, epoch, position, 1)) < 0.5
        return indices, flips[lo:hi]


class _PlanSampler:
    """Batch sampler for the DataLoader path: this rank's (index, flip) lists from a given state onward."""

    def __init__(self, plan: _Plan, epoch: int, position: int):
        self.plan, self.epoch, self.position = plan, epoch, position

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            epoch, position = self.plan.advance(epoch, position)
            indices, flips = self.plan.slice(epoch, position)
            yield list(zip(indices.tolist(), flips.tolist()))
            position += self.plan.global_batch


class _FlipItems(Dataset):
    """Lets DataLoader workers load (index, flip) pairs, from our datasets' `item` or any (x, y) dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        index, flip = key
        if hasattr(self.dataset, "item"):
            return self.dataset.item(index, flip)
        item = self.dataset[index]
        if item is None or not flip:
            return item
        return item[0].flip(-1), item[1]


def _collate_skipping(items: list, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    items = [item for item in items if item is not None]
    if not items:
        return torch.zeros(0, *shape), torch.zeros(0, dtype=torch.int64)
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)


class BatchStream:
    """Infinite (x, y) batches for one rank: deterministic in (seed, epoch, position), resumable exactly.

    Each epoch is a permutation drawn from (seed, epoch); global batch k is `world_size * batch_size`
    consecutive entries of it and rank r takes the r-th slice, so W ranks with batch B together see exactly
    what one process with batch W*B sees, in rank order. The last partial global batch of an epoch is
    dropped. `state_dict()` counts the batches handed out, not those prefetched by loader workers.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 hflip: bool = False, num_workers: int = 0, pin_memory: bool = False):
        require(batch_size > 0, f"batch size per rank must be positive, got {batch_size}")
        require(world_size > 0 and 0 <= rank < world_size, f"rank {rank} is not in a world of {world_size}")
        require(len(dataset) >= batch_size * world_size,
                f"global batch {batch_size * world_size} is larger than the dataset ({len(dataset)} samples)")
        self.dataset, self.pin_memory, self.num_workers = dataset, pin_memory, num_workers
        self.plan = _Plan(len(dataset), batch_size, rank, world_size, seed, hflip)
        self.epoch, self.position = 0, 0
        self._loader_iter = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._loader_iter = None  # the workers' prefetched batches belong to the old position

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.epoch, self.position = self.plan.advance(self.epoch, self.position)
        if hasattr(self.dataset, "gather"):
            x, y = self.dataset.gather(*self.plan.slice(self.epoch, self.position))
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
        else:
            if self._loader_iter is None:
                self._loader_iter = iter(self._loader())
            x, y = next(self._loader_iter)
        self.position += self.plan.global_batch
        return x, y

    def _loader(self) -> DataLoader:
        items = _FlipItems(self.dataset)
        sample = next(item for item in (items[i, False] for i in range(len(self.dataset))) if item is not None)
        collate = functools.partial(_collate_skipping, shape=tuple(sample[0].shape))
        return DataLoader(items, batch_sampler=_PlanSampler(self.plan, self.epoch, self.position),
                          num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
                          persistent_workers=False)


# ----------------------------------------------------------------------------------------------------
# Latent extraction (write side)
# ----------------------------------------------------------------------------------------------------


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _file_list_digest(dataset: ImageFolderDataset) -> str:
    digest = hashlib.sha256()
    for path, label in dataset.samples:
        digest.update(f"{label}\t{os.path.relpath(path, dataset.root)}\n".encode())
    return digest.hexdigest()


def _shard_done(out: Path, shard: int) -> bool:
    """A shard counts as done when its record exists and the file's checksum matches it."""
    record = read_json(out / f"{_shard_name(shard)}.json")
    path = out / f"{_shard_name(shard)}.pt"
    return isinstance(record, dict) and path.is_file() and sha256_file(path) == record.get("sha256")


def _write_shard(out: Path, shard: int, indices: range, dataset: ImageFolderDataset, autoencoder,
                 device: torch.device, cfg: DictConfig, latent_shape: tuple, dtype: torch.dtype) -> None:
    name = _shard_name(shard)
    for stale in out.glob(f".{name}.pt.*.tmp"):  # left by a kill mid-write of this shard
        stale.unlink(missing_ok=True)
    # Seeded per shard, so a shard re-encoded after a kill is bitwise the one an uninterrupted run writes.
    generator = seeded_generator(int(cfg.seed), shard, 2)
    loader = DataLoader(list(indices), batch_size=int(cfg.extract.batch_size), num_workers=int(cfg.data.num_workers),
                        collate_fn=functools.partial(_load_labelled_batch, dataset))
    latents, labels, skipped = [], [], []
    for x, y, bad in loader:
        skipped += bad
        if len(x) == 0:
            continue
        both = torch.cat([x, x.flip(-1)]).to(device)
        z = autoencoder.encode(both, generator=generator).cpu()
        latents.append(torch.stack([z[:len(x)], z[len(x):]], dim=1).to(dtype))
        labels.append(y)
    save_shard(out, shard, torch.cat(latents) if latents else torch.zeros(0, 2, *latent_shape, dtype=dtype),
               torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64), skipped)


def save_shard(out: Path, shard: int, latents: torch.Tensor, labels: torch.Tensor, skipped: list[str] = ()) -> None:
    """Write shard `shard` (latents (n, 2, C, h, w): image, flip) atomically, then its record with the sha256.

    The record is written last, so a shard without one (a kill in between) is simply redone.
    """
    name = _shard_name(shard)
    buffer = io.BytesIO()
    torch.save({"latents": latents.contiguous(), "labels": labels.long().contiguous()}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(out / f"{name}.pt", data)
    atomic_write_json(out / f"{name}.json", {"file": f"{name}.pt", "count": len(labels),
                                             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                             "skipped": list(skipped)})


def _load_labelled_batch(dataset: ImageFolderDataset, indices: list[int]):
    """Images, labels and the paths of images that could not be decoded (skipped under on_bad_image=skip)."""
    xs, ys, bad = [], [], []
    for i in indices:
        item = dataset.item(i)
        if item is None:
            bad.append(dataset.samples[i][0])
        else:
            xs.append(item[0])
            ys.append(item[1])
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    return (torch.stack(xs) if xs else torch.zeros(0, *shape),
            torch.stack(ys) if ys else torch.zeros(0, dtype=torch.int64), bad)


def extract_latents(cfg: DictConfig, out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> dict:
    """Encode the image folder of `cfg.data` through `cfg.autoencoder` into a sharded cache in `out_dir`.

    Every image and its horizontal flip are encoded. Rank r of W writes shards r, r+W, ...; shards already
    complete (record present, checksum matching) are skipped, so a killed extraction resumes where it
    stopped. Whoever finds every shard complete writes `index.json`. Returns a summary dict.
    """
    require(out_dir not in (None, ""), "out is not set: give out=DIR, the directory to write the latent cache to")
    require(str(cfg.data.name) == "imagefolder", f"extract-latents reads data=imagefolder, got data={cfg.data.name}")
    require(world_size > 0 and 0 <= rank < world_size, f"rank {rank} is not in a world of {world_size}")
    ex = cfg.extract
    require(int(ex.shard_size) > 0, f"extract.shard_size must be positive, got {ex.shard_size}")
    require(int(ex.batch_size) > 0, f"extract.batch_size must be positive, got {ex.batch_size}")
    require(str(ex.dtype) in LATENT_DTYPES, f"extract.dtype={ex.dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
    geometry = latent_geometry(cfg)
    out = check_output_path(str(out_dir), "out", kind="dir")
    dataset = ImageFolderDataset.from_cfg(cfg.data, "train")
    num_shards = math.ceil(len(dataset) / int(ex.shard_size))
    meta = {
        "format": CACHE_FORMAT, "num_classes": dataset.num_classes, "classes": dataset.classes,
        "image_size": int(cfg.data.image_size), "channels": int(cfg.data.channels),
        "latent_shape": [geometry.in_channels, geometry.input_size, geometry.input_size], "dtype": str(LATENT_DTYPES[str(ex.dtype)]).replace("torch.", ""),
        "autoencoder": str(cfg.autoencoder.name), "autoencoder_path": str(cfg.autoencoder.get("path")),
        "scale_factor": float(cfg.autoencoder.scale_factor), "seed": int(cfg.seed),
        "source_root": str(dataset.root.resolve()), "files_sha256": _file_list_digest(dataset),
        "num_source_images": len(dataset), "unreadable_at_scan": len(dataset.skipped),
        "shard_size": int(ex.shard_size), "num_shards": num_shards,
    }
    device = resolve_device(ex.device, "extract.device")
    check_autoencoder_source(cfg.autoencoder)
    previous = read_json(out / META_FILE)
    if previous is not None:
        changed = [k for k in meta if previous.get(k) != meta[k]]
        require(not changed, f"out={str(out)!r} holds a latent cache extracted with different settings "
                             f"({', '.join(changed)}); use a new out directory or delete it")
    else:
        atomic_write_json(out / META_FILE, meta)
    mine = range(rank, num_shards, world_size)
    todo = [s for s in mine if not _shard_done(out, s)]
    if todo:
        autoencoder = build_autoencoder(cfg.autoencoder, cfg.data, device)
        for shard in todo:
            indices = range(shard * int(ex.shard_size), min((shard + 1) * int(ex.shard_size), len(dataset)))
            _write_shard(out, shard, indices, dataset, autoencoder, device, cfg, tuple(meta["latent_shape"]),
                         LATENT_DTYPES[str(ex.dtype)])
    index = finalize_latents(out)
    return {"out": str(out), "rank": rank, "world_size": world_size, "num_shards": num_shards,
            "written": len(todo), "reused": len(mine) - len(todo), "complete": index is not None,
            "num_images": index["num_images"] if index else None, "skipped": index["skipped"] if index else None}


def finalize_latents(out_dir: str | os.PathLike) -> dict | None:
    """Write `index.json` once every shard of the extraction in `out_dir` has its record; else return None."""
    out = Path(str(out_dir))
    meta = read_json(out / META_FILE)
    require(isinstance(meta, dict), f"{out / META_FILE} not found: {out} is not a latent extraction directory")
    records = [read_json(out / f"{_shard_name(s)}.json") for s in range(meta["num_shards"])]
    if any(r is None or not (out / r["file"]).is_file() for r in records):
        return None
    skipped = [path for r in records for path in r["skipped"]]
    index = dict(meta, num_images=sum(r["count"] for r in records),
                 skipped=meta["unreadable_at_scan"] + len(skipped),
                 shards=[{k: r[k] for k in ("file", "count", "sha256", "bytes")} for r in records])
    if skipped:
        warnings.warn(f"latent extraction skipped {len(skipped)} image(s) that could not be decoded, e.g. {skipped[0]}",
                      stacklevel=2)
    atomic_write_json(out / INDEX_FILE, index)
    return index


def write_synthetic_latent_cache(out_dir: str | os.PathLike, num_images: int, latent_shape: tuple = (4, 32, 32),
                                 num_classes: int = 1000, shard_size: int = 1000, dtype: str = "fp16",
                                 downsample: int = 8, seed: int = 0) -> dict:
    """A complete cache of random latents in the real format, for benchmarking and testing the read side.

    Its index says `autoencoder: synthetic` and has no source images (no FID reference can come from it).
    """
    require(dtype in LATENT_DTYPES, f"dtype={dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
    out = Path(str(out_dir))
    generator = seeded_generator(seed, 3)
    num_shards = math.ceil(num_images / shard_size)
    atomic_write_json(out / META_FILE, {
        "format": CACHE_FORMAT, "num_classes": num_classes, "classes": [str(k) for k in range(num_classes)],
        "image_size": latent_shape[1] * downsample, "channels": 3, "latent_shape": list(latent_shape),
        "dtype": str(LATENT_DTYPES[dtype]).replace("torch.", ""), "autoencoder": "synthetic", "autoencoder_path": None,
        "scale_factor": 0.18215, "seed": seed, "source_root": None, "files_sha256": None,
        "num_source_images": num_images, "unreadable_at_scan": 0, "shard_size": shard_size, "num_shards": num_shards,
    })
    for shard in range(num_shards):
        n = min(shard_size, num_images - shard * shard_size)
        latents = torch.randn((n, 2, *latent_shape), generator=generator).to(LATENT_DTYPES[dtype])
        save_shard(out, shard, latents, torch.randint(0, num_classes, (n,), generator=generator))
    return finalize_latents(out)


def rank_world_from_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS); else (0, 1)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1
