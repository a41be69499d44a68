"""A teacher whose mode weights are known exactly: a 2-D Gaussian mixture with its exact denoiser.

Used to check whether an objective keeps minority modes (tests/test_mode_coverage.py, ``python -m
stepdistill.eval.mode_coverage``). Data x0 ~ sum_k pi_k N(mu_k, s^2 I) in 2-D, stored as (B, 2, 1, 1) "images".
Under the VP forward process x_t = a x0 + sigma eps each component stays Gaussian, so the exact x0 prediction is::

    v = a^2 s^2 + sigma^2
    gamma_k(x_t) = softmax_k( log pi_k - ||x_t - a mu_k||^2 / (2 v) )
    E[x0 | x_t] = sum_k gamma_k (mu_k + (a s^2 / v) (x_t - a mu_k))

The backbone returns that ("sample" prediction) plus a small residual MLP whose last layer starts at zero: the
teacher is exact, and the copies that DMD, SiD or BOOT train (student, fake score) start from it and can move. The
MLP's hidden layer is exposed as ``bottleneck`` (B, 128, 1, 1), so DMD2's GAN head can sit on the fake score.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .data import ArrayDataset
from .denoiser import Denoiser
from .models import ModelMeta
from .schedules import VPSchedule

#: the default mixture: four modes at the corners of a square inside [-1, 1]^2 (the pixel range every sampler clamps
#: to), weights 0.55 / 0.25 / 0.15 / 0.05
MEANS = ((0.6, 0.6), (-0.6, 0.6), (-0.6, -0.6), (0.6, -0.6))
WEIGHTS = (0.55, 0.25, 0.15, 0.05)
STD = 0.1


def ddpm_schedule() -> VPSchedule:
    """The linear-beta DDPM schedule (1,000 steps), the shipped teachers' family."""
    return VPSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                             "beta_schedule": "linear", "prediction_type": "sample"})


class GMMBackbone(nn.Module):
    """Exact mixture denoiser + a residual MLP (module docstring). ``forward(x (B, 2, 1, 1), t (B,), cond=None)``
    -> x0 (B, 2, 1, 1)."""

    sample_shape = (2, 1, 1)

    def __init__(self, schedule: VPSchedule, means=MEANS, weights=WEIGHTS, std: float = STD, hidden: int = 128,
                 seed: int = 0):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32))     # (K, 2)
        self.register_buffer("log_w", torch.log(torch.tensor(weights, dtype=torch.float32)))
        self.std = float(std)
        self.bottleneck_channels = hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
            self.bottleneck = nn.Identity()                                         # (B, hidden, 1, 1)
            self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def exact_x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] of the mixture (x: (B, 2), t: (B,)) -> (B, 2)."""
        a, s = self.schedule.alpha_sigma(t.double())
        a, s = a.to(x).view(-1, 1), s.to(x).view(-1, 1)
        v = a * a * self.std**2 + s * s                                          # (B, 1)
        d = x[:, None, :] - a[:, None, :] * self.means[None]                      # (B, K, 2)
        gamma = torch.softmax(self.log_w[None] - (d * d).sum(-1) / (2 * v), dim=1)  # (B, K)
        post = self.means[None] + (a * self.std**2 / v)[:, None, :] * d          # (B, K, 2)
        return (gamma[..., None] * post).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        xf = x.flatten(1)                                                          # (B, 2)
        t = t.to(x.device).float().expand(xf.shape[0])
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), 8, device=x.device))
        ang = t[:, None] / 1000.0 * freqs[None]
        h = self.inp(torch.cat([xf, torch.sin(ang), torch.cos(ang)], 1))
        h = self.bottleneck(h[:, :, None, None]).flatten(1)
        return (self.exact_x0(xf, t) + self.out(h)).view_as(x)


def gmm_teacher(seed: int = 0, **kw) -> tuple[Denoiser, ModelMeta]:
    """The exact mixture teacher as a Denoiser (unconditional, x0 prediction) and its metadata."""
    sched = ddpm_schedule()
    return Denoiser(GMMBackbone(sched, seed=seed, **kw), sched, "sample"), ModelMeta(prediction_type="sample",
                                                                                      conditioning="none")


def gmm_samples(n: int, seed: int = 0, means=MEANS, weights=WEIGHTS, std: float = STD) -> ArrayDataset:
    """n exact draws (B, 2, 1, 1) with their component index as the label."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(torch.tensor(weights), n, replacement=True, generator=g)
    x = torch.tensor(means)[k] + std * torch.randn(n, 2, generator=g)
    return ArrayDataset(x.view(n, 2, 1, 1), torch.zeros(n, dtype=torch.long), [])


def mode_weights(x: torch.Tensor, means=MEANS, std: float = STD) -> dict:
    """Each sample's nearest mode: the share of samples per mode, the share within 4 std of its mode
    ("on a mode"), total variation to the true weights and the worst mode's share over its true weight."""
    xf = x.flatten(1).float()
    m = torch.tensor(means)
    d = torch.cdist(xf, m)                                                        # (N, K)
    near = d.argmin(1)
    share = torch.bincount(near, minlength=len(means)).float() / len(xf)
    true = torch.tensor(WEIGHTS if len(means) == len(WEIGHTS) else [1 / len(means)] * len(means))
    return {"share": [round(float(v), 4) for v in share], "true": [float(v) for v in true],
            "on_mode": float((d.min(1).values < 4 * std).float().mean()),
            "tv": float(0.5 * (share - true).abs().sum()),
            "worst_mode_ratio": float((share / true).min())}
