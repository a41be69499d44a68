"""Collapse and over-saturation guards (``train.guard_every``; called by the trainer core).

Distilled one-step students can collapse (mode collapse: the same image whatever the noise) or
over-saturate (high CFG: pixels pinned at the range ends); both are cheap to detect on the
periodic sample grid. Every ``train.guard_every`` steps the core calls :func:`run_guards`, which
asks the objective for ``guard_stats(ema) -> dict`` (DMD / DMD2 implement it; any objective with
``sample`` and ``conds`` gets :func:`sample_guard_stats`) and checks:

* **diversity** (collapse): for each condition c of the grid (the fixed grid noise; class-balanced
  labels or the first prompts of a text bank, >= 2 samples each), the mean pairwise RMS distance
  ``||x_i - x_j||_2 / sqrt(D)`` between samples of c, averaged over conditions and divided by
  ``sqrt(2) * data_std`` (``data_std``: the std of the training data; two independent draws of
  a distribution with per-pixel std s are ``sqrt(2) s`` apart in RMS, so ~1 means "as spread as
  the whole data set", 0 means every noise gives the same image). Trips below
  ``train.guard_min_diversity``.
* **saturation**: the fraction of pixels with ``|x| > 0.98`` (samples clamped to [-1, 1]). Trips
  above ``train.guard_max_saturation``. ``data_saturation`` (the same on the training data) is
  logged next to it: binary data sets (Animal-MNIST silhouettes) are saturated by nature, so set the
  threshold above that value.

* **video collapse** (samples (B, C, F, H, W)): the fraction of the grid's clips that are static (no change
  between frames) or solid-colour (:func:`stepdistill.eval.video.collapse_flags`), the video distillers' most
  reported failures. Trips above ``train.guard_max_collapsed``.

Stats go to ``guards.jsonl`` (one row per check) and into the step's ``log.jsonl`` row
(``guard_diversity``, ``guard_saturation``). When a threshold is crossed the sample grid is saved
as ``samples/guard_step_N.png`` and ``train.guard_action`` decides: ``warn`` prints the reason to
stderr and continues; ``stop`` saves a checkpoint (resumable) and raises :class:`CollapseError`.
Every process computes the same stats (same EMA weights, fixed noise), so all stop together.
"""
from __future__ import annotations


import json
import sys

import torch

from ..errors import StepDistillError

GUARD_GRID = 40  # samples per check (as the periodic grids: 10 columns)
SATURATION_LEVEL = 0.98


class CollapseError(StepDistillError, RuntimeError):
    """A guard tripped with ``train.guard_action=stop``; the message names the stat, step and checkpoint."""


def _group_ids(cond, n: int) -> torch.Tensor:
    """(n,) integer id of each sample's condition: labels, identical embedding rows, or one group."""
    if cond is None:
        return torch.zeros(n, dtype=torch.long)
    if isinstance(cond, dict):
        cond = cond.get("emb", next(iter(cond.values())))
    flat = cond.detach().reshape(cond.shape[0], -1).float().cpu()
    return torch.unique(flat, dim=0, return_inverse=True)[1]


def diversity(x: torch.Tensor, groups: torch.Tensor, data_std: float = 1.0) -> float:
    """Mean same-condition pairwise RMS distance / (sqrt(2) data_std) (module docstring); x (B, C, H, W)."""
    x = x.detach().float().reshape(x.shape[0], -1).cpu()
    per_group = []
    for g in groups.unique():
        xs = x[groups == g]
        if xs.shape[0] < 2:
            continue
        d = torch.cdist(xs, xs) / xs.shape[1] ** 0.5          # (m, m) RMS distances
        m = xs.shape[0]
        per_group.append(d.sum() / (m * (m - 1)))             # mean over i != j
    if not per_group:
        raise ValueError("diversity needs at least two samples of one condition")
    return float(torch.stack(per_group).mean() / (2 ** 0.5 * max(data_std, 1e-8)))


def saturation(x: torch.Tensor, level: float = SATURATION_LEVEL) -> float:
    """Fraction of values with |x| > level."""
    return float((x.detach().float().abs() > level).float().mean())


@torch.no_grad()
def sample_guard_stats(obj, ema: dict, n: int = GUARD_GRID) -> dict:
    """Guard stats of ``obj.sample(ema, n, device)`` (its fixed grid noise and ``obj.conds.grid(n)``).

    Returns ``{"diversity", "saturation", "samples"}`` (``samples``: the grid, for the image saved
    when a guard trips). ``obj.data_std`` (the real data's std, :class:`~stepdistill.trainers.objective.Objective`) normalises the
    diversity.
    """
    device = next((p.device for m in ema.values() for p in m.parameters()), torch.device("cpu"))
    x = obj.sample(ema, n, device)
    groups = _group_ids(obj.conds.grid(n, "cpu"), x.shape[0])
    return {"diversity": diversity(x, groups, float(obj.data_std or 1.0)),
            "saturation": saturation(x), "samples": x}


def data_stats(data) -> dict:
    """std and saturation of (up to 2048 images of) the training data, for normalising / reference."""
    if data is None or not hasattr(data, "images"):
        return {}
    x = data.images[:2048].float()
    return {"data_std": float(x.std()), "data_saturation": saturation(x)}


def run_guards(trainer) -> dict:
    """The core's hook (every ``train.guard_every`` steps, after the step). Returns the stats for the step's
    log row; on a trip saves the grid and warns, or checkpoints and raises :class:`CollapseError`."""
    from ..utils import save_grid

    obj, tc, acc = trainer.obj, trainer.tcfg, trainer.acc
    ema = trainer.ema_modules()
    stats = dict(obj.guard_stats(ema))  # trainers/objective.py: the grid's stats by default, {} = nothing to guard
    if not stats:
        return {}
    samples = stats.pop("samples", None)
    if samples is not None and samples.ndim == 5:  # video: static / solid-colour clips
        from ..video_stats import collapse_flags

        flags = collapse_flags(samples)
        stats.update(static_frac=flags["static_frac"], solid_frac=flags["solid_frac"],
                     collapsed_frac=flags["collapsed_frac"])
    if not hasattr(trainer, "_guard_data_stats"):
        trainer._guard_data_stats = data_stats(trainer.data)
    step = trainer.step
    div, sat = float(stats.get("diversity", float("nan"))), float(stats.get("saturation", float("nan")))
    tripped = []
    if div < tc.guard_min_diversity:
        tripped.append(f"diversity {div:.4f} < train.guard_min_diversity={tc.guard_min_diversity} (mode collapse)")
    if sat > tc.guard_max_saturation:
        tripped.append(f"saturation {sat:.4f} > train.guard_max_saturation={tc.guard_max_saturation} "
                       f"(data: {trainer._guard_data_stats.get('data_saturation', float('nan')):.4f})")
    collapsed = float(stats.get("collapsed_frac", 0.0))
    if collapsed > tc.guard_max_collapsed:
        tripped.append(f"collapsed clips {collapsed:.4f} > train.guard_max_collapsed={tc.guard_max_collapsed} "
                       f"(static {stats['static_frac']:.2f}, solid colour {stats['solid_frac']:.2f})")
    row = {"step": step, **{k: round(float(v), 6) for k, v in stats.items()},
           **{k: round(v, 6) for k, v in trainer._guard_data_stats.items()}, "tripped": tripped}
    grid = None
    if acc.is_main_process:
        trainer.out.mkdir(parents=True, exist_ok=True)
        if tripped and samples is not None:
            grid = save_grid(samples, trainer.out / "samples" / f"guard_step_{step}.png", nrow=10, scale=2)
            row["grid"] = str(grid)
        with open(trainer.out / "guards.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    logs = {f"guard_{k}": float(v) for k, v in stats.items()}
    if tripped:
        reason = "; ".join(tripped)
        if tc.guard_action == "stop":
            ckpt = trainer.save_checkpoint()
            raise CollapseError(f"collapse guard at step {step}: {reason}; checkpoint {ckpt}, sample grid {grid} "
                                "(resume with --resume after changing the recipe, e.g. dmd.real_guidance_scale, "
                                "dmd.gan, learning rates)")
        if acc.is_main_process:
            print(f"WARNING: collapse guard at step {step}: {reason}; sample grid {grid}", file=sys.stderr, flush=True)
    return logs
