"""Evaluation: samples from a DiT at a checkpoint and their FID, computed in-process by torch-fidelity.

The protocol follows the paper (EMA weights, `eval.num_samples` samples, 250 DDPM steps, FID against
reference statistics of the training set), with the feature extractor chosen by `eval.feature_extractor`:

- `inception-v3-compat` (ImageNet): torch-fidelity's Inception, weights from a local file
  (`eval.inception_weights`, never downloaded here); reference statistics from ADM's reference batch
  `.npz` (`eval.reference`: mu, sigma) or computed once from the training images. Reported as
  `fid_inception`.
- `digits-cnn` (the embedded digits default): a small CNN classifier trained on the digits train split
  (`harness train-digits-cnn`, weights shipped in `harness/assets/digits_cnn.pt`), registered with
  torch-fidelity so the same `calculate_metrics` call computes the Frechet distance in its penultimate
  features. Reported as `fid_digits`: it is not comparable with Inception FIDs.

Reference statistics live in torch-fidelity's own cache (`eval.cache_dir`), named by the data config and
a fingerprint of the extractor's weights, so they are computed once per (extractor, data config) and a
retrained extractor never meets stale statistics.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from harness.config import Geometry, resolve_device, slug
from harness.errors import HarnessError, require
from harness.io import (append_jsonl, atomic_torch_save, atomic_write_bytes, cache_root, check_output_path, read_jsonl,
                        sha256_file)
from harness.autoencoders import run_autoencoder
from harness.tracking import run_id

ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_CNN = "digits-cnn"
DIGITS_WEIGHTS = ASSETS / "digits_cnn.pt"
DIGITS_LAYER = "penultimate"
INCEPTION = "inception-v3-compat"
# The file torch-fidelity 0.4.0 downloads for inception-v3-compat (we never download it ourselves).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# Every sample's image and features are held in memory on rank 0; the field uses 50K.
MAX_SAMPLES = 100_000
# torch-fidelity's result keys.
FID_KEY, ISC_KEY = "frechet_inception_distance", "inception_score_mean"
# Mixed into evaluation seeds so they never coincide with the training stream's (seed, step) draws.
EVAL_STREAM = 0x5EED_E7A1


# ----------------------------------------------------------------------------------------------------
# The digits feature extractor
# ----------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """A LeNet-style classifier of 1-channel uint8 digits; its penultimate layer is the FID feature space.

    conv3x3(1->w) - ReLU - maxpool - conv3x3(w->2w) - ReLU - maxpool - fc(features) - ReLU - fc(10).
    Inputs are uint8 images, scaled to [-1, 1] inside, as the data pipeline scales them.
    """

    def __init__(self, image_size: int = 16, width: int = 32, features: int = 128, num_classes: int = 10):
        super().__init__()
        require(image_size % 4 == 0 and image_size >= 4,
                f"the digits CNN needs data.image_size divisible by 4, got {image_size}")
        self.image_size, self.width, self.num_features, self.num_classes = image_size, width, features, num_classes
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def arch(self) -> dict:
        return dict(image_size=self.image_size, width=self.width, features=self.num_features,
                    num_classes=self.num_classes)


def train_digits_extractor(out_path: str | os.PathLike, seed: int = 0, data_cfg: DictConfig | None = None,
                           epochs: int = 15, verbose: bool = False) -> dict:
    """Train the digits CNN on the digits train split and save it with its metadata; return the metadata
    (plus the training time).

    Reproducible: fixed seeds, one CPU thread (a different thread count may reorder float sums), no
    global RNG state touched. `data_cfg` defaults to `conf/data/digits.yaml`; the weights record the
    data config they were trained for; images of other sizes are resized to it by the extractor.
    """
    from harness.config import compose
    from harness.data import build_dataset, real_images_uint8

    data_cfg = data_cfg if data_cfg is not None else compose([]).data
    require(data_cfg.name == "digits", f"train-digits-cnn trains on data=digits, got data={data_cfg.name}")
    require(int(data_cfg.channels) == 1, f"the digits CNN takes 1 channel, got data.channels={data_cfg.channels}")
    require(epochs > 0, f"epochs must be positive, got {epochs}")
    size = int(data_cfg.image_size)
    x_train = real_images_uint8(data_cfg, "train")
    y_train = build_dataset(data_cfg, "train").labels
    x_held, y_held = real_images_uint8(data_cfg, "held_out"), build_dataset(data_cfg, "held_out").labels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # initialisation and dropout
            gen = torch.Generator().manual_seed(seed)  # order and shifts
            model = DigitsCNN(size)
            batch, lr = 64, 3e-3
            steps = epochs * math.ceil(len(x_train) / batch)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
            start = time.perf_counter()
            for epoch in range(epochs):
                model.train()
                order = torch.randperm(len(x_train), generator=gen)
                for i in range(0, len(order), batch):
                    idx = order[i:i + batch]
                    loss = F.cross_entropy(model(_random_shift(x_train[idx], gen)), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                if verbose:
                    acc = classifier_accuracy(model, x_held, y_held)
                    print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}", flush=True)
            train_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    data = OmegaConf.to_container(data_cfg, resolve=True)
    # No timings or paths in the file: retraining writes the same bytes, so cached statistics stay valid.
    meta = {
        "arch": model.arch(),
        "data": {k: data.get(k) for k in ("name", "image_size", "channels", "num_classes", "held_out_fraction",
                                          "split_seed")},
        "seed": seed,
        "epochs": epochs,
        "train_images": len(x_train),
        "held_out_images": len(x_held),
        "held_out_accuracy": classifier_accuracy(model, x_held, y_held),
        "torch": str(torch.__version__),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": f"harness train-digits-cnn --seed {seed} data.image_size={size}",
    }
    atomic_torch_save({"state_dict": model.state_dict(), "meta": meta}, out_path)
    os.chmod(out_path, 0o644)  # shipped package data: readable by everyone (temp files are created 0600)
    return {**meta, "train_seconds": round(train_s, 1)}


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): the only augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def classifier_accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        return float((model(images).argmax(1) == labels).float().mean())
    finally:
        model.train(was_training)


def load_digits_cnn(path: str | os.PathLike | None = None) -> tuple[DigitsCNN, dict]:
    """The digits CNN and its metadata from `path` (default: the shipped weights)."""
    path = Path(path) if path else DIGITS_WEIGHTS
    require(path.is_file(), f"digits CNN weights {path} not found (eval.digits_weights; retrain with "
                            "`harness train-digits-cnn --out PATH`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsCNN(**blob["meta"]["arch"])
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # noqa: BLE001 - whatever the file holds, it is not our weights: one line
        raise HarnessError(f"{path} is not a digits CNN weights file ({type(err).__name__}); "
                           "retrain one with `harness train-digits-cnn --out PATH`") from None
    return model.eval().requires_grad_(False), blob["meta"]


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of the digits CNN: uint8 Bx1xHxW (or gray Bx3xHxW) -> features.

    Provides the penultimate features ("penultimate") for FID and precision/recall, and the class
    logits ("logits") for the Inception-Score analogue. The weights come from
    `feature_extractor_weights_path` (default: the shipped file).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model, self.meta = load_digits_cnn(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return (DIGITS_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else DIGITS_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        size = self.model.image_size
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
            raise HarnessError(f"the digits CNN takes square uint8 Nx1xHxW images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 3:  # torch-fidelity reads image files as RGB; gray images have three equal channels
            x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
        if x.shape[2] != size:
            # Digits at another size see the CNN's resolution through the same bilinear resize the data
            # pipeline uses, as Inception resizes everything to 299: one extractor serves every digits size.
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        feats = self.model.features(x)
        out = {DIGITS_LAYER: feats, "logits": self.model.head(feats)}
        return tuple(out[name] for name in self.features_list)


if DIGITS_CNN not in FEATURE_EXTRACTORS_REGISTRY:  # re-imports (e.g. importlib.reload) must not re-register
    torch_fidelity.register_feature_extractor(DIGITS_CNN, DigitsFeatureExtractor)


# ----------------------------------------------------------------------------------------------------
# Feature extractor and reference statistics of a config
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extractor:
    """A resolved feature extractor: torch-fidelity name, weights file, layers and report name."""

    name: str
    weights: Path
    fid_name: str
    feature_layer: str  # FID and precision/recall
    feature_dims: int
    isc_layer: str
    channels: int  # what the extractor takes; 1-channel data is repeated to 3 for Inception

    @property
    def fingerprint(self) -> str:
        return _file_fingerprint(self.weights)

    def stats_file(self, cache_root: Path, input_name: str) -> Path:
        """Where torch-fidelity caches the FID statistics (mu, sigma) of the input it knows as `input_name`."""
        return cache_root / f"{input_name}-{self.name}-stat-fid-{self.feature_layer}.pt"


def resolve_extractor(eval_cfg: DictConfig, data_cfg: DictConfig) -> Extractor:
    """The feature extractor of `eval.feature_extractor`, its weights checked to exist (never downloaded)."""
    name = str(eval_cfg.feature_extractor)
    if name == "auto":
        name = DIGITS_CNN if data_cfg.name == "digits" else INCEPTION
    if name == DIGITS_CNN:
        weights = Path(eval_cfg.get("digits_weights") or DIGITS_WEIGHTS)
        _, meta = load_digits_cnn(weights)
        require(int(data_cfg.image_size) >= 4,
                f"eval.feature_extractor=digits-cnn needs data.image_size >= 4, got {data_cfg.image_size}")
        require(int(data_cfg.channels) == 1, f"eval.feature_extractor=digits-cnn takes 1-channel images, "
                                             f"got data.channels={data_cfg.channels}")
        return Extractor(DIGITS_CNN, weights, "fid_digits", DIGITS_LAYER, int(meta["arch"]["features"]), "logits", 1)
    if name == INCEPTION:
        return Extractor(INCEPTION, inception_weights(eval_cfg), "fid_inception", "2048", 2048, "logits_unbiased", 3)
    raise HarnessError(f"eval.feature_extractor={name!r} is not one of auto, {DIGITS_CNN}, {INCEPTION}")


def inception_weights(eval_cfg: DictConfig) -> Path:
    """The local inception-v3-compat weights: `eval.inception_weights`, else torch hub's cache; never a download."""
    if eval_cfg.get("inception_weights"):
        path = Path(str(eval_cfg.inception_weights)).expanduser()
        require(path.is_file(), f"eval.inception_weights={path} does not exist (torch-fidelity's {INCEPTION_FILE})")
        return _readable_weights(path, "eval.inception_weights")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    require(cached.is_file(),
            f"eval.inception_weights is not set and {cached} does not exist: fetch {INCEPTION_URL} where there is "
            f"a connection and set eval.inception_weights=/path/to/{INCEPTION_FILE}")
    return _readable_weights(cached, "eval.inception_weights")


_READABLE: set[tuple] = set()


def _readable_weights(path: Path, key: str) -> Path:
    """`path` holds a tensor state dict (read once per file version): a wrong file is reported before sampling,
    not by torch-fidelity after it."""
    version = _file_version(path)
    if version not in _READABLE:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            require(isinstance(state, dict) and state, "no state dict")
        except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
            raise HarnessError(f"{key}={path} is not a weights file ({type(err).__name__}); expected "
                               f"torch-fidelity's {INCEPTION_FILE}") from None
        _READABLE.add(version)
    return path


_FINGERPRINTS: dict[tuple, str] = {}


def _file_version(path: Path) -> tuple:
    """(path, size, mtime): what memoised facts about a file are keyed on."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _file_fingerprint(path: Path) -> str:
    """A short content hash of a weights file, memoised on its version."""
    key = _file_version(path)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = sha256_file(path)[:12]
    return _FINGERPRINTS[key]


def default_cache_dir() -> Path:
    """Where reference statistics are cached when `eval.cache_dir` is null (next to harness.flops' cache)."""
    return cache_root() / "fid"


def _cache_dir(eval_cfg: DictConfig, cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir or eval_cfg.get("cache_dir") or default_cache_dir()).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _data_key(data_cfg: DictConfig, split: str, extractor: Extractor, limit: int | None = None) -> str:
    """torch-fidelity's cache name of one split's images (at most `limit`) seen by one extractor's weights."""
    # Keys that change which images a split holds; loader settings and flips (applied in training) do not.
    data = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("num_workers", "hflip"):
        data.pop(key, None)
    if data.get("root"):
        data["root"] = str(Path(data["root"]).expanduser().resolve())
    digest = hashlib.sha1(repr((sorted(data.items()), limit)).encode()).hexdigest()[:10]
    return f"{slug(data_cfg.name)}{data_cfg.image_size}-{split}-{digest}-w{extractor.fingerprint}"


class UInt8Images(Dataset):
    """An in-memory uint8 NCHW tensor as the Dataset of CHW tensors torch-fidelity takes.

    `channels=3` repeats a gray channel for extractors that take RGB (Inception).
    """

    def __init__(self, images: torch.Tensor, channels: int | None = None):
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous()


def _real_images(data_cfg: DictConfig, split: str, limit: int | None = None) -> torch.Tensor:
    from harness.data import real_images_uint8

    return real_images_uint8(data_cfg, split, limit=limit)


def _has_held_out(data_cfg: DictConfig) -> bool:
    """Whether the data has a held_out split: a fraction held out (digits) or a second folder (imagefolder)."""
    return bool(data_cfg.get("held_out_fraction") or data_cfg.get("held_out_root"))


def _open_npz(path: Path, need_images: bool):
    """ADM's reference batch `.npz`: mu and sigma, and arr_0 (uint8 NHWC images) when IS/precision/recall need them."""
    require(path.is_file(), f"eval.reference={path} does not exist")
    try:
        npz = np.load(path)
    except (OSError, ValueError) as err:
        raise HarnessError(f"eval.reference={path} is not a readable .npz ({type(err).__name__})") from None
    require("mu" in npz.files and "sigma" in npz.files,
            f"eval.reference={path} holds {', '.join(npz.files) or 'nothing'}, not the statistics mu and sigma")
    require(not need_images or "arr_0" in npz.files,
            f"eval.isc/eval.prc with eval.reference={path} need its reference images (arr_0); it holds only statistics")
    return npz


def _npz_reference(path: Path, extractor: Extractor, cache_root: Path, need_images: bool) -> tuple[Dataset | None, str]:
    """Put ADM-style reference statistics (mu, sigma) into torch-fidelity's cache; return (its images, cache name).

    torch-fidelity 0.4.0 has no statistics-file input: it reads statistics from its cache by input name, as
    `{name}-{extractor}-stat-fid-{layer}.pt` holding {"mu", "sigma"}, and asserts that both inputs' mu
    and sigma have the same dtypes. It computes mu in the features' dtype (float32) and sigma with
    np.cov (float64), so the file's statistics are stored that way.
    """
    npz = _open_npz(path, need_images)
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    name = f"npz-{slug(path.stem)}-{digest}-w{extractor.fingerprint}"
    target = extractor.stats_file(cache_root, name)
    if not target.exists():
        mu, sigma = np.asarray(npz["mu"]), np.asarray(npz["sigma"])
        dims = extractor.feature_dims
        require(mu.shape == (dims,) and sigma.shape == (dims, dims),
                f"eval.reference={path}: mu {mu.shape} / sigma {sigma.shape} do not fit {extractor.name}'s "
                f"{dims}-dim features (layer {extractor.feature_layer})")
        atomic_torch_save({"mu": mu.astype(np.float32), "sigma": sigma.astype(np.float64)}, target)
    if not need_images:
        return None, name
    return UInt8Images(torch.from_numpy(np.asarray(npz["arr_0"])).permute(0, 3, 1, 2), extractor.channels), name


def _check_images(images: torch.Tensor, data_cfg: DictConfig, extractor: Extractor) -> None:
    require(torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4,
            f"FID takes uint8 NCHW images, got {getattr(images, 'dtype', type(images).__name__)} "
            f"{tuple(getattr(images, 'shape', ()))}")
    n, c, h, w = images.shape
    require(n >= 2, f"eval.num_samples must be >= 2 for FID (a covariance needs two samples), got {n}")
    require(n <= MAX_SAMPLES, f"eval.num_samples={n} is more than {extractor.name} handles here (at most {MAX_SAMPLES}: "
                              "every image and its features are held in memory)")
    size, channels = int(data_cfg.image_size), int(data_cfg.channels)
    require((c, h, w) == (channels, size, size),
            f"samples are {c}x{h}x{w} but the reference images (data.channels, data.image_size) are "
            f"{channels}x{size}x{size}")


def check_eval_config(eval_cfg: DictConfig, data_cfg: DictConfig, num_timesteps: int = 1000) -> Extractor:
    """Everything about `eval` that can fail, checked before minutes of sampling; returns the extractor."""
    from harness.config import check_eval_values

    check_eval_values(eval_cfg, num_timesteps)
    n = int(eval_cfg.num_samples)
    require(n <= MAX_SAMPLES, f"eval.num_samples={n} is more than the feature extractors handle here (at most {MAX_SAMPLES})")
    if eval_cfg.prc:
        require(n > 3, f"eval.prc needs eval.num_samples > 3 (the 3rd nearest neighbour), got {n}")
    extractor = resolve_extractor(eval_cfg, data_cfg)
    cache_dir = eval_cfg.get("cache_dir")
    check_output_path(Path(str(cache_dir)).expanduser() if cache_dir else default_cache_dir(),
                      "eval.cache_dir" if cache_dir else "eval.cache_dir (null: $HARNESS_CACHE_DIR/fid)", kind="dir")
    if eval_cfg.get("reference"):
        _open_npz(Path(str(eval_cfg.reference)).expanduser(), need_images=bool(eval_cfg.isc or eval_cfg.prc))
    return extractor


def _metrics(input1: Dataset, input2: Dataset, extractor: Extractor, eval_cfg: DictConfig, cache_root: Path,
             device: torch.device, input1_cache_name: str | None = None, input2_cache_name: str | None = None,
             isc: bool = False, prc: bool = False) -> dict:
    """One `torch_fidelity.calculate_metrics` call, in-process, quiet, with our extractor and cache."""
    return torch_fidelity.calculate_metrics(
        input1=input1, input2=input2, input1_cache_name=input1_cache_name, input2_cache_name=input2_cache_name,
        fid=True, isc=isc, prc=prc, feature_extractor=extractor.name, feature_layer_fid=extractor.feature_layer,
        feature_layer_isc=extractor.isc_layer, feature_layer_prc=extractor.feature_layer,
        feature_extractor_weights_path=str(extractor.weights), isc_splits=min(10, len(input1)),
        batch_size=int(eval_cfg.batch_size), cuda=device.type == "cuda", cache=True, cache_root=str(cache_root),
        # In-memory datasets: no DataLoader worker processes (and no full N x N distance matrix for prc).
        save_cpu_ram=True, verbose=False,
    )


def _reference(eval_cfg: DictConfig, data_cfg: DictConfig, extractor: Extractor, cache_root: Path,
               need_images: bool) -> tuple[Dataset | None, str]:
    """(reference images or None, torch-fidelity cache name) of the configured reference."""
    if eval_cfg.get("reference"):
        return _npz_reference(Path(str(eval_cfg.reference)).expanduser(), extractor, cache_root, need_images)
    limit = eval_cfg.get("reference_limit")
    limit = int(limit) if limit is not None else None
    require(limit is None or limit >= 2, f"eval.reference_limit must be >= 2 or null, got {limit}")
    name = _data_key(data_cfg, "train", extractor, limit)
    stats = extractor.stats_file(cache_root, name)
    if stats.exists() and not need_images:
        return None, name  # torch-fidelity reads the cached statistics and never touches the images
    return UInt8Images(_real_images(data_cfg, "train", limit), extractor.channels), name


class _CachedOnly(Dataset):
    """Stands for a reference whose statistics are already in torch-fidelity's cache."""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        raise HarnessError(f"reference statistics {self.name} vanished from the FID cache while in use")


def compute_fid(images_uint8: torch.Tensor, eval_cfg: DictConfig, data_cfg: DictConfig,
                cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None) -> dict:
    """FID of uint8 NCHW samples against the reference statistics, through `torch_fidelity.calculate_metrics`.

    Returns {"fid", "fid_name", "feature_extractor", "num_samples"} plus "isc" (eval.isc) and
    "precision"/"recall" (eval.prc), computed with the same extractor (for digits-cnn: its class logits
    and penultimate features).
    """
    extractor = check_eval_config(eval_cfg, data_cfg)
    _check_images(images_uint8, data_cfg, extractor)
    cache_root = _cache_dir(eval_cfg, cache_dir)
    isc, prc = bool(eval_cfg.isc), bool(eval_cfg.prc)
    # IS or precision/recall make torch-fidelity extract the reference's features, not only read statistics.
    reference, ref_name = _reference(eval_cfg, data_cfg, extractor, cache_root, need_images=isc or prc)
    metrics = _metrics(UInt8Images(images_uint8, extractor.channels), reference or _CachedOnly(ref_name), extractor,
                       eval_cfg, cache_root, resolve_device(device, "device"), input2_cache_name=ref_name, isc=isc, prc=prc)
    out = {"fid": float(metrics[FID_KEY]), "fid_name": extractor.fid_name, "feature_extractor": extractor.name,
           "num_samples": len(images_uint8)}
    if isc:
        out["isc"] = float(metrics[ISC_KEY])
    if prc:
        out["precision"], out["recall"] = float(metrics["precision"]), float(metrics["recall"])
    return out


def reference_floor(eval_cfg: DictConfig, data_cfg: DictConfig, cache_dir: str | os.PathLike | None = None,
                    device: str | torch.device | None = None) -> float | None:
    """FID of the held-out real images against the reference statistics: how close real data gets.

    Computed once per (extractor, data config): torch-fidelity caches both sides' statistics, so later
    calls only take the Frechet distance of two cached pairs. None for data without a held-out split.
    Note that it uses every held-out image (360 digits by default); FID is biased upwards at small N.
    """
    if not _has_held_out(data_cfg):
        return None
    extractor = resolve_extractor(eval_cfg, data_cfg)
    cache_root = _cache_dir(eval_cfg, cache_dir)
    reference, ref_name = _reference(eval_cfg, data_cfg, extractor, cache_root, need_images=False)
    held_name = _data_key(data_cfg, "held_out", extractor)
    held_stats = extractor.stats_file(cache_root, held_name)
    held = _CachedOnly(held_name) if held_stats.exists() else UInt8Images(_real_images(data_cfg, "held_out"),
                                                                          extractor.channels)
    metrics = _metrics(held, reference or _CachedOnly(ref_name), extractor, eval_cfg, cache_root, resolve_device(device, "device"),
                       input1_cache_name=held_name, input2_cache_name=ref_name)
    return float(metrics[FID_KEY])


# ----------------------------------------------------------------------------------------------------
# Sampling for evaluation
# ----------------------------------------------------------------------------------------------------


def eval_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Class labels of the evaluation samples, in sample-index order.

    balanced: exactly num_samples // num_classes of each class, the remainder given to classes picked by a
    seeded permutation, then shuffled; uniform: independent uniform draws (the released sampler's way).
    """
    require(mode in ("balanced", "uniform"), f"eval.labels={mode!r} is not one of balanced, uniform")
    from harness.data import seeded_generator

    gen = seeded_generator(int(seed), EVAL_STREAM, 1)
    if mode == "uniform":
        return torch.randint(num_classes, (num_samples,), generator=gen)
    counts = torch.full((num_classes,), num_samples // num_classes, dtype=torch.long)
    counts[torch.randperm(num_classes, generator=gen)[: num_samples % num_classes]] += 1
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels[torch.randperm(num_samples, generator=gen)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, as DiT's sample.py converts them (127.5 x + 128, clamped, truncated)."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


class SamplingStopped(Exception):
    """Sampling stopped between batches: the job is being preempted or stopped (see `generate_samples`)."""


@torch.no_grad()
def generate_samples(model: nn.Module, diffusion_cfg: DictConfig, autoencoder: nn.Module, eval_cfg: DictConfig,
                     geometry: Geometry, device: str | torch.device, rank: int = 0, world_size: int = 1,
                     stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """`eval.num_samples` uint8 NCHW images from `model` (pass the EMA model), in sample-index order.

    The samples are cut into global batches of `eval.batch_size`; batch b is sampled with its own seed
    (from `eval.seed` and b) by rank b % world_size, so the same checkpoint and config give the same
    images on any number of ranks. Under torch.distributed the batches are gathered round by round to
    rank 0, which returns all images (other ranks return None); without it, a rank returns its own
    batches. Guidance (`eval.cfg_scale`, `eval.cfg_channels`) and the sampler come from `eval`.
    """
    from harness.diffusion import create_diffusion

    import torch.distributed as dist

    device = torch.device(device)
    n, bs, seed = int(eval_cfg.num_samples), int(eval_cfg.batch_size), int(eval_cfg.seed)
    require(n >= 1 and bs >= 1, f"eval.num_samples and eval.batch_size must be positive, got {n} and {bs}")
    labels = eval_labels(n, geometry.num_classes, str(eval_cfg.labels), seed)
    diffusion = create_diffusion(diffusion_cfg)
    num_batches = math.ceil(n / bs)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    comm_device = device if distributed and dist.get_backend() == "nccl" else torch.device("cpu")
    shape = (geometry.in_channels, geometry.input_size, geometry.input_size)
    was_training = model.training
    model.eval()
    kept: list[torch.Tensor] = []
    image_shape = None
    try:
        for first in range(0, num_batches, world_size):
            if stop is not None and stop():  # every rank asks at each round, so all stop together
                raise SamplingStopped(f"sampling stopped after {first} of {num_batches} batches")
            b = first + rank
            images = _sample_batch(model, diffusion, autoencoder, eval_cfg, labels, b, bs, shape, seed, device) \
                if b < num_batches else None
            if not distributed:
                kept += [images] if images is not None else []
                continue
            if image_shape is None:  # rank 0 always holds batch 0; a rank without a batch learns the shape here
                holder = [tuple(images.shape[1:]) if rank == 0 else None]
                dist.broadcast_object_list(holder, src=0)
                image_shape = holder[0]
            # Every rank sends a full batch each round (zeros where it has fewer) and rank 0 keeps the real ones.
            padded = torch.zeros((bs, *image_shape), dtype=torch.uint8, device=comm_device)
            if images is not None:
                padded[: len(images)] = images.to(comm_device)
            gathered = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(gathered, padded)
            if rank == 0:
                for k, tensor in enumerate(gathered):
                    if first + k < num_batches:
                        kept.append(tensor[: min(bs, n - (first + k) * bs)].cpu())
    finally:
        model.train(was_training)
    if distributed and rank != 0:
        return None
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.uint8)


def _sample_batch(model, diffusion, autoencoder, eval_cfg, labels, b, bs, shape, seed, device) -> torch.Tensor:
    from harness.data import seeded_generator

    start, end = b * bs, min((b + 1) * bs, len(labels))
    # A CPU generator: diffusion draws the noise on the generator's device, so CPU and GPU runs get the same noise.
    gen = seeded_generator(seed, EVAL_STREAM, 2, b)
    latents = diffusion.sample(
        model, (end - start, *shape), labels[start:end].to(device), sampler=str(eval_cfg.sampler),
        cfg_scale=float(eval_cfg.cfg_scale), cfg_channels=eval_cfg.cfg_channels,
        eta=float(eval_cfg.get("ddim_eta", 0.0)), generator=gen, device=device,
    )
    return to_uint8(autoencoder.decode(latents)).cpu()


def save_npz(images: torch.Tensor, path: str | os.PathLike) -> None:
    """ADM's sample-batch format: arr_0 = uint8 NHWC."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images.permute(0, 2, 3, 1).numpy())
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(images: torch.Tensor, path: str | os.PathLike, max_images: int = 64) -> None:
    """A PNG grid of the first `max_images` samples (square-ish, 1-pixel gaps)."""
    from PIL import Image
    from torchvision.utils import make_grid

    shown = images[:max_images]
    grid = make_grid(shown, nrow=math.ceil(math.sqrt(len(shown))), padding=1, pad_value=0)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------
# Evaluating a run: in training, and from a checkpoint file
# ----------------------------------------------------------------------------------------------------

def evaluated_before(run_dir: str | os.PathLike, step: int, eval_cfg: DictConfig) -> bool:
    """Whether the run's results.jsonl already holds `step` evaluated as `eval_cfg` would (extractor, number of
    samples, sampler, guidance, seed): a run launched again after it finished, or resumed from before an
    evaluation it had done, need not spend the sampling time again (FID-50K of XL/2: hours)."""
    protocol = {"feature_extractor": str(eval_cfg.feature_extractor), "num_samples": int(eval_cfg.num_samples),
                "sampler": str(eval_cfg.sampler), "cfg_scale": float(eval_cfg.cfg_scale),
                "cfg_channels": eval_cfg.cfg_channels, "seed": int(eval_cfg.seed)}
    return any(row.get("step") == step and all(row.get(k) == v for k, v in protocol.items())
               for row in read_jsonl(Path(run_dir) / "results.jsonl"))


def results_row(cfg: DictConfig, step: int, run_dir: str | os.PathLike, fid: dict, params: int, gflops: float,
                eval_wall_s: float, fid_floor: float | None = None) -> dict:
    """One `results.jsonl` row: the run's config, its compute so far, and the evaluation's numbers."""
    from harness.config import latent_geometry
    from harness.flops import training_compute_flops

    m, ev, batch = cfg.model, cfg.eval, int(cfg.trainer.global_batch_size)
    row = {
        "run_id": run_id(cfg, run_dir), "run_dir": str(Path(run_dir).resolve()), "sweep": cfg.get("sweep_name"),
        "model": m.name, "size": m.size, "patch": int(m.patch_size), "conditioning": m.conditioning,
        "depth": int(m.depth), "hidden_size": int(m.hidden_size), "num_heads": int(m.num_heads),
        "tokens": latent_geometry(cfg).tokens(int(m.patch_size)), "params": int(params), "gflops": float(gflops),
        "step": int(step), "global_batch_size": batch, "images_seen": batch * int(step),
        "train_compute_flops": training_compute_flops(float(gflops), batch, int(step)),
        "fid": fid["fid"], "fid_name": fid["fid_name"], "feature_extractor": fid["feature_extractor"],
        "num_samples": fid["num_samples"], "sampler": str(ev.sampler), "cfg_scale": float(ev.cfg_scale),
        "cfg_channels": ev.cfg_channels, "seed": int(ev.seed), "dataset": cfg.data.name,
        "image_size": int(cfg.data.image_size), "eval_wall_s": round(eval_wall_s, 3), "timestamp": time.time(),
    }
    row.update({k: fid[k] for k in ("isc", "precision", "recall") if k in fid})
    if fid_floor is not None:
        row["fid_floor"] = fid_floor
    return row


def evaluate_model(model: nn.Module, cfg: DictConfig, step: int, run_dir: str | os.PathLike, dist=None,
                   flops: dict | None = None, params: int | None = None, cache_dir: str | os.PathLike | None = None,
                   log_fn: Callable[[dict], None] | None = None, forward: nn.Module | None = None,
                   stop: Callable[[], bool] | None = None) -> dict | None:
    """Evaluate the in-memory EMA `model` of a run at `step`: sample, FID, append the row to results.jsonl.

    Called by every rank of a job (`dist`: an object with rank, world_size, device, e.g. harness.train.Dist;
    None: one process on `trainer.device`). All ranks sample their share; rank 0 computes FID and the
    reference floor, saves the grid/.npz (`eval.save_grid`, `eval.save_npz`) under `samples/`, appends the
    row atomically, calls `log_fn(row)` (e.g. a wandb hook) and returns it; other ranks return None.
    `flops`/`params` avoid recounting (harness.flops.count_flops / harness.model.count_params); `forward`,
    `model`'s sampling forward (harness.train.inference_forward), is kept by a caller that evaluates repeatedly,
    so its compiled graph and learned call size carry over. `stop`, asked between sampling batches on every
    rank, ends the evaluation early with SamplingStopped (nothing written).
    """
    from harness.config import latent_geometry
    from harness.train.runtime import inference_forward

    start = time.perf_counter()
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    device = dist.device if dist is not None else resolve_device(cfg.trainer.get("device"), "trainer.device")
    check_eval_config(cfg.eval, cfg.data, int(cfg.diffusion.num_timesteps))  # fail before sampling, not after
    geometry = latent_geometry(cfg)
    images = generate_samples(forward or inference_forward(model, cfg, device), cfg.diffusion, run_autoencoder(cfg, device),
                              cfg.eval, geometry, device, rank=rank, world_size=world_size, stop=stop)
    if rank != 0:
        return None
    run_dir = Path(run_dir)
    if cfg.eval.save_grid:
        save_grid(images, run_dir / "samples" / f"step_{int(step):07d}.png")
    if cfg.eval.save_npz:
        save_npz(images, run_dir / "samples" / f"step_{int(step):07d}.npz")
    fid = compute_fid(images, cfg.eval, cfg.data, cache_dir=cache_dir, device=device)
    floor = reference_floor(cfg.eval, cfg.data, cache_dir=cache_dir, device=device)
    if flops is None:
        from harness.flops import count_flops

        flops = count_flops(cfg.model, geometry)
    if params is None:
        from harness.model import count_params

        params = count_params(model)
    row = results_row(cfg, step, run_dir, fid, params, flops["gflops"], time.perf_counter() - start, floor)
    append_jsonl(run_dir / "results.jsonl", row)
    if log_fn is not None:
        log_fn(row)
    return row


def checkpoint_config(ckpt: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, dict]:
    """The config to evaluate `ckpt` (a file, or a run dir: its newest checkpoint) with, and what the file says
    about itself ({"ours", "path", "step", "run_dir"}).

    Our checkpoints carry their config: overrides may change only what does not define the trained model
    (eval.*, logger, trainer.device, ...; harness.train.RUN_CONTROL_KEYS); anything else that differs is
    "a checkpoint from another config". A released DiT .pt is a bare state_dict: its config comes from the
    overrides (e.g. model=DiT-XL/2 experiment=imagenet256), checked by the strict weight loading.
    """
    from harness.config import compose, with_keys_added_later
    from harness.run_dir import RUN_CONTROL_KEYS, first_difference, run_identity

    path = Path(ckpt).expanduser()
    if path.is_dir():  # a run dir: its newest checkpoint
        from harness.run_dir import RunDir

        found = RunDir(path).checkpoints()
        require(bool(found), f"ckpt={path} is a directory without checkpoints/step_*.pt")
        path = found[-1]
    require(path.is_file(), f"ckpt={path}: no such file")
    try:
        # mmap: reading the config of a multi-GB checkpoint must not load its tensors.
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise HarnessError(f"ckpt={path} cannot be read ({type(err).__name__}); expected a checkpoint of "
                           "harness train or a released DiT .pt") from None
    requested = compose(overrides)
    if not (isinstance(blob, dict) and isinstance(blob.get("config"), str)):
        return requested, {"ours": False, "path": path, "step": None, "run_dir": None}
    stored = with_keys_added_later(OmegaConf.create(blob["config"]))
    merged = stored.copy()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        value = OmegaConf.select(requested, key, default=None)
        OmegaConf.update(merged, key, value, force_add=True, merge=False)
    difference = first_difference(run_identity(stored), run_identity(merged))
    require(not difference, f"ckpt={path} was trained with another config ({difference}); only "
                            f"{', '.join(RUN_CONTROL_KEYS)} may be overridden")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return merged, {"ours": True, "path": path, "step": int(blob.get("step", 0)), "run_dir": run_dir}


def evaluate_checkpoint(ckpt: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                        run_dir: str | os.PathLike | None = None, step: int | None = None,
                        cache_dir: str | os.PathLike | None = None) -> dict | None:
    """Evaluate a checkpoint (ours, a run dir's newest, or a released DiT .pt); append the row to `run_dir`/results.jsonl.

    `run_dir` defaults to the checkpoint's run dir (ours) or `runs/eval-<file name>` (released files);
    `step` to the checkpoint's step (released files: 0). Runs under torchrun as a distributed job too.
    """
    from harness.config import latent_geometry
    from harness.config.checks import validate
    from harness.model import build_model, load_weights
    from harness.train.runtime import setup_distributed
    from harness.tracking import Tracker

    cfg, info = checkpoint_config(ckpt, overrides)
    path = info["path"]
    validate(cfg)
    check_eval_config(cfg.eval, cfg.data, int(cfg.diffusion.num_timesteps))  # before loading weights that may take minutes to sample from
    step = int(step if step is not None else info["step"] or 0)
    run_dir = Path(run_dir or info["run_dir"] or Path("runs") / f"eval-{slug(path.stem)}")
    dist = setup_distributed(str(cfg.trainer.get("device", "auto")))
    model = build_model(cfg.model, latent_geometry(cfg), init_weights=False)
    load_weights(path, model, which="ema")
    model = model.to(dist.device).requires_grad_(False)
    tracker = Tracker(cfg, run_dir, enabled=dist.is_main)
    try:
        return evaluate_model(model, cfg, step, run_dir, dist=dist, cache_dir=cache_dir, log_fn=tracker.log_result)
    finally:
        tracker.finish()
