"""Moving Animal-MNIST: deterministic video clips made from the installed Animal-MNIST silhouettes (issue: video
teachers and streaming students).

Each clip is ``frames`` frames of ``size`` x ``size`` pixels (1 channel, [-1, 1], background -1): one silhouette,
shrunk to ``obj`` pixels, moves along a seeded path with one of three motions:

* ``translate``: constant velocity, bouncing off the frame's edges (velocity flips at a wall);
* ``scale``: fixed centre, the silhouette's size oscillating between 0.6 and 1.0 of ``obj``;
* ``bounce``: a ballistic arc (constant gravity, elastic floor and walls).

Clip i of a split is a pure function of (split, i, seed): the same call gives the same tensor on any machine, and
the three splits draw disjoint source images (the image dataset's own train / val / test splits). The class label
is the source image's; ``motion`` records the motion kind (0 / 1 / 2), so motion diversity can be checked per kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MOTIONS = ("translate", "scale", "bounce")


@dataclass
class VideoDataset:
    """clips (N, 1, F, H, W) in [-1, 1], labels (N,), motion (N,) and the class names."""
    clips: torch.Tensor
    labels: torch.Tensor
    motion: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.clips)


def _place(sprite: torch.Tensor, size: int, cx: float, cy: float, scale: float) -> torch.Tensor:
    """Paste ``sprite`` (h, w) in [0, 1] scaled by ``scale`` with its centre at (cx, cy) on a size x size canvas
    (bilinear; parts outside the canvas are cut)."""
    h = max(2, int(round(sprite.shape[0] * scale)))
    s = F.interpolate(sprite[None, None], size=(h, h), mode="bilinear", align_corners=False)[0, 0]
    canvas = torch.zeros(size + 2 * h, size + 2 * h)
    x0, y0 = int(round(cx - h / 2)) + h, int(round(cy - h / 2)) + h
    x0, y0 = min(max(x0, 0), size + h), min(max(y0, 0), size + h)
    canvas[y0:y0 + h, x0:x0 + h] = torch.maximum(canvas[y0:y0 + h, x0:x0 + h], s)
    return canvas[h:h + size, h:h + size]


def _path(kind: int, frames: int, size: int, obj: int, g: torch.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, scale) per frame for motion ``kind`` (module docstring)."""
    r = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    half = obj / 2
    out = []
    if kind == 0:  # translate, bouncing off the walls
        x, y = r(half, size - half), r(half, size - half)
        speed, ang = r(0.8, 1.6) * size / 16, r(0, 2 * math.pi)
        vx, vy = speed * math.cos(ang), speed * math.sin(ang)
        for _ in range(frames):
            out.append((x, y, 1.0))
            x, y = x + vx, y + vy
            if not half <= x <= size - half:
                vx, x = -vx, min(max(x, half), size - half)
            if not half <= y <= size - half:
                vy, y = -vy, min(max(y, half), size - half)
    elif kind == 1:  # scale about a fixed centre
        x, y = r(half, size - half), r(half, size - half)
        phase, period = r(0, 2 * math.pi), r(4, 8)
        for f in range(frames):
            out.append((x, y, 0.8 + 0.2 * math.sin(phase + 2 * math.pi * f / period)))
    else:  # ballistic bounce: gravity down, elastic floor and walls
        x, y = r(half, size - half), r(half, size / 2)
        vx, vy, grav = r(-1.0, 1.0) * size / 16, 0.0, 0.5 * size / 16
        for _ in range(frames):
            out.append((x, y, 1.0))
            vy += grav
            x, y = x + vx, y + vy
            if y > size - half:
                y, vy = size - half, -abs(vy)
            if not half <= x <= size - half:
                vx, x = -vx, min(max(x, half), size - half)
    return out


def moving_animal_mnist(n: int, frames: int = 8, size: int = 16, split: str = "train", seed: int = 0,
                        obj: int | None = None, source=None) -> VideoDataset:
    """``n`` clips (module docstring). ``source``: the silhouettes, an :class:`~stepdistill.data.ArrayDataset`
    (``stepdistill.data.moving_clips`` passes Animal-MNIST's ``split`` at 32 px); ``split`` also seeds the paths;
    ``obj``: the silhouette's side in pixels (default ``size`` * 0.6)."""
    if source is None:
        raise ValueError("moving_animal_mnist needs the source silhouettes (stepdistill.data.moving_clips loads a "
                         "split's)")
    obj = obj or max(4, int(round(size * 0.6)))
    sprites = (source.images[:, 0].float() + 1) / 2                     # (M, 32, 32) in [0, 1]
    clips = torch.empty(n, 1, frames, size, size)
    labels, motion = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    base = 1_000_003 * seed + {"train": 0, "fit": 0, "val": 1, "test": 2}.get(split, 3) * 7919
    for i in range(n):
        g = torch.Generator().manual_seed(base + i)
        j = int(torch.randint(0, len(sprites), (), generator=g))
        kind = int(torch.randint(0, len(MOTIONS), (), generator=g))
        sprite = F.interpolate(sprites[j][None, None], size=(obj, obj), mode="bilinear", align_corners=False)[0, 0]
        for f, (cx, cy, sc) in enumerate(_path(kind, frames, size, obj, g)):
            clips[i, 0, f] = _place(sprite, size, cx, cy, sc)
        labels[i], motion[i] = int(source.labels[j]), kind
    return VideoDataset(clips * 2 - 1, labels, motion, list(source.class_names))
