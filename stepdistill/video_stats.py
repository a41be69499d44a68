"""Clip statistics (pure tensor code, no models): temporal consistency, motion diversity and the collapse detector
for clips (N, C, F, H, W) in [-1, 1]. The definitions are in :mod:`stepdistill.eval.video` (which adds the
per-frame FID and the frame classifier); the training guards (``trainers/guards.py``) use :func:`collapse_flags`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

STATIC_TOL = 0.02        # RMS change between frames below this: a static clip (the range [-1, 1] is 2 wide)
SOLID_TOL = 0.05         # spatial std below this in every frame: a solid-colour clip


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, F, H, W) -> (N * F, C, H, W), clip-major (the frames of clip 0 first)."""
    n, c, f, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)


def check_clips(clips: torch.Tensor) -> torch.Tensor:
    if clips.ndim != 5 or clips.shape[2] < 2:
        raise ValueError(f"expected clips (N, C, F, H, W) with F >= 2, got shape {tuple(clips.shape)}")
    return clips.detach().float().cpu()


def clip_frame_diff(clips: torch.Tensor) -> torch.Tensor:
    """(N,) RMS change between consecutive frames of each clip."""
    x = check_clips(clips)
    return (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean((1, 2, 3, 4)).sqrt()


def clip_warp_residual(clips: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """(N,) RMS change between consecutive frames after the best integer shift of the earlier frame (module
    docstring); the background value -1 fills what a shift uncovers."""
    x = check_clips(clips)
    prev, nxt = x[:, :, :-1], x[:, :, 1:]                        # (N, C, F-1, H, W)
    H, W = x.shape[-2:]
    padded = F.pad(prev, (radius, radius, radius, radius), value=-1.0)
    best = None
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[..., radius - dy: radius - dy + H, radius - dx: radius - dx + W]
            err = (nxt - shifted).pow(2).mean((1, 3, 4))           # (N, F-1) per frame pair
            best = err if best is None else torch.minimum(best, err)
    return best.mean(1).sqrt()


def centroid_tracks(clips: torch.Tensor) -> torch.Tensor:
    """(N, F, 2) intensity-weighted centroid (y, x) in pixels of every frame (weights (x + 1) / 2)."""
    x = check_clips(clips)
    m = ((x + 1) / 2).clamp(min=0).sum(1)                          # (N, F, H, W)
    H, W = m.shape[-2:]
    ys = torch.arange(H, dtype=m.dtype).view(1, 1, H, 1)
    xs = torch.arange(W, dtype=m.dtype).view(1, 1, 1, W)
    mass = m.sum((2, 3)).clamp(min=1e-6)
    return torch.stack([(m * ys).sum((2, 3)) / mass, (m * xs).sum((2, 3)) / mass], -1)


def motion_diversity(clips: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    """Mean pairwise RMS distance (pixels) between the clips' displacement paths, within each group (module
    docstring); ``groups`` (N,) condition ids (None: one group)."""
    tracks = centroid_tracks(clips)
    paths = (tracks - tracks[:, :1]).flatten(1)                     # (N, 2F) displacement from the first frame
    groups = torch.zeros(len(paths), dtype=torch.long) if groups is None else groups.cpu()
    per = []
    for g in groups.unique():
        p = paths[groups == g]
        if len(p) < 2:
            continue
        d = torch.cdist(p, p) / (p.shape[1] / 2) ** 0.5
        per.append(d.sum() / (len(p) * (len(p) - 1)))
    if not per:
        raise ValueError("motion diversity needs two clips of one condition")
    return float(torch.stack(per).mean())


def collapse_flags(clips: torch.Tensor, static_tol: float = STATIC_TOL, solid_tol: float = SOLID_TOL,
                   frame_diff: torch.Tensor | None = None) -> dict:
    """Per-clip collapse flags: ``static`` (N,) bool, ``solid`` (N,) bool, and their fractions (``frame_diff``: the
    clips' :func:`clip_frame_diff` when already computed)."""
    x = check_clips(clips)
    static = (clip_frame_diff(x) if frame_diff is None else frame_diff) < static_tol
    solid = x.std((1, 3, 4)).amax(1) < solid_tol                   # every frame flat
    return {"static": static, "solid": solid, "static_frac": float(static.float().mean()),
            "solid_frac": float(solid.float().mean()), "collapsed_frac": float((static | solid).float().mean())}


def temporal_metrics(clips: torch.Tensor, groups: torch.Tensor | None = None) -> dict:
    x = check_clips(clips)
    diff = clip_frame_diff(x)
    flags = collapse_flags(x, frame_diff=diff)
    out = {"frame_diff": float(diff.mean()), "warp_residual": float(clip_warp_residual(x).mean()),
           "static_frac": flags["static_frac"], "solid_frac": flags["solid_frac"],
           "collapsed_frac": flags["collapsed_frac"]}
    try:
        out["motion_diversity"] = motion_diversity(x, groups)
    except ValueError:
        out["motion_diversity"] = None
    return out
