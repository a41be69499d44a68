"""PSO's data (Miao et al. 2024): the target set (a dataset or image folder, mapped to the model's classes, a
class subset, a transform) and preference pairs (chosen / rejected images). The loss and the objectives are in
:mod:`stepdistill.trainers.pso`."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..conditioning import class_index
from ..config import DistillConfig
from ..data import IMAGE_EXTS, ArrayDataset, load_dataset, read_images
from ..errors import DataError
from ..models import ModelMeta


def resolve_classes(spec: list[str], class_names: list[str], key: str = "pso.target_classes") -> list[int]:
    """Class names (or integer indices) -> indices into the model's ``class_names``."""
    out = []
    for s in spec:
        try:
            out.append(class_index(str(s), class_names))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return sorted(set(out))


def select_classes(images: torch.Tensor, labels: torch.Tensor, spec: list, class_names: list[str], key: str,
                   where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (and labels) of the classes ``spec`` names (names or indices into ``class_names``); ValueError
    naming ``key`` for an unknown class or when none of ``where``'s images is of these classes."""
    keep = torch.isin(labels, torch.tensor(resolve_classes(list(spec), class_names, key)))
    if not keep.any():
        raise ValueError(f"{key} {list(spec)}: no images of these classes in {where}")
    return images[keep], labels[keep]


def _labels_to_model(data: ArrayDataset, class_names: list[str], source: str) -> torch.Tensor:
    """Dataset labels -> the model's class indices, matched by class name."""
    missing = [n for n in data.class_names if n not in class_names]
    if missing:
        raise ValueError(f"target {source}: class {missing[0]!r} is not one of the model's classes "
                         f"({', '.join(class_names)}); name the image folder's class sub-folders after them")
    lut = torch.tensor([class_names.index(n) for n in data.class_names], dtype=torch.long)
    return lut[data.labels]


def build_target(cfg: DistillConfig, meta: ModelMeta, data: ArrayDataset | None = None) -> ArrayDataset:
    """The target set: dataset (``pso.target`` or ``data.name``) -> model labels -> class subset -> transform.

    Returns an ArrayDataset whose labels are the *model's* class indices (0 for unconditional models)."""
    p = cfg.pso
    source = p.target or cfg.data.name
    if data is None:
        data = load_dataset(source, cfg.data.resolution, cfg.data.split, cfg.data.channels)
    cond = meta.conditioning == "class"
    names = list(meta.class_names) if cond else ["all"]
    labels = _labels_to_model(data, names, source) if cond else torch.zeros(len(data), dtype=torch.long)
    images = data.images
    if p.target_classes:
        if not cond:
            raise ValueError("pso.target_classes needs a class-conditional model")
        images, labels = select_classes(images, labels, p.target_classes, names, "pso.target_classes", source)
    images = apply_transform(images, p.target_transform)
    return ArrayDataset(images, labels, names)


TRANSFORMS = ("none", "invert", "bold")


def apply_transform(images: torch.Tensor, name: str) -> torch.Tensor:
    """``none`` | ``invert`` (x -> -x in [-1, 1]: white silhouettes on black become black on white) |
    ``bold`` (grey-scale dilation by a 3x3 max filter: silhouettes one pixel thicker on every side)."""
    if name == "none":
        return images
    if name == "invert":
        return -images
    if name == "bold":
        return F.max_pool2d(images.float(), 3, stride=1, padding=1).to(images.dtype)
    raise ValueError(f"pso.target_transform: unknown transform {name!r} ({' | '.join(TRANSFORMS)})")


def load_preference_pairs(path: str | Path, resolution: int, channels: int, class_names: list[str]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preference pairs -> (chosen (N, C, H, W), rejected (N, C, H, W), labels (N,)), images in [-1, 1].

    Two layouts:

    * a ``.safetensors`` file with ``chosen`` and ``rejected`` (N, C, H, W) float tensors in [-1, 1]
      and, for class-conditional models, ``labels`` (N,) int64 indices into the model's classes;
    * a folder ``root/chosen/`` + ``root/rejected/`` holding the same relative file names (the pair
      is matched by name); files in class sub-folders (``root/chosen/<class>/<id>.png``) get that
      class (a model class name or index), files directly in ``chosen/`` label 0 (unconditional).
    """
    path = Path(path)
    cond = bool(class_names)
    if path.is_file():
        d = load_file(str(path))
        for k in ("chosen", "rejected"):
            if k not in d:
                raise DataError(f"{path}: preference pairs need a {k!r} tensor (N, C, H, W)")
        ch, rj = d["chosen"].float(), d["rejected"].float()
        if ch.shape != rj.shape or ch.ndim != 4:
            raise DataError(f"{path}: chosen {tuple(ch.shape)} and rejected {tuple(rj.shape)} must both be "
                            "(N, C, H, W) of one shape")
        if "labels" in d:
            labels = d["labels"].long()
        elif cond:
            raise DataError(f"{path}: a class-conditional model needs 'labels' (N,) with the pairs")
        else:
            labels = torch.zeros(ch.shape[0], dtype=torch.long)
        if labels.shape != (ch.shape[0],) or (cond and (labels.min() < 0 or labels.max() >= len(class_names))):
            raise DataError(f"{path}: labels must be (N,) indices into the model's {len(class_names)} classes")
        return ch, rj, labels
    if not (path / "chosen").is_dir() or not (path / "rejected").is_dir():
        raise DataError(f"{path}: preference pairs need a .safetensors file or a folder with chosen/ and rejected/")

    def files(sub):
        root = path / sub
        return {f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*")) if f.suffix.lower() in IMAGE_EXTS}

    ch_f, rj_f = files("chosen"), files("rejected")
    if not ch_f:
        raise DataError(f"{path / 'chosen'} contains no images")
    if set(ch_f) != set(rj_f):
        odd = sorted(set(ch_f) ^ set(rj_f))[0]
        raise DataError(f"{path}: {odd} is in only one of chosen/ and rejected/ (pairs are matched by file name)")
    keys = sorted(ch_f)
    labels = []
    for k in keys:
        parts = k.split("/")
        if len(parts) == 1:
            if cond:
                raise DataError(f"{path}: chosen/{k}: a class-conditional model needs class sub-folders "
                                "(chosen/<class>/..., rejected/<class>/...)")
            labels.append(0)
        else:
            labels.append(resolve_classes([parts[0]], class_names, f"{path} (class folder)")[0] if cond else 0)
    return (read_images([ch_f[k] for k in keys], resolution, channels),
            read_images([rj_f[k] for k in keys], resolution, channels), torch.tensor(labels, dtype=torch.long))
