"""The digits CNN: the feature extractor of FID on digits, its training, and its registration with torch-fidelity.

A small classifier trained on the digits train split (`harness train-digits-cnn`, weights shipped in
`harness/assets/digits_cnn.pt`). Importing this module registers it with torch-fidelity as `digits-cnn`, so
the same `calculate_metrics` call that computes Inception FIDs computes the Frechet distance in its
penultimate features (`fid_digits`, not comparable with Inception FIDs) and an Inception-Score analogue
from its class logits.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from harness.config import compose
from harness.data import build_dataset, real_images_uint8
from harness.errors import HarnessError, require
from harness.io import atomic_torch_save

ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_CNN = "digits-cnn"
DIGITS_WEIGHTS = ASSETS / "digits_cnn.pt"
DIGITS_LAYER = "penultimate"


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


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of rows whose highest logit is their label, as an exact ratio of counts: 450 of 500 is 0.9, which a
    float32 mean would make 0.89999998 and fail an "at least 90%" check with."""
    return int((logits.argmax(1) == labels.to(logits.device)).sum()) / len(labels)


@torch.no_grad()
def classifier_accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        # A float32 mean, not `class_accuracy`: the shipped weights' metadata holds this value, and retraining on the
        # platform that made them must write the same bytes (test_retraining_reproduces_the_shipped_weights).
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
