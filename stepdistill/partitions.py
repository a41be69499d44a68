"""Splitting things into K groups: classes among students (MSD), steps among phases (Phased DMD).

Pure functions on integers and tensors, at the bottom of the package (config validation uses them, and so
do the trainers and pipelines that route by them).
"""
from __future__ import annotations

import torch

from .errors import ConfigError


def even_split(total: int, k: int) -> list[int]:
    """``total`` steps over k phases; the remainder goes to the last phases."""
    base, rem = divmod(total, k)
    return [base + (1 if i >= k - rem else 0) for i in range(k)]


def routing_table(groups: list[list[int]], num_classes: int) -> list[int]:
    """``table[c]`` = the student owning class c. ValueError (naming the class) unless ``groups`` is a
    total, disjoint cover of ``0..num_classes-1`` by non-empty groups."""
    table: list[int | None] = [None] * num_classes
    for k, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"group {k} is empty (every student needs at least one class)")
        for c in g:
            c = int(c)
            if not 0 <= c < num_classes:
                raise ValueError(f"class {c} in group {k} is out of range 0..{num_classes - 1}")
            if table[c] is not None:
                raise ValueError(f"class {c} is in more than one group ({table[c]} and {k})")
            table[c] = k
    missing = [c for c, k in enumerate(table) if k is None]
    if missing:
        raise ValueError(f"class {missing[0]} is in no group (groups must cover all {num_classes} classes)")
    return table  # type: ignore[return-value]


def partition_classes(num_classes: int, k: int, groups: list[list[int]] | None = None) -> list[list[int]]:
    """K groups of class indices: ``groups`` validated to be a total, disjoint cover of
    ``0..num_classes-1`` (a :class:`ConfigError` naming ``msd.groups`` otherwise), or a balanced
    contiguous split (sizes differ by at most one; the larger groups last)."""
    if groups:
        if len(groups) != k:
            raise ConfigError(f"msd.groups: {len(groups)} group(s) for msd.num_students={k}; "
                              "give one group per student, or [] for a balanced split")
        try:
            routing_table(groups, num_classes)
        except ValueError as e:
            raise ConfigError(f"msd.groups: {e}") from None
        return [sorted(int(c) for c in g) for g in groups]
    if not 1 <= k <= num_classes:
        raise ConfigError(f"msd.num_students: {k} students need at least {k} classes, the teacher has {num_classes}")
    out, start = [], 0
    for n in even_split(num_classes, k):
        out.append(list(range(start, start + n)))
        start += n
    return out


def kmeans_partition(embeddings: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> list[list[int]]:
    """K groups of row indices of ``embeddings`` (N, ...) by k-means (k-means++ seeding from ``seed``,
    Lloyd iterations in float64): deterministic, a total and disjoint cover of ``0..N-1``, no empty
    group (an emptied cluster takes the point farthest from its centre), groups sorted and ordered by
    their smallest index (so the result does not depend on cluster numbering). For partitioning text
    prompts by their embeddings (MSD's partition of the conditioning space)."""
    x = embeddings.detach().reshape(embeddings.shape[0], -1).double().cpu()   # (N, D)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={n}")
    g = torch.Generator().manual_seed(int(seed))
    centers = x[torch.randint(0, n, (1,), generator=g)]                       # (1, D)
    for _ in range(1, k):  # k-means++: next centre with probability ~ squared distance to the nearest
        d2 = torch.cdist(x, centers).min(1).values ** 2                       # (N,)
        i = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(0, n, (1,), generator=g)
        centers = torch.cat([centers, x[i]])
    assign = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)])
        centers, prev = new, assign
        assign = torch.cdist(x, centers).argmin(1)
        if torch.equal(assign, prev):
            break
    for j in range(k):  # refill empty clusters (duplicate points, unlucky seeds)
        if not (assign == j).any():
            sizes = torch.bincount(assign, minlength=k)
            far = (x - centers[assign]).norm(dim=1).masked_fill(sizes[assign] < 2, -1.0)
            assign[int(far.argmax())] = j
    groups = [sorted((assign == j).nonzero().flatten().tolist()) for j in range(k)]
    return sorted(groups, key=lambda gr: gr[0])


def class_groups_by_mean_image(images: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                               seed: int = 0) -> list[list[int]]:
    """K groups of classes, similar classes together (``msd.partition: kmeans``): :func:`kmeans_partition` of
    each class's mean real image (C, ...) from ``images`` (N, ...) with ``labels`` (N,). MSD partitions the
    conditioning space among its students (Song et al. 2024, Sec. 3.1); grouping classes that look alike gives
    each student a narrower distribution than a split by class index. Groups may differ in size."""
    if not 1 <= k <= num_classes:
        raise ConfigError(f"msd.num_students: {k} students need at least {k} classes, the teacher has {num_classes}")
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ConfigError(f"msd.partition: kmeans needs real images of every class; class {missing[0]} has none")
    means = torch.stack([images[labels == c].double().mean(0) for c in range(num_classes)])   # (C, ...)
    return kmeans_partition(means, k, seed=seed)
