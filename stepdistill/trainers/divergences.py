"""f-divergence distribution matching (f-distill; Xu, Nie & Vahdat 2025, "One-step Diffusion Models with
f-Divergence Distribution Matching", arXiv 2502.15681).

For D_f(p || q_theta) = E_q[f(p / q)] with the student's samples x = G_theta(z) noised to x_t, the gradient is
DMD's score difference weighted per sample by a function of the density ratio r = p_t(x_t) / q_t(x_t)
(f-distill Thm. 1; checked against finite differences on 1-D Gaussians in tests/test_fdistill.py)::

    grad_theta D_f = E[ h(r) (s_q(x_t) - s_p(x_t)) dx_t/dtheta ],     h(r) = f''(r) r^2

+--------------+--------------------------------------+-------------+---------------------------------+
| divergence   | f(r)                                 | h(r)        | character                       |
+==============+======================================+=============+=================================+
| reverse_kl   | -log r                               | 1           | DMD / DMD2 (mode-seeking)       |
| forward_kl   | r log r                              | r           | mode-covering, high variance    |
| js           | r log r - (1 + r) log((1 + r) / 2)   | r / (1 + r) | the paper's best one-step FID   |
+--------------+--------------------------------------+-------------+---------------------------------+

r comes from the GAN discriminator that DMD2 already trains on noised samples: at its optimum the logit
of ``softplus(D(fake)) + softplus(-D(real))`` is log(p_t / q_t). The logit is clipped (exp overflows,
and an unconverged head is not a density ratio far from 0), and h is divided by its batch mean, as the
paper does, so the weights only re-balance samples and the DM term keeps its scale. ``reverse_kl``
skips all of this: it is DMD2 bit for bit.
"""
from __future__ import annotations

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "js")


def f_of_r(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """The generator f of each divergence (f(1) = 0), for tests and plots."""
    if divergence == "reverse_kl":
        return -torch.log(r)
    if divergence == "forward_kl":
        return r * torch.log(r)
    if divergence == "js":
        return r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)
    raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")


def h_of_r(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """h(r) = f''(r) r^2 in closed form."""
    return h_derivatives(r, divergence)[0]


def h_derivatives(r: torch.Tensor, divergence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h(r), h'(r)) in closed form: the score-implicit branch (Uni-Instruct) weighs by h and r h'
    (:func:`stepdistill.trainers.losses.score_implicit_loss`)."""
    if divergence == "reverse_kl":
        return torch.ones_like(r), torch.zeros_like(r)
    if divergence == "forward_kl":
        return r, torch.ones_like(r)
    if divergence == "js":
        return r / (1 + r), 1 / (1 + r) ** 2
    raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(DIVERGENCES)}")


def f_weights(logits: torch.Tensor, divergence: str, logit_clip: float = 10.0) -> torch.Tensor:
    """Per-sample weights (B,) from the discriminator's logits on the noised student samples: h(exp(logit)),
    the logit clipped to [-logit_clip, logit_clip], divided by the batch mean (so mean weight = 1). Detached."""
    lg = logits.detach().float().clamp(-logit_clip, logit_clip)
    if divergence == "js":  # r / (1 + r) = sigmoid(log r): no overflow at all
        h = torch.sigmoid(lg)
    else:
        h = h_of_r(torch.exp(lg), divergence)
    return h / h.mean().clamp_min(1e-12)
