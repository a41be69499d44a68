"""Decoupled DMD as an objective: DMD2 with its distribution-matching term split in two.

Decoupled DMD (Liu et al. 2025, "Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching
as the Shield", Sec. 3): with mu_real = mu_u + w (mu_c - mu_u) the guided direction splits exactly into

    mu_fake - mu_real = (mu_fake - mu_c)  -  (w - 1)(mu_c - mu_u)
                        DM term               CFG-augmentation (CA) term

CA drives quality ("the spear"), DM regularises ("the shield"). ``dmd.decoupled`` evaluates each term
at its own noised sample (its own t and eps: ``dmd.ca_schedule``; the paper's best is CA re-noised only
above the student's current timestep, DM over the full range), normalises each by DMD2's normaliser at
its own sample, ``n = mean_{C,H,W} |x - mu_real(x_t)|``, and weights them (``dmd.dm_term_weight``,
``dmd.ca_weight``). With a shared sample (``ca_schedule: shared``) and unit weights the two gradients
sum to DMD2's (see :func:`~stepdistill.trainers.losses.decoupled_dm_loss`).

Selected by ``dmd.decoupled: true`` (the ``dmd`` / ``dmd2`` methods); everything else is DMD2's
(:class:`~stepdistill.trainers.dmd.DMDObjective`).
"""
from __future__ import annotations

import torch

from ..denoiser import _cat_cond
from .dmd import DMDObjective
from .losses import decoupled_dm_loss, nonfinite_frac
from .objective import Ctx


class DecoupledDMDObjective(DMDObjective):
    """DMD2 whose DM term is Decoupled DMD's CA + DM pair (module docstring)."""
    teacher_in_score_pass = False  # the teacher's cond / uncond passes are made here, at each term's own sample

    def dm_term(self, ctx: Ctx, x, x_t, t, cond, k: int, real_x0, fake_x0, logits, weight=None):
        return self.decoupled_loss(ctx, x, x_t.detach(), t, cond, k, fake_x0)

    def ca_times(self, ctx: Ctx, k: int) -> torch.Tensor:
        """CA re-noising times (B,): ``uniform`` U[ca_t_min, ca_t_max]; ``above_student`` U[max(t_k, ca_t_min),
        ca_t_max] with t_k the student's current timestep (the paper's best; a one-step student at
        t_0 >= ca_t_max gets ca_t_max)."""
        c = self.cfg
        lo, hi = c.ca_t_min, c.ca_t_max
        if c.ca_schedule == "above_student":
            lo = min(max(self.timesteps[k], lo), hi)
        return ctx.sample_t(self.teacher.schedule, lo, hi)

    def _teacher_cu(self, x_t, t, cond):
        """(mu_c, mu_u) from one batched CFG call; both mu_c without CFG (no cond / w = 1)."""
        if cond is None or self.cfg.real_guidance_scale == 1.0:
            x0 = self.teacher(x_t, t, cond)
            return x0, x0
        return self.teacher.x0_cond_uncond(x_t, t, cond)

    def decoupled_loss(self, ctx: Ctx, x, x_t, t, cond, k: int, fake_x0):
        """Decoupled DMD (module docstring): the DM term at the generator loss's ``(t, x_t)``, the CA term at
        its own sample (``dmd.ca_schedule``); one teacher call (batch 2B shared, 4B decoupled) gives both."""
        c, sched = self.cfg, self.teacher.schedule
        B = x.shape[0]
        with torch.no_grad():
            if c.ca_schedule == "shared":
                t_ca = t
                dm_real = ca_real = self._teacher_cu(x_t, t, cond)
            else:
                t_ca = self.ca_times(ctx, k)
                x_ca = sched.add_noise(x.detach(), ctx.randn(*self.shape), t_ca)
                mc, mu = self._teacher_cu(torch.cat([x_t, x_ca]), torch.cat([t, t_ca]),
                                          None if cond is None else _cat_cond(cond, cond))
                dm_real, ca_real = (mc[:B], mu[:B]), (mc[B:], mu[B:])
        loss, p = decoupled_dm_loss(x, dm_real, fake_x0, ca_real, c.real_guidance_scale, c.dm_term_weight,
                                    c.ca_weight)
        g = c.dm_term_weight * p["g_dm"] + c.ca_weight * p["g_ca"]
        return loss, {"dm_loss": loss.item(), "dm_grad_abs": g.abs().mean().item(),
                      "dm_nonfinite_frac": nonfinite_frac(*dm_real, fake_x0, *ca_real),
                      "dm_term_loss": p["dm_term_loss"].item(), "ca_loss": p["ca_loss"].item(),
                      "dm_term_grad_abs": p["g_dm"].abs().mean().item(), "ca_grad_abs": p["g_ca"].abs().mean().item(),
                      "t_dm_mean": float(t.float().mean()), "t_ca_mean": float(t_ca.float().mean())}
