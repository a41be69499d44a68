"""The metrics one eval run computes on a batch of samples, shared by class and text models (eval/generate.py,
eval/text_eval.py, report, curve): the reference set, FID / KID / precision-recall / coverage, class accuracy
with the shipped classifier, diversity."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ConfigError


class TextModelsNotSupported(ConfigError, NotImplementedError):
    """Text-conditioned models / prompt files are accepted by the interface but not implemented yet.

    Subclasses :class:`~stepdistill.config.ConfigError` (the CLI prints ``error: ...`` and exits 2)
    and :class:`NotImplementedError`.
    """


def load_reference(ref: str, resolution: int, channels: int = 1, split: str = "test", num: int | None = None):
    """The FID reference set: ``(images, labels, cache_key)``.

    ``ref`` is ``animal_mnist``, ``digits`` or an image folder; ``split`` is all | train | test
    (ignored for folders). ``num`` keeps a class-balanced, deterministic subset (first ``num``
    in class round-robin order). ``cache_key`` names dataset, resolution, split and subset so
    torch-fidelity's cached reference statistics are reused across runs.
    """
    import re

    from ..data import DataError, load_dataset

    known = ref in ("animal_mnist", "digits")
    if not known and not Path(ref).is_dir():
        raise DataError(f"unknown reference {ref!r}: use animal_mnist, digits or a path to an image folder")
    ds = load_dataset(ref, resolution, split if known else "all", channels)
    images, labels = ds.images, ds.labels
    if num is not None:
        if num < 2:
            raise ConfigError(f"the reference set needs at least 2 images, got --ref-num {num}")
        # class round-robin order: rank of each image within its class, then class
        rank = torch.zeros_like(labels)
        for c in labels.unique():
            idx = (labels == c).nonzero().flatten()
            rank[idx] = torch.arange(len(idx))
        order = torch.argsort(rank * (int(labels.max()) + 1) + labels, stable=True)[:num]
        images, labels = images[order], labels[order]
    if known:
        key = f"{ref}-{resolution}-{split}"
    else:
        key = "folder-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ref).resolve().name) + f"-{resolution}"
    if num is not None:
        key += f"-sub{len(images)}"
    return images, labels, key


def is_animal_mnist_domain(class_names: list[str], image_shape) -> bool:
    from ..data import ANIMAL_CLASSES

    return list(class_names) == list(ANIMAL_CLASSES) and tuple(image_shape) == (1, 32, 32)


def classifier_accuracy(images: torch.Tensor, labels, class_names: list[str]) -> dict:
    """Accuracy of the shipped Animal-MNIST classifier on class-conditional samples, or a reason why not."""
    if labels is None or not is_animal_mnist_domain(class_names, tuple(images.shape[1:])):
        return {"class_accuracy": None,
                "class_accuracy_note": "only for Animal-MNIST class-conditional models at 32x32, 1 channel"}
    from .classifier import class_accuracy, load_default_classifier

    acc, per = class_accuracy(load_default_classifier(), images, labels)
    return {"class_accuracy": acc, "per_class_accuracy": {n: (None if math.isnan(a) else a) for n, a in zip(class_names, per)}}


def diversity_metric(images: torch.Tensor, labels, extractor: str = "auto") -> dict:
    from .diversity import diversity

    name = extractor
    if extractor == "auto":
        name = "classifier" if tuple(images.shape[1:]) == (1, 32, 32) else "inception"
    try:
        value = diversity(images, labels, extractor=name)
    except ValueError as e:  # e.g. every condition has a single sample
        return {"diversity": None, "diversity_extractor": name, "diversity_note": str(e)}
    return {"diversity": value, "diversity_extractor": name}


#: below this many samples FID is mostly bias: eval / report / curve warn
MIN_FID_SAMPLES = 200


def fid_metrics(images: torch.Tensor, ref_images: torch.Tensor, cache_key: str, kid: bool = True, labels=None,
                ref_labels=None, class_names: list[str] | None = None) -> dict:
    """FID, KID, precision / recall and coverage (eval/coverage.py) from one feature pass per set; with class
    labels on both sides also the recall of every class against that class's real images."""
    import sys

    from .coverage import coverage_metrics
    from .fid import compute_metrics

    if len(images) < MIN_FID_SAMPLES:
        print(f"warning: FID from {len(images)} samples is dominated by its small-sample bias (it falls as the "
              f"sample count grows); compare only at equal --num, and use {MIN_FID_SAMPLES} or more (500-1000 in "
              f"BENCHMARKS.md)", file=sys.stderr, flush=True)
    m = compute_metrics(images, ref_images, fid=True, kid=kid, prc=True, cache_key=cache_key, return_features=True)
    out = {"fid": m["fid"]}
    if kid:
        out.update(kid=m["kid_mean"], kid_mean=m["kid_mean"], kid_std=m["kid_std"], kid_subset_size=m["kid_subset_size"])
    cov = coverage_metrics(m["gen_features"], m["ref_features"], labels, ref_labels, class_names)
    out.update(precision=m["precision"], recall=m["recall"], **{k: v for k, v in cov.items() if k not in ("precision", "recall")})
    out.update(feature_extractor=m["feature_extractor"], ref_cache_hit=m["ref_cache_hit"], n_gen=m["n_gen"], n_ref=m["n_ref"])
    return out


def reference_info(name: str, split: str, resolution: int, images, cache_key) -> dict:
    """The ``reference`` block of an eval result (split only for the built-in datasets)."""
    return {"name": name, "split": split if name in ("animal_mnist", "digits") else None,
            "resolution": resolution, "n": len(images), "cache_key": cache_key}


def training_dataset(model) -> tuple[str | None, int | None]:
    """(dataset name, resolution) the model was trained on, from its metadata (None if unknown)."""
    extra = model.meta.extra or {}
    data = (extra.get("config") or {}).get("data") or {}
    name = data.get("name") or extra.get("dataset")
    return name, data.get("resolution")
