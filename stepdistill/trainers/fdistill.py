"""f-distill as an objective: DMD2 with the distribution-matching gradient weighted per sample by h(r).

Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv 2502.15681),
Thm. 1: for D_f(p || q_theta) the gradient is DMD's score difference weighted by h(r) = f''(r) r^2 of the
density ratio r = p_t(x_t) / q_t(x_t), read from DMD2's GAN discriminator logit at the DM term's own noised
sample (the math and the table of f, h: :mod:`stepdistill.trainers.divergences`). Selected by
``dmd.divergence: forward_kl | js`` (needs ``dmd.gan``); ``reverse_kl`` is DMD2 itself
(:class:`~stepdistill.trainers.dmd.DMDObjective`), bit for bit. The divergence can switch during a run
(``schedule: [{at: 250, set: {dmd.divergence: forward_kl}}]``): the DM term reads it live.
"""
from __future__ import annotations

import torch

from .divergences import f_weights
from .dmd import DMDObjective
from .objective import Ctx


def ratio_logits(obj: DMDObjective, x_t, t, cond, logits):
    """The discriminator's logits log r at the DM step's own noised sample ``x_t`` (B,), detached: the generator
    loss's when it has them, else one critic features pass (the G term ran at its own t: ``gan_fresh_t``)."""
    if logits is not None:
        return logits
    with torch.no_grad():
        return obj.head(obj.critic.features(x_t.detach(), t, cond).float())


class FDistillObjective(DMDObjective):
    """DMD2 with f-distill's per-sample weights on the DM term (module docstring)."""

    def dm_term(self, ctx: Ctx, x, x_t, t, cond, k: int, real_x0, fake_x0, logits, weight=None):
        c = self.cfg
        if c.divergence == "reverse_kl":  # h = 1: DMD2's term itself (until a scheduled switch, recipe.py)
            return super().dm_term(ctx, x, x_t, t, cond, k, real_x0, fake_x0, logits, weight)
        logits = ratio_logits(self, x_t, t, cond, logits)
        weight = f_weights(logits, c.divergence, c.divergence_logit_clip)
        l_dm, logs = super().dm_term(ctx, x, x_t, t, cond, k, real_x0, fake_x0, logits, weight)
        return l_dm, {"f_weight_min": weight.min().item(), "f_weight_max": weight.max().item(), **logs}
