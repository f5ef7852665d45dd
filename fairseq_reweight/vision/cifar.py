"""CIFAR-10/100 from the official python-pickle archives: train/valid split, label noise, batches.

The archives are read as published at https://www.cs.toronto.edu/~kriz/cifar.html, either still
packed (``cifar-10-python.tar.gz``) or unpacked (``cifar-10-batches-py/``). Images stay ``uint8``
in memory (N x 3 x 32 x 32) and are normalised one minibatch at a time.

Label noise follows Meta-Weight-Net (Shu et al., NeurIPS 2019), whose transition matrices come
from Hendrycks et al.'s GLC code: ``uniform`` replaces a label, with probability ``rate``, by a
class drawn uniformly from *all* classes (so a fraction ``rate * (C - 1) / C`` of labels actually
changes); ``flip`` moves each class, with probability ``rate``, to one other class drawn once per
class; ``flip2`` splits ``rate`` evenly between two other classes (Meta-Weight-Net's scripts).
Only the training split is noised; the validation split keeps its clean labels.
"""
import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

NOISE_KINDS = ("none", "uniform", "flip", "flip2")

# name -> (archive, folder inside it, training members, test member, label key, classes, url, md5)
ARCHIVES = {
    "cifar10": (
        "cifar-10-python.tar.gz", "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels", 100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


@dataclass
class ImageSplits:
    """Train (noisy), valid (clean) and test images as uint8 N x C x H x W, labels as int64.

    ``train_clean_labels`` are the labels before noise: ``train_labels != train_clean_labels``
    marks the corrupted examples (used only to report the teacher's AUC). Pixels are mapped to
    ``(x * scale - mean) / std`` per channel by :meth:`normalize`.
    """

    train_images: Tensor
    train_labels: Tensor
    train_clean_labels: Tensor
    valid_images: Tensor
    valid_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    scale: float
    mean: Tensor  # C
    std: Tensor  # C

    def to(self, device) -> "ImageSplits":
        """Moves every tensor to ``device``."""
        fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return ImageSplits(**fields)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or raw-valued) N x C x H x W -> normalised float32."""
        x = images.float() * self.scale
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar(data_dir: str, dataset: str) -> str:
    """Downloads the official archive of ``dataset`` into ``data_dir``; returns its path."""
    archive, _, _, _, _, _, url, md5 = ARCHIVES[dataset]
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, archive)
    logger.info("downloading %s to %s", url, path)
    urllib.request.urlretrieve(url, path + ".part")
    if _md5(path + ".part") != md5:
        os.remove(path + ".part")
        raise ValueError(f"download of {url} has the wrong md5 (expected {md5}); try again")
    os.replace(path + ".part", path)
    return path


def _read_members(data_dir: str, dataset: str, download: bool) -> Dict[str, dict]:
    """Unpickled members of the archive (or of the unpacked folder), keyed by member name."""
    archive, folder, train_names, test_name, _, _, _, _ = ARCHIVES[dataset]
    names = train_names + [test_name]
    unpacked = os.path.join(data_dir, folder)
    if os.path.isdir(unpacked):
        out = {}
        for name in names:
            with open(os.path.join(unpacked, name), "rb") as f:
                out[name] = pickle.load(f, encoding="bytes")
        return out
    packed = os.path.join(data_dir, archive)
    if not os.path.isfile(packed):
        if not download:
            raise FileNotFoundError(
                f"{dataset}: found neither {packed} nor {unpacked}/ "
                f"({', '.join(names)}); pass --download to fetch {archive}, or point --data at it"
            )
        packed = download_cifar(data_dir, dataset)
    out = {}
    with tarfile.open(packed, "r:gz") as tar:
        for name in names:
            member = tar.extractfile(f"{folder}/{name}")
            if member is None:
                raise FileNotFoundError(
                    f"{packed} has no member {folder}/{name}: not a {dataset} archive")
            out[name] = pickle.load(io.BytesIO(member.read()), encoding="bytes")
    return out


def load_cifar_arrays(
    data_dir: str, dataset: str, download: bool = False
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Reads ``dataset`` ("cifar10" or "cifar100") from ``data_dir``.

    Returns:
        train images (N x 3 x 32 x 32 uint8), train labels (int64), test images, test labels,
        number of classes.
    """
    if dataset not in ARCHIVES:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {sorted(ARCHIVES)}")
    _, _, train_names, test_name, label_key, num_classes, _, _ = ARCHIVES[dataset]
    members = _read_members(data_dir, dataset, download)

    def arrays(batches: List[dict]):
        images = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return images.reshape(-1, 3, 32, 32), labels

    train_x, train_y = arrays([members[n] for n in train_names])
    test_x, test_y = arrays([members[test_name]])
    return train_x, train_y, test_x, test_y, num_classes


def noise_transition_matrix(kind: str, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Row-stochastic C x C matrix: entry (i, j) is P(noisy label j | true label i)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise {kind!r}: choose one of {NOISE_KINDS}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if kind == "none" or rate == 0.0:
        return np.eye(num_classes)
    if kind == "uniform":
        return rate / num_classes + (1.0 - rate) * np.eye(num_classes)
    targets = 1 if kind == "flip" else 2
    if num_classes <= targets:
        raise ValueError(f"{kind} noise needs more than {targets} classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    matrix = (1.0 - rate) * np.eye(num_classes)
    for i in range(num_classes):
        others = np.delete(np.arange(num_classes), i)
        matrix[i, rng.choice(others, size=targets, replace=False)] = rate / targets
    return matrix


def corrupt_labels(labels: np.ndarray, kind: str, rate: float, num_classes: int,
                   seed: int) -> np.ndarray:
    """Draws a noisy label for each example from its row of the transition matrix (seeded)."""
    matrix = noise_transition_matrix(kind, rate, num_classes, seed)
    rng = np.random.default_rng([seed, 1])
    cumulative = np.cumsum(matrix, axis=1)[labels]  # N x C
    draws = rng.random(len(labels))[:, None]
    noisy = (draws >= cumulative).sum(axis=1)
    return np.minimum(noisy, num_classes - 1).astype(np.int64)


def make_splits(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    valid_size: int,
    noise: str,
    noise_rate: float,
    seed: int,
    scale: float,
) -> ImageSplits:
    """Splits off a clean validation set at random (seeded), noises the rest, sets normalisation."""
    if not 0 < valid_size < len(train_y):
        raise ValueError(f"valid size must be in (0, {len(train_y)}), got {valid_size}")
    order = np.random.default_rng([seed, 0]).permutation(len(train_y))
    valid_idx, train_idx = order[:valid_size], order[valid_size:]
    clean = train_y[train_idx]
    noisy = corrupt_labels(clean, noise, noise_rate, num_classes, seed)
    images = torch.from_numpy(np.ascontiguousarray(train_x[train_idx]))
    pixels = images.float().mul_(scale).transpose(0, 1).reshape(images.shape[1], -1)  # C x (N H W)
    return ImageSplits(
        train_images=images,
        train_labels=torch.from_numpy(noisy),
        train_clean_labels=torch.from_numpy(clean),
        valid_images=torch.from_numpy(np.ascontiguousarray(train_x[valid_idx])),
        valid_labels=torch.from_numpy(train_y[valid_idx]),
        test_images=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_labels=torch.from_numpy(test_y),
        num_classes=num_classes,
        scale=scale,
        mean=pixels.mean(dim=1),
        std=pixels.std(dim=1).clamp_min(1e-6),
    )


def load_cifar(
    data_dir: str,
    dataset: str,
    noise: str = "none",
    noise_rate: float = 0.0,
    valid_size: int = 5000,
    seed: int = 1,
    download: bool = False,
) -> ImageSplits:
    """CIFAR-10/100 as :class:`ImageSplits`: 45k noisy train, 5k clean valid, 10k test by default.

    Raises:
        FileNotFoundError: ``data_dir`` has neither the archive nor its unpacked folder (and
            ``download`` is off); the message names the files expected.
    """
    train_x, train_y, test_x, test_y, num_classes = load_cifar_arrays(data_dir, dataset, download)
    return make_splits(
        train_x, train_y, test_x, test_y, num_classes, valid_size, noise, noise_rate, seed, 1 / 255
    )


def random_crop_flip(images: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad, random crop back, random horizontal flip.

    All randomness comes from ``generator`` (CPU), so a batch is reproducible from its seed.
    """
    n, c, h, w = images.shape
    dev = images.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(dev)  # 2 x N
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (offsets[0, :, None] + torch.arange(h, device=dev))[:, None, :, None]  # N x 1 x H x 1
    cols = (offsets[1, :, None] + torch.arange(w, device=dev))[:, None, None, :]  # N x 1 x 1 x W
    batch = torch.arange(n, device=dev)[:, None, None, None]
    channel = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)

