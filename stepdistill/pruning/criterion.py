r"""LAPTOP-Diff's one-shot pruning criterion (Zhang et al. 2024, arXiv 2404.11098: the output-loss
criterion, its additivity and the one-shot choice).

The score of a unit U (:mod:`~stepdistill.pruning.structure`) is the output loss of the teacher without it, on a
calibration set of noised inputs::

    S(U) = E_{x0, c, t, eps} || f(x_t, t, c) - f_{-U}(x_t, t, c) ||^2,   x_t = alpha_t x0 + sigma_t eps      (1)

f the teacher's native prediction (eps / v / x0 / flow, no CFG), f_{-U} the network with U removed. The paper
finds the output loss of a set close to additive, S(U_1 u ... u U_k) ~ sum_i S(U_i), so the cheapest set that
meets the pruning ratio is chosen in one shot (no iterative re-scoring)::

    min_{P}  sum_{U in P} S(U)   s.t.  sum_{U in P} cost(U) >= ratio * cost(teacher)                        (2)

cost = parameters (exact for a set of disjoint units) or measured latency (added per unit, then measured for the
chosen set). Units that share a module are alternatives, and the set must fit a stock config
(:func:`~stepdistill.pruning.structure.stock_config`). (2) is solved exactly by a branch-and-bound search over
subsets (scores are >= 0, so a partial set already worse than the best complete one is dropped).
:func:`additivity` measures how close to additive (1) is on this teacher: every pair of compatible units,
S(U u V) against S(U) + S(V).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..denoiser import Denoiser
from .structure import Unit, prune_network, stock_config

#: calibration noise levels (model timesteps of a T = 1000 schedule; scaled to the teacher's T)
CALIBRATION_TIMESTEPS = (50, 250, 500, 750, 950)


@dataclass
class Calibration:
    """Noised inputs (x_t, t, cond) and the teacher's outputs on them: what (1) averages over."""
    den: Denoiser                 # the teacher (its schedule, prediction type, null inputs)
    x_t: torch.Tensor             # (N, C, H, W)
    t: torch.Tensor               # (N,)
    cond: object                  # (N,) labels, (N, L, D) text embeddings, or None
    batch: int = 64
    target: torch.Tensor | None = None  # (N, C, H, W) the teacher's outputs

    def _cond(self, a: int, b: int):
        if self.cond is None:
            return None
        if isinstance(self.cond, dict):
            return {k: v[a:b] for k, v in self.cond.items()}
        return self.cond[a:b]

    @torch.no_grad()
    def outputs(self, net: torch.nn.Module, limit: int | None = None) -> torch.Tensor:
        """``net``'s native predictions on the calibration inputs (the first ``limit`` of them)."""
        d = self.den
        den = Denoiser(net, d.schedule, d.prediction_type, d.null_class, d.null_cond)
        n = len(self.x_t) if limit is None else min(limit, len(self.x_t))
        outs = [den.raw(self.x_t[a:min(a + self.batch, n)], self.t[a:min(a + self.batch, n)],
                        self._cond(a, min(a + self.batch, n))).float() for a in range(0, n, self.batch)]
        return torch.cat(outs)

    def error(self, net: torch.nn.Module) -> float:
        """(1): mean squared difference from the teacher's outputs."""
        return float((self.outputs(net) - self.target).pow(2).mean())


def make_calibration(den: Denoiser, images: torch.Tensor, labels: torch.Tensor | None, conds=None, num: int = 64,
                     timesteps=CALIBRATION_TIMESTEPS, seed: int = 0, batch: int = 64) -> Calibration:
    """``num`` real images (a seeded draw) at each of ``timesteps``, fresh noise per input: N = num x len(timesteps).
    ``conds``: a text bank (``real_cond(labels)``) for text teachers; class teachers use ``labels``; None and no
    labels: unconditional."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:num]
    x0 = images[idx].float()
    T = den.schedule.num_train_timesteps
    ts = [min(T - 1, round(float(t) * T / 1000)) for t in timesteps]
    x0 = x0.repeat(len(ts), *[1] * (x0.ndim - 1))                                      # (N, C, H, W)
    t = torch.tensor(ts, dtype=torch.float64).repeat_interleave(len(idx))            # (N,)
    eps = torch.randn(x0.shape, generator=g)
    x_t = den.schedule.add_noise(x0, eps, t)
    cond = None
    if labels is not None:
        lab = labels[idx].repeat(len(ts))
        cond = conds.real_cond(lab) if conds is not None else lab
    cal = Calibration(den, x_t, t, cond, batch)
    cal.target = cal.outputs(den.backbone)
    return cal


def param_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def latency_ms(net: torch.nn.Module, cal: Calibration, batch: int, repeats: int = 5) -> float:
    """Median wall time (ms) of one forward at ``batch`` (calibration inputs, repeated as needed)."""
    d = cal.den
    den = Denoiser(net, d.schedule, d.prediction_type, d.null_class, d.null_cond)
    reps = -(-batch // len(cal.x_t))
    x = cal.x_t.repeat(reps, *[1] * (cal.x_t.ndim - 1))[:batch]
    t = cal.t.repeat(reps)[:batch]
    c = cal.cond
    if c is not None and not isinstance(c, dict):
        c = c.repeat(reps, *[1] * (c.ndim - 1))[:batch]
    elif isinstance(c, dict):
        c = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:batch] for k, v in c.items()}
    den.raw(x, t, c)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        den.raw(x, t, c)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclass
class UnitScore:
    unit: Unit
    error: float           # S(U), (1)
    relative: float        # S(U) / E||f||^2
    params: int            # parameters the unit removes
    latency_ms: float = 0.0  # measured latency it saves (by latency only)


def score_units(net: torch.nn.Module, units: list[Unit], cal: Calibration, progress=None) -> tuple[list[UnitScore], dict]:
    """(1) for every unit alone; units whose removal breaks a shape are returned in ``rejected`` with the error."""
    full, power = param_count(net), float(cal.target.pow(2).mean())
    scores, rejected = [], {}
    for u in units:
        try:
            pruned = prune_network(net, [u])
            err = cal.error(pruned)
        except (RuntimeError, ValueError, IndexError, AttributeError, TypeError, AssertionError) as e:
            rejected[u.name] = f"{type(e).__name__}: {(str(e).splitlines() or ['a shape does not fit'])[0][:160]}"
            continue
        scores.append(UnitScore(u, err, err / max(power, 1e-12), full - param_count(pruned)))
        if progress is not None:
            progress(u.name)
    return scores, rejected


def additivity(net: torch.nn.Module, scores: list[UnitScore], cal: Calibration, max_pairs: int = 64) -> dict:
    """S(U u V) against S(U) + S(V) for compatible pairs (disjoint units; the first ``max_pairs``): the Pearson
    correlation and the median relative gap |S(UuV) - S(U) - S(V)| / S(UuV) (LAPTOP-Diff's additivity)."""
    pairs = []
    for a in range(len(scores)):
        for b in range(a + 1, len(scores)):
            if len(pairs) >= max_pairs:
                break
            u, v = scores[a], scores[b]
            if u.unit.overlaps(v.unit):
                continue
            try:
                joint = cal.error(prune_network(net, [u.unit, v.unit]))
            except (RuntimeError, ValueError, IndexError, AssertionError):
                continue
            pairs.append({"units": [u.unit.name, v.unit.name], "joint": joint, "sum": u.error + v.error})
    out = {"pairs": pairs}
    if len(pairs) >= 2:
        j = torch.tensor([p["joint"] for p in pairs], dtype=torch.float64)
        s = torch.tensor([p["sum"] for p in pairs], dtype=torch.float64)
        out["pearson"] = float(torch.corrcoef(torch.stack([j, s]))[0, 1])
        gap = ((j - s).abs() / j.clamp_min(1e-12)).median()
        out["median_relative_gap"] = float(gap)
    return out


def select_units(net: torch.nn.Module, scores: list[UnitScore], need: float, cost: str = "params") -> list[Unit] | None:
    """(2): the set of compatible units with the least summed score whose summed cost reaches ``need`` and that a
    stock config holds; None when no such set exists. Exact (branch and bound)."""
    key = (lambda s: s.params) if cost == "params" else (lambda s: s.latency_ms)
    order = sorted(scores, key=lambda s: s.error)
    remaining = [0.0] * (len(order) + 1)
    for k in range(len(order) - 1, -1, -1):
        remaining[k] = remaining[k + 1] + max(key(order[k]), 0.0)
    best: dict = {"score": float("inf"), "set": None}

    def visit(k: int, chosen: list[UnitScore], score: float, got: float) -> None:
        if score >= best["score"] or got + remaining[k] < need:
            return
        if got >= need and stock_config(net, [c.unit for c in chosen]) is not None:
            best.update(score=score, set=[c.unit for c in chosen])
            return
        if k == len(order):
            return
        s = order[k]
        if not any(s.unit.overlaps(c.unit) for c in chosen):
            visit(k + 1, chosen + [s], score + s.error, got + key(s))
        visit(k + 1, chosen, score, got)

    visit(0, [], 0.0, 0.0)
    return best["set"]
