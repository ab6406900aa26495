"""FID of samples: the feature extractor of a config, reference statistics and their cache, torch-fidelity's metrics.

The protocol follows the paper (EMA weights, `eval.num_samples` samples, FID against reference statistics
of the training set), with the feature extractor chosen by `eval.feature_extractor`:

- `inception-v3-compat` (ImageNet): torch-fidelity's Inception, weights from a local file
  (`eval.inception_weights`, never downloaded here); reference statistics from ADM's reference batch
  `.npz` (`eval.reference`: mu, sigma) or computed once from the training images. Reported as
  `fid_inception`.
- `digits-cnn` (the embedded digits default): the small CNN of `harness.digits_cnn`, registered with
  torch-fidelity, so the same `calculate_metrics` call computes the Frechet distance in its penultimate
  features. Reported as `fid_digits`: it is not comparable with Inception FIDs.

Everything is computed in-process by torch-fidelity. Reference statistics live in its own cache
(`eval.cache_dir`), named by the data config and a fingerprint of the extractor's weights, so they are
computed once per (extractor, data config) and a retrained extractor never meets stale statistics.

The samples' features are extracted once, and serve three numbers: the FID, its bootstrap standard error over the
samples (`fid_bootstrap`: the uncertainty of one FID where a config has one replica), and, where the extractor is a
classifier of the dataset's classes (the digits CNN on digits), the share of samples it assigns to the class they
were conditioned on (`class_accuracy`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from omegaconf import DictConfig, OmegaConf
from scipy import stats
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_input_id_to_statistics_cached, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id,
                                  extract_featuresdict_from_input_id_cached)

from harness.config import resolve_device, slug
from harness.data import real_images_uint8
# Importing harness.digits_cnn also registers DIGITS_CNN with torch-fidelity, which `_metrics` names.
from harness.digits_cnn import DIGITS_CNN, DIGITS_LAYER, DIGITS_WEIGHTS, class_accuracy, load_digits_cnn
from harness.errors import HarnessError, require
from harness.io import atomic_torch_save, cache_root, check_output_path, sha256_file
from harness.progress import Say, quiet

INCEPTION = "inception-v3-compat"
# The file torch-fidelity 0.4.0 downloads for inception-v3-compat (we never download it ourselves).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# Every sample's image and features are held in memory on rank 0; the field uses 50K.
MAX_SAMPLES = 100_000
# torch-fidelity's result keys.
FID_KEY, ISC_KEY = "frechet_inception_distance", "inception_score_mean"
# The bootstrap of one FID over its samples (fid_bootstrap): resamples, seed and level of the interval. Each resample
# is a covariance and an eigensolve in the feature dims: ~10 ms at the digits CNN's 128, seconds at Inception's 2048,
# where fewer resamples keep it cheap next to sampling (the standard error needs far fewer than an interval's tails).
# These are eval.fid_resamples=auto's counts.
FID_BOOTSTRAP_RESAMPLES = 200
FID_BOOTSTRAP_RESAMPLES_LARGE = 50  # feature dims above SMALL_FEATURES
SMALL_FEATURES = 512
FID_BOOTSTRAP_SEED = 0
FID_INTERVAL_LEVEL = 0.95


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


def check_eval_config(eval_cfg: DictConfig, data_cfg: DictConfig) -> Extractor:
    """What about `eval` can fail beyond its values (`harness.config.checks.validate` checks those): the sample count
    the extractor handles, the extractor's weights, the cache dir and a reference file, checked before minutes of
    sampling; returns the extractor."""
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


def _fidelity_kwargs(input1: Dataset, input2: Dataset, extractor: Extractor, eval_cfg: DictConfig, cache_root: Path,
                     device: torch.device, input1_cache_name: str | None = None, input2_cache_name: str | None = None,
                     isc: bool = False, prc: bool = False) -> dict:
    """The keyword arguments of torch-fidelity's metric functions: in-process, quiet, our extractor and cache."""
    return dict(
        input1=input1, input2=input2, input1_cache_name=input1_cache_name, input2_cache_name=input2_cache_name,
        fid=True, isc=isc, prc=prc, feature_extractor=extractor.name, feature_layer_fid=extractor.feature_layer,
        feature_layer_isc=extractor.isc_layer, feature_layer_prc=extractor.feature_layer,
        feature_extractor_weights_path=str(extractor.weights), isc_splits=min(10, len(input1)),
        batch_size=int(eval_cfg.batch_size), cuda=device.type == "cuda", cache=True, cache_root=str(cache_root),
        # In-memory datasets: no DataLoader worker processes (and no full N x N distance matrix for prc).
        save_cpu_ram=True, verbose=False,
    )


def _metrics(input1: Dataset, input2: Dataset, extractor: Extractor, eval_cfg: DictConfig, cache_root: Path,
             device: torch.device, input1_cache_name: str | None = None, input2_cache_name: str | None = None) -> dict:
    """One `torch_fidelity.calculate_metrics` call (FID only), in-process, quiet, with our extractor and cache."""
    return torch_fidelity.calculate_metrics(**_fidelity_kwargs(input1, input2, extractor, eval_cfg, cache_root, device,
                                                               input1_cache_name, input2_cache_name))


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
    return UInt8Images(real_images_uint8(data_cfg, "train", limit=limit), extractor.channels), name


class _CachedOnly(Dataset):
    """Stands for a reference whose statistics are already in torch-fidelity's cache."""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        raise HarnessError(f"reference statistics {self.name} vanished from the FID cache while in use")


def classifies(extractor: Extractor, data_cfg: DictConfig) -> bool:
    """Whether the extractor is a classifier of the dataset's classes, so that `class_accuracy` means something: the
    digits CNN on digits (Inception's ImageNet logits are not the classes of an arbitrary dataset)."""
    if extractor.name != DIGITS_CNN or data_cfg.name != "digits":
        return False
    _, meta = load_digits_cnn(extractor.weights)
    return int(meta["arch"]["num_classes"]) == int(data_cfg.num_classes)


class FidToReference:
    """FID of sample features against fixed reference statistics, with the reference's matrix square root computed
    once: tr sqrt(S1 S2) = tr sqrt(R S1 R) with R = S2^(1/2) symmetric, so each call is one symmetric eigensolve
    (the bootstrap calls it hundreds of times; torch-fidelity's general eigvals of S1 S2 is ~4x slower). Equal to
    torch-fidelity's value to float rounding (tests/test_evaluate.py)."""

    def __init__(self, reference: dict):
        self.mu = np.asarray(reference["mu"], dtype=np.float64)
        sigma = np.asarray(reference["sigma"], dtype=np.float64)
        w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, features: np.ndarray) -> float:
        features = np.asarray(features, dtype=np.float64)
        diff = features.mean(0) - self.mu
        sigma = np.cov(features, rowvar=False)
        eig = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid_bootstrap(features, reference: dict, fid: float, n_resamples: int = FID_BOOTSTRAP_RESAMPLES,
                  seed: int = FID_BOOTSTRAP_SEED, level: float = FID_INTERVAL_LEVEL) -> dict:
    """The uncertainty of one FID from its samples: {"fid_se", "fid_lo", "fid_hi", "fid_ci_level"}.

    The sample features are resampled with replacement (`scipy.stats.bootstrap`, `n_resamples`, seeded) and the FID
    recomputed against the fixed reference statistics; `fid_se` is the bootstrap standard error, and the interval is
    fid +- z * se (the normal bootstrap interval, clipped at 0). Not the percentile or BCa interval: a resample repeats
    about a third of the samples, which adds FID's small-sample bias once more (digits CNN: the 360 held-out real
    digits have FID 5.5 and resampled FIDs 9.8 to 18.7, none below 5.5; 500 noised digits FID 46.0, resampled mean
    50.7), so the percentile interval can miss the FID itself and BCa is undefined when no resample falls below it.
    The standard error is what carries over; it is conservative (2.5x the spread of FIDs of fresh sample sets of the
    same size, in a Gaussian check with 128 dims).
    """
    features = np.asarray(features, dtype=np.float64)
    against = FidToReference(reference)
    # Small matrices gain nothing from BLAS threads and lose much to their spinning on a busy machine (128 dims on
    # two shared cores: 25x slower with two threads than with one); large ones keep them.
    with threadpool_limits(1 if features.shape[1] <= SMALL_FEATURES else None, user_api="blas"):
        res = stats.bootstrap((np.arange(len(features)),), lambda idx: against(features[idx]), n_resamples=n_resamples,
                              method="percentile", vectorized=False, rng=np.random.default_rng(seed))
    se = float(res.standard_error)
    half = float(stats.norm.ppf((1 + level) / 2)) * se
    return {"fid_se": se, "fid_lo": max(fid - half, 0.0), "fid_hi": fid + half, "fid_ci_level": level}


def compute_fid(images_uint8: torch.Tensor, eval_cfg: DictConfig, data_cfg: DictConfig,
                cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                say: Say = quiet, labels: torch.Tensor | None = None) -> dict:
    """FID of uint8 NCHW samples against the reference statistics, with torch-fidelity's feature extraction and metrics.

    Returns {"fid", "fid_name", "feature_extractor", "num_samples"} plus "isc" (eval.isc) and
    "precision"/"recall" (eval.prc), computed with the same extractor (for digits-cnn: its class logits
    and penultimate features); unless `eval.fid_resamples` is 0, the FID's bootstrap interval over the samples
    (`fid_bootstrap`: fid_se, fid_lo, fid_hi, fid_ci_level); with `labels` (the class each sample was conditioned
    on) and an extractor that classifies the dataset's classes (`classifies`), "class_accuracy": the share of samples
    it assigns to their label, from the logits of the same forward pass. `say` gets a line saying what is compared when the work starts.
    """
    extractor = check_eval_config(eval_cfg, data_cfg)
    _check_images(images_uint8, data_cfg, extractor)
    require(labels is None or len(labels) == len(images_uint8),
            f"compute_fid: {len(images_uint8)} samples but {len(labels) if labels is not None else 0} labels")
    cache_root = _cache_dir(eval_cfg, cache_dir)
    isc, prc = bool(eval_cfg.isc), bool(eval_cfg.prc)
    accuracy = labels is not None and classifies(extractor, data_cfg)
    # Precision/recall compare with the reference's features, not only its statistics.
    reference, ref_name = _reference(eval_cfg, data_cfg, extractor, cache_root, need_images=prc)
    source = f"eval.reference={eval_cfg.reference}" if eval_cfg.get("reference") else "the training set"
    against = f"{len(reference)} images of {source}" if reference is not None else f"the statistics of {source}"
    say(f"computing FID of {len(images_uint8)} samples against {against} ({extractor.name} features) ...")
    kwargs = _fidelity_kwargs(UInt8Images(images_uint8, extractor.channels), reference or _CachedOnly(ref_name),
                              extractor, eval_cfg, cache_root, resolve_device(device, "device"),
                              input2_cache_name=ref_name, isc=isc, prc=prc)
    # One forward over the samples gives every layer asked for: the FID features, and the logits for IS and
    # class accuracy; torch-fidelity's own steps (as calculate_metrics takes them) turn them into the metrics.
    layers = sorted({extractor.feature_layer} | ({extractor.isc_layer} if isc or accuracy else set()))
    feature_extractor = create_feature_extractor(extractor.name, layers, **kwargs)
    features = extract_featuresdict_from_input_id(1, feature_extractor, **kwargs)
    ref_stats = fid_input_id_to_statistics_cached(2, feature_extractor, extractor.feature_layer, **kwargs)
    fid = float(fid_statistics_to_metric(fid_features_to_statistics(features[extractor.feature_layer]), ref_stats,
                                         False)[FID_KEY])
    out = {"fid": fid, "fid_name": extractor.fid_name, "feature_extractor": extractor.name,
           "num_samples": len(images_uint8)}
    resamples = eval_cfg.get("fid_resamples", "auto")
    if resamples == "auto":
        resamples = FID_BOOTSTRAP_RESAMPLES if extractor.feature_dims <= SMALL_FEATURES else FID_BOOTSTRAP_RESAMPLES_LARGE
    if resamples:
        out.update(fid_bootstrap(features[extractor.feature_layer].numpy(), ref_stats, fid, n_resamples=resamples))
    if accuracy:
        out["class_accuracy"] = class_accuracy(features[extractor.isc_layer], labels)
    if isc:
        out["isc"] = float(isc_featuresdict_to_metric(features, extractor.isc_layer, **kwargs)[ISC_KEY])
    if prc:
        ref_features = extract_featuresdict_from_input_id_cached(2, feature_extractor, **kwargs)
        metrics = prc_featuresdict_to_metric(features, ref_features, extractor.feature_layer, **kwargs)
        out["precision"], out["recall"] = float(metrics["precision"]), float(metrics["recall"])
    return out


def reference_floor(eval_cfg: DictConfig, data_cfg: DictConfig, cache_dir: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, say: Say = quiet) -> float | None:
    """FID of the held-out real images against the reference statistics: how close real data gets.

    Computed once per (extractor, data config): torch-fidelity caches both sides' statistics, so later
    calls only take the Frechet distance of two cached pairs. None for data without a held-out split.
    Note that it uses every held-out image (360 digits by default); FID is biased upwards at small N.
    `say` gets a line when features are extracted (the first time only).
    """
    if not _has_held_out(data_cfg):
        return None
    extractor = resolve_extractor(eval_cfg, data_cfg)
    cache_root = _cache_dir(eval_cfg, cache_dir)
    reference, ref_name = _reference(eval_cfg, data_cfg, extractor, cache_root, need_images=False)
    held_name = _data_key(data_cfg, "held_out", extractor)
    held_stats = extractor.stats_file(cache_root, held_name)
    held = (_CachedOnly(held_name) if held_stats.exists()
            else UInt8Images(real_images_uint8(data_cfg, "held_out"), extractor.channels))
    if reference is not None or not isinstance(held, _CachedOnly):
        say(f"computing the reference floor: FID of the held-out images against the reference "
            f"({extractor.name} features, once per data config) ...")
    metrics = _metrics(held, reference or _CachedOnly(ref_name), extractor, eval_cfg, cache_root, resolve_device(device, "device"),
                       input1_cache_name=held_name, input2_cache_name=ref_name)
    return float(metrics[FID_KEY])
