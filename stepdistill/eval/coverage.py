"""Mode coverage of generated images: precision, recall, coverage, and recall per class.

* Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models", Sec. 2, Eq. 1-2). Each set of features spans a manifold, the union of the balls
  around its points whose radius is the distance to the point's k-th nearest neighbour in its own set::

      f(phi, Phi)  = 1  if  ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||  for some phi' in Phi, else 0
      precision    = mean_{g in gen} f(g, ref)      # generated samples that look real
      recall       = mean_{r in ref} f(r, gen)      # real samples the generator can reach

  A generator that drops a mode keeps its precision and loses recall. torch-fidelity 0.4 computes
  the same numbers (``prc=True``, k = 3); :func:`precision_recall` equals it (tested).
* Coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models",
  Eq. 4): the fraction of real samples whose own k-NN ball holds at least one generated sample. It is
  built on the real manifold only, so a few generated outliers cannot inflate it, unlike recall.
* Recall per class: the recall of a class-conditional generator's class-c samples against the real
  class-c images. A student that drops the rare shapes inside a class (a sitting dog, a bird in
  flight) shows a low recall for that class even when FID and class accuracy look fine.

All functions take features (N, D), e.g. Inception pool3 features from :mod:`stepdistill.eval.fid`.
"""
from __future__ import annotations

import torch

NEIGHBOURS = 3  # k of Kynkaanniemi et al. and torch-fidelity's default


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x).double()


def knn_radii(feats, k: int = NEIGHBOURS) -> torch.Tensor:
    """(N,) distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = _t(feats)
    if f.ndim != 2 or f.shape[0] <= k:
        raise ValueError(f"need (N > k={k}, D) features for k-NN radii, got shape {tuple(f.shape)}")
    return torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # the 1st value is the point itself (0)


def _inside(points, centres, radii) -> torch.Tensor:
    """(N,) bool: point i lies in at least one ball (centre j, radius r_j)."""
    return (torch.cdist(_t(points), _t(centres)) <= radii[None, :]).any(dim=1)


def precision_recall(gen, ref, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2) of ``gen`` against ``ref``."""
    precision = _inside(gen, ref, knn_radii(ref, k)).double().mean().item()
    recall = _inside(ref, gen, knn_radii(gen, k)).double().mean().item()
    return precision, recall


def coverage(gen, ref, k: int = NEIGHBOURS) -> float:
    """Coverage (Naeem et al. 2020, Eq. 4): real samples whose k-NN ball holds a generated sample."""
    d = torch.cdist(_t(ref), _t(gen))                                   # (N_ref, N_gen)
    return (d <= knn_radii(ref, k)[:, None]).any(dim=1).double().mean().item()


def per_class_recall(gen, gen_labels, ref, ref_labels, class_names: list[str], k: int = NEIGHBOURS) -> dict[str, float]:
    """Recall of each class's generated samples against that class's real images ({name: recall}).
    Classes with at most k samples on either side are left out (no k-NN radius)."""
    gen, ref = _t(gen), _t(ref)
    gl, rl = torch.as_tensor(gen_labels).long(), torch.as_tensor(ref_labels).long()
    out = {}
    for c, name in enumerate(class_names):
        g, r = gen[gl == c], ref[rl == c]
        if len(g) > k and len(r) > k:
            out[name] = _inside(r, g, knn_radii(g, k)).double().mean().item()
    return out


def coverage_metrics(gen, ref, gen_labels=None, ref_labels=None, class_names: list[str] | None = None,
                     k: int = NEIGHBOURS) -> dict:
    """``precision``, ``recall``, ``coverage`` and, with labels on both sides, ``per_class_recall`` and
    its minimum ``min_class_recall`` (the worst-covered class) and mean ``mean_class_recall``."""
    p, r = precision_recall(gen, ref, k)
    out = {"precision": p, "recall": r, "coverage": coverage(gen, ref, k), "prc_neighbours": k}
    if gen_labels is not None and ref_labels is not None and class_names:
        per = per_class_recall(gen, gen_labels, ref, ref_labels, class_names, k)
        if per:
            out.update(per_class_recall=per, min_class_recall=min(per.values()),
                       mean_class_recall=sum(per.values()) / len(per))
    return out
