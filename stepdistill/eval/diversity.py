"""Within-condition sample diversity: detects mode collapse of distilled one-step generators.

``diversity(images, labels)`` is the mean pairwise cosine distance ``1 - cos(f_i, f_j)`` between
feature vectors of samples that share a condition (class label or prompt id), averaged over
conditions with at least two samples (each condition weighs the same). It is 0 when every
sample of a condition is identical and grows as samples spread out; values from different
feature extractors are not comparable.

Feature extractors (``extractor=``):

* ``"classifier"``: penultimate (64-d, pre-activation) layer of the shipped Animal-MNIST domain
  classifier (:func:`stepdistill.eval.classifier.load_default_classifier`); for 1-channel 32x32
  images, and fast on CPU. A :class:`~stepdistill.eval.classifier.SmallCNN` instance also works.
* ``"inception"``: 2048-d Inception pool3 features (:func:`stepdistill.eval.fid.features`); any image size.
* ``"pixel"``: raw pixels (LPIPS-free fallback; sensitive to translations, so a crude proxy).
* ``"auto"`` (default): classifier for (N, 1, 32, 32) inputs, else inception.
* any callable mapping an image tensor (N, C, H, W) to features (N, D).
"""
from __future__ import annotations

from typing import Callable

import torch


def _pairwise_mean_cosine_distance(f: torch.Tensor) -> float:
    """Mean over i < j of ``1 - cos(f_i, f_j)`` (exactly 0 for identical rows, including zero rows)."""
    n = f.shape[0]
    f = f.double()
    norms = f.norm(dim=1, keepdim=True)
    fn = torch.where(norms > 0, f / norms.clamp_min(1e-300), torch.zeros_like(f))
    cos = fn @ fn.T
    # identical vectors must give distance 0 even if both are zero (cos would be 0 there)
    same = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist") == 0
    cos = torch.where(same, torch.ones_like(cos), cos)
    iu = torch.triu_indices(n, n, offset=1)
    d = (1.0 - cos[iu[0], iu[1]]).clamp_min(0.0)
    return float(d.mean())


def _resolve_extractor(extractor, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from stepdistill.eval.classifier import classifier_features, load_default_classifier

    if callable(extractor) and not isinstance(extractor, str):
        if isinstance(extractor, torch.nn.Module) and hasattr(extractor, "features"):
            return lambda x: classifier_features(extractor, x)
        return extractor
    name = (extractor or "auto").lower()
    if name == "auto":
        name = "classifier" if tuple(images.shape[1:]) == (1, 32, 32) else "inception"
    if name == "classifier":
        model = load_default_classifier()
        want = (model.config["in_channels"], model.config["resolution"], model.config["resolution"])
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"the domain classifier takes images of shape (N, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(images.shape)}; use extractor='inception' or 'pixel'")
        return lambda x: classifier_features(model, x)
    if name == "inception":
        from stepdistill.eval.fid import features

        return lambda x: torch.from_numpy(features(x))
    if name == "pixel":
        return lambda x: x.float().flatten(1)
    raise ValueError(f"unknown diversity extractor {extractor!r}: use auto, classifier, inception, pixel or a callable")


@torch.no_grad()
def diversity(images, labels=None, extractor: str | Callable | torch.nn.Module = "auto",
              return_per_condition: bool = False):
    """Mean within-condition pairwise cosine feature distance (see the module docstring).

    Args:
        images: float (N, C, H, W) in [-1, 1] (uint8 is rescaled).
        labels: (N,) condition ids (class labels / prompt indices); ``None`` = one condition.
        extractor: ``"auto"`` | ``"classifier"`` | ``"inception"`` | ``"pixel"`` | callable | SmallCNN.
        return_per_condition: also return ``{condition: value}``.

    Returns:
        the diversity (float), or ``(diversity, per_condition)``. Raises :class:`ValueError` if no
        condition has two or more samples.
    """
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    if images.ndim != 4:
        raise ValueError(f"diversity expects images of shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().cpu()
    if labels.shape != (n,):
        raise ValueError(f"diversity got {n} images but labels of shape {tuple(labels.shape)}")
    groups = {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
    groups = {c: idx for c, idx in groups.items() if len(idx) >= 2}
    if not groups:
        raise ValueError("diversity needs at least one condition with 2 or more samples")
    fn = _resolve_extractor(extractor, images)
    keep = torch.cat(list(groups.values()))
    f = torch.as_tensor(fn(images[keep])).detach().cpu().double().flatten(1)
    feats = torch.zeros(n, f.shape[1], dtype=torch.float64)
    feats[keep] = f
    per = {c: _pairwise_mean_cosine_distance(feats[idx]) for c, idx in groups.items()}
    value = float(sum(per.values()) / len(per))
    return (value, per) if return_per_condition else value
