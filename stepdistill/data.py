"""Datasets: the embedded Animal-MNIST default, sklearn digits, and users' image folders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor (C, H, W) in [-1, 1]
and ``label`` an int64 class index (0 for unlabelled folders).
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .utils import sha256_file

ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
# sha256 of the two gzip files of animal-mnist==0.4, checked before anything is unpickled.
ANIMAL_SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
DIGIT_CLASSES = [str(i) for i in range(10)]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


from .errors import DataError  # noqa: E402,F401  (re-exported)


def cache_dir() -> Path:
    d = Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _animal_mnist_dir() -> Path:
    try:
        import animal_mnist  # noqa: F401  (installed with --no-deps; we only read its data files)
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise DataError(
            "Animal-MNIST needs the 'animal-mnist' package: pip install --no-deps animal-mnist==0.4"
        ) from e
    return Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"


def load_animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 images and (10000,) int64 labels, cached as a plain .npz file.

    The package stores pickles; we check their pinned sha256 before unpickling, and keep a
    pickle-free ``.npz`` copy afterwards so later loads never touch pickle at all.
    """
    cached = cache_dir() / "animal_mnist_v3.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return z["images"], z["labels"]
    src = _animal_mnist_dir()
    # verify every file before unpickling any of them
    paths = []
    for name, want in ANIMAL_SHA256.items():
        path = src / name
        if not path.exists():
            raise DataError(f"Animal-MNIST file missing: {path}")
        got = sha256_file(path)
        if got != want:
            raise DataError(f"Animal-MNIST file {path} has sha256 {got}, expected {want}; refusing to unpickle it")
        paths.append(path)
    arrays = []
    for path in paths:
        with gzip.open(path, "rb") as f:
            arrays.append(pickle.load(f))
    images = np.asarray(arrays[0], dtype=np.uint8)
    labels = np.asarray(arrays[1], dtype=np.int64)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataError(f"unexpected Animal-MNIST shapes {images.shape}, {labels.shape}")
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cached)
    return images, labels


def _to_tensor_images(images: np.ndarray, resolution: int, pad: bool = True) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, res, res) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    h = x.shape[-1]
    if pad and resolution > h and (resolution - h) % 2 == 0:
        p = (resolution - h) // 2
        x = F.pad(x, (p, p, p, p))  # black border, keeps silhouettes pixel-exact
    elif x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


class ArrayDataset(TensorDataset):
    """Images in [-1, 1] plus labels and class names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        super().__init__(images, labels)
        self.images, self.labels, self.class_names = images, labels, class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def frames(self) -> int:
        """Frames per clip of a video dataset (samples (N, C, F, H, W)); 0 for images."""
        return self.images.shape[2] if self.images.ndim == 5 else 0


def animal_mnist(resolution: int = 32, split: str = "all") -> ArrayDataset:
    """Animal-MNIST silhouettes, padded 28 -> 32. ``split``: all | train (first 90% per class) | test | fit | val
    (``train`` = ``fit`` + ``val``; ``val`` holds 100 images per class, like ``test``)."""
    images, labels = load_animal_mnist_arrays()
    idx = _split_indices(labels, split)
    return ArrayDataset(_to_tensor_images(images[idx], resolution), torch.from_numpy(labels[idx]), ANIMAL_CLASSES)


def digits(resolution: int = 16, split: str = "all") -> ArrayDataset:
    """sklearn's 8x8 digits (1797 images), upsampled; for very fast tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)
    idx = _split_indices(labels, split)
    return ArrayDataset(_to_tensor_images(images[idx], resolution, pad=False), torch.from_numpy(labels[idx]), DIGIT_CLASSES)


#: the splits of the built-in datasets, per class in file order: ``train`` the first 90 %, ``test`` the rest;
#: ``train`` itself splits into ``fit`` (its first 8/9) and ``val`` (its last 1/9, as large as ``test``), so a
#: checkpoint or setting can be picked on ``val`` without ever looking at ``test``.
SPLITS = ("all", "train", "fit", "val", "test")


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` (:data:`SPLITS`): per class, ``fit`` + ``val`` = ``train``; ``val`` and ``test`` are
    disjoint, and so are ``train`` and ``test``."""
    if split == "all":
        return np.arange(len(labels))
    if split not in SPLITS:
        raise DataError(f"split must be {' | '.join(SPLITS)}, got {split!r}")
    out = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        cut = int(round(len(idx) * 0.9))
        n_val = len(idx) - cut
        train, test = idx[:cut], idx[cut:]
        part = {"train": train, "test": test, "fit": train[:cut - n_val], "val": train[cut - n_val:]}[split]
        out.append(part)
    return np.sort(np.concatenate(out))


def image_folder(root: str | Path, resolution: int = 32, channels: int = 1) -> ArrayDataset:
    """Images from ``root``; class sub-folders (``root/<class>/*.png``) give labels, else all label 0.

    Raises :class:`DataError` for a missing or empty folder, an unreadable image or an image
    whose channel count cannot be converted to ``channels`` (1 or 3).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(d.name, sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS)) for d in subdirs]
    groups = [(n, fs) for n, fs in groups if fs]
    if not groups:
        groups = [("images", sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTS))]
    if not any(fs for _, fs in groups):
        raise DataError(f"image folder {root} contains no images ({', '.join(sorted(IMAGE_EXTS))})")
    x = read_images([f for _, files in groups for f in files], resolution, channels)
    labels = [label for label, (_, files) in enumerate(groups) for _ in files]
    return ArrayDataset(x, torch.tensor(labels, dtype=torch.long), [n for n, _ in groups])


def read_images(paths: list[Path], resolution: int, channels: int) -> torch.Tensor:
    """Image files -> (N, channels, resolution, resolution) in [-1, 1] (bicubic resize). :class:`DataError`
    for an unreadable image, an unsupported mode, or a colour image when ``channels=1``."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    images = []
    for f in paths:
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode not in ("L", "RGB", "RGBA", "P", "1", "LA", "I", "I;16"):
                    raise DataError(f"{f}: unsupported image mode {im.mode}")
                if channels == 1 and im.mode in ("RGB", "RGBA") and not _is_gray(im):
                    raise DataError(f"{f}: colour image but channels=1 was requested")
                images.append(np.asarray(im.convert(mode).resize((resolution, resolution), Image.BICUBIC)))
        except Image.DecompressionBombError as e:  # a tiny file that decodes to gigapixels
            raise DataError(f"{f}: refused, the image is too large to decode safely ({e}); remove it from the "
                            f"folder") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: unreadable image ({e})") from e
    return _to_tensor_images(np.stack(images), resolution, pad=False)


def _is_gray(im) -> bool:
    a = np.asarray(im.convert("RGB")).astype(np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() <= 2 and np.abs(a[..., 1] - a[..., 2]).max() <= 2)


def moving_clips(resolution: int = 16, split: str = "all", frames: int = 8) -> ArrayDataset:
    """Moving Animal-MNIST (:mod:`stepdistill.video_data`): one clip (1, F, H, W) per source silhouette of ``split``
    (so the splits stay disjoint), labelled with the silhouette's class."""
    from .video_data import moving_animal_mnist

    source = animal_mnist(32, split)
    v = moving_animal_mnist(len(source), frames, resolution, split, seed=0, source=source)
    return ArrayDataset(v.clips, v.labels, v.class_names)


def load_dataset(name: str, resolution: int, split: str = "all", channels: int = 1, frames: int = 8) -> ArrayDataset:
    """``animal_mnist`` | ``digits`` | ``moving_animal_mnist`` (clips of ``frames`` frames) | an image folder."""
    if name in ("animal_mnist", "digits", "moving_animal_mnist") and channels != 1:
        raise DataError(f"data.channels={channels}: {name} is grayscale (1 channel); set data.channels=1 or use an "
                        f"image folder with colour images")
    if name == "animal_mnist":
        return animal_mnist(resolution, split)
    if name == "digits":
        return digits(resolution, split)
    if name == "moving_animal_mnist":
        if frames < 2:
            raise DataError(f"data.frames={frames}: a clip needs at least 2 frames")
        return moving_clips(resolution, split, frames)
    if os.path.sep in name or Path(name).exists():
        return image_folder(name, resolution, channels)
    raise DataError(f"unknown dataset {name!r}: use animal_mnist, digits, moving_animal_mnist or a path to an image "
                    f"folder")
