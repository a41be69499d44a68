"""Every loss of the trainers, as pure functions with their equations and papers.

Distribution matching (DMD, Yin et al. CVPR 2024, Eq. 7; DMD2's per-sample normaliser, Yin et al. NeurIPS 2024,
authors' code)::

    p_real = x - mu_real(x_t, t, c; w),  p_fake = x - mu_fake(x_t, t, c)
    grad   = (p_real - p_fake) / mean_{C,H,W} |p_real|
    L_DM   = 0.5 ||x - sg(x - grad)||^2 (mean)            # d L_DM / d x = grad / numel

Decoupled DMD (Liu et al. 2025, Sec. 3): the guided direction split into a DM and a CFG-augmentation term, each
normalised at its own sample (:func:`decoupled_dm_loss`).

GAN (DMD2 Eq. 3; Goodfellow et al. 2014): the non-saturating pair ``L_D = softplus(D(fake)) + softplus(-D(real))``,
``L_G = softplus(-D(G(z)))``, for the critic's bottleneck head and the pixel-space discriminator, with R1 on real
data (Mescheder et al. 2018, Eq. 9).

Score-implicit matching (SiD, Zhou et al. 2024; Uni-Instruct, Wang et al. 2025): the Fisher-divergence branch, with
its gradient through the teacher and fake-score networks (:func:`score_implicit_loss`).

PSO (Miao et al. ICLR 2025; Diffusion-DPO, Wallace et al. 2024): ``-log sigmoid(beta * margin)`` over pairs
(:func:`pso_loss`). sCM's continuous-time consistency loss (Lu & Song 2024; rCM) (:func:`scm_loss`). LPIPS (Zhang et
al. 2018) for DMD's regression loss (Eq. 9) when asked for.

The objectives (dmd.py, fdistill.py, decoupled_dmd.py, pixel_gan.py, pso.py, rcm.py) compute their inputs and call
these, imported from here.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schedules import _bcast


# -- distribution matching (DMD / DMD2, Decoupled DMD) ------------------------------------------------
def _dmd2_norm(x32: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1): DMD2's per-sample normaliser ``mean_{C,H,W} |x - mu_real|`` (floored at 1e-8)."""
    return (x32.detach() - real_x0.float()).abs().mean(dim=tuple(range(1, x32.ndim)), keepdim=True).clamp_min(1e-8)


def _finite(g: torch.Tensor) -> torch.Tensor:
    """x == mu_real exactly gives 0/0: no signal, so a zero gradient rather than inf/NaN. Non-finite *scores*
    are another matter: :func:`nonfinite_frac` counts them and the trainer stops past a tolerance."""
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def nonfinite_frac(*scores: torch.Tensor) -> float:
    """Fraction of NaN / inf elements over the score tensors (teacher / critic x0) of a DM gradient. Logged
    as ``dm_nonfinite_frac``; the trainer stops past ``train.nonfinite_tolerance`` (a NaN teacher or an
    infinite guidance scale would otherwise train on zeroed gradients)."""
    bad = sum(int((~torch.isfinite(s)).sum()) for s in scores)
    return bad / max(sum(s.numel() for s in scores), 1)


def _grad_surrogate(x32: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 ||x - sg(x - grad)||^2`` (mean): its gradient w.r.t. x is ``grad / numel``."""
    return 0.5 * F.mse_loss(x32, (x32 - grad).detach(), reduction="mean")


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_DM and the (detached) gradient direction, in fp32, NaN-safe (see module docstring). ``weight`` (B,)
    scales each sample's direction: f-distill's h(r) (:mod:`stepdistill.trainers.divergences`); None = DMD."""
    x32 = x.float()
    p_real = x32.detach() - real_x0.float()
    p_fake = x32.detach() - fake_x0.float()
    grad = _finite((p_real - p_fake) / _dmd2_norm(x32, real_x0))
    if weight is not None:
        grad = grad * weight.to(grad).view(-1, *([1] * (grad.ndim - 1)))
    return _grad_surrogate(x32, grad), grad


def decoupled_dm_loss(x: torch.Tensor, dm_real: tuple[torch.Tensor, torch.Tensor], fake_x0: torch.Tensor,
                      ca_real: tuple[torch.Tensor, torch.Tensor], w: float, dm_term_weight: float = 1.0,
                      ca_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled DMD loss (module docstring), fp32, NaN-safe.

    ``dm_real = (mu_c, mu_u)`` and ``fake_x0`` at the DM term's noised sample, ``ca_real = (mu_c', mu_u')``
    at the CA term's (all (B, C, H, W), detached)::

        g_dm = (mu_fake - mu_c) / n_dm,            n_dm = mean_CHW |x - (mu_u + w (mu_c - mu_u))|
        g_ca = -(w - 1)(mu_c' - mu_u') / n_ca,     n_ca = mean_CHW |x - (mu_u' + w (mu_c' - mu_u'))|
        L    = dm_term_weight * 0.5 ||x - sg(x - g_dm)||^2 + ca_weight * 0.5 ||x - sg(x - g_ca)||^2   (means)

    so d L / d x = (dm_term_weight g_dm + ca_weight g_ca) / numel. Same sample, unit weights:
    g_dm + g_ca = (mu_fake - mu_real) / n, DMD2's ``grad`` of :func:`dm_loss`.
    Returns ``(L, {"dm_term_loss", "ca_loss", "g_dm", "g_ca"})`` (gradients detached).
    """
    x32 = x.float()

    def norm(c, u):  # DMD2's normaliser with the guided teacher at this sample
        return _dmd2_norm(x32, u.float() + w * (c.float() - u.float()))

    (dc, du), (cc, cu) = dm_real, ca_real
    g_dm = _finite((fake_x0.float() - dc.float()) / norm(dc, du))
    g_ca = _finite(-(w - 1.0) * (cc.float() - cu.float()) / norm(cc, cu))
    l_dm, l_ca = _grad_surrogate(x32, g_dm), _grad_surrogate(x32, g_ca)
    return dm_term_weight * l_dm + ca_weight * l_ca, {"dm_term_loss": l_dm, "ca_loss": l_ca, "g_dm": g_dm, "g_ca": g_ca}


# -- score-implicit matching (SiD, Uni-Instruct) -------------------------------------------------------
def score_implicit_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float = 0.5,
                        log_r: torch.Tensor | None = None, divergence: str = "reverse_kl", normalise: bool = True
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """The score-implicit generator loss: SiD's (Zhou et al. ICML 2024, "Score identity Distillation", Eq. 23 and
    the authors' loss) and, for an f other than reverse KL, its Uni-Instruct generalisation (Wang et al. 2025,
    arXiv 2505.20755: the f-weighted Fisher branch of the diffusion-expanded f-divergence).

    ``x`` = G(z) (B, C, H, W) with grad; ``real_x0`` = f_psi(x_t) (teacher, guided) and ``fake_x0`` = f_phi(x_t)
    (fake score) at ``x_t = alpha_t x + sigma_t eps``, evaluated **with the graph through x_t** (their weights
    frozen); ``log_r`` (B,) the log density ratio log p_t(x_t) / q_t(x_t), also **with its graph through x_t** (the
    discriminator's logit; None: reverse KL, h = 1). With u = f_psi - f_phi and sums over C, H, W::

        B_b  = 2 u . (f_psi - x) - 2 alpha ||u||^2          # 2 x SiD's loss (alpha: SiD's alpha)
        L_b  = h(r) B_b - r h'(r) ||u||^2                   # h(r) = f''(r) r^2 (f-distill's weight)
        L    = mean_b  L_b / (n_b C H W),     n_b = mean_CHW |x - f_psi|  (detached; SiD's / DMD2's normaliser)

    At ``alpha = 0.5``, with an exact fake score and ratio, the gradient of L_b (n = 1) is exactly the gradient of
    the f-weighted Fisher divergence E_{q_t}[h(r) ||f_psi - f_q||^2] with respect to the generator. Our derivation:
    its first variation in q is (h + r h') ||u||^2 + (2 sigma^2 / alpha_t) h (div u + u . s_q); Tweedie's
    identity E[x | x_t] = f_q(x_t) gives the fake-score terms by the path derivative of 2 h u . (f_psi - x); the
    path derivative of h(r(x_t)) (through the ratio's own graph) and of r h'(r) ||u||^2 supply the rest. Checked
    against autograd of the closed form on 1-D and 2-D Gaussians (tests/test_score_implicit.py). The ratio's graph
    is what carries the score-difference ("Diff-Instruct") part of the gradient that Uni-Instruct adds to SiD's.

    For reverse KL (h = 1) it is SiD's loss times 2; SiD's recommended alpha = 1.2 adds (0.5 - alpha) times the
    gradient of ||u||^2 taken through x_t only. By the de Bruijn identity d/dt D_f(p_t || q_t) =
    -(g^2 / 2) E_{q_t}[h(r) ||s_p - s_q||^2], integrating this branch over t is the diffusion-expanded
    f-divergence. With ``normalise`` the f-weights are divided by the batch mean of h (detached), as f-distill does
    (:func:`stepdistill.trainers.divergences.f_weights`).
    """
    from .divergences import h_derivatives

    dims = tuple(range(1, x.ndim))
    numel = x[0].numel()
    f_p, f_q, x32 = real_x0.float(), fake_x0.float(), x.float()
    u = f_p - f_q
    uu = (u * u).sum(dims)                                           # (B,)
    b = 2 * (u * (f_p - x32)).sum(dims) - 2 * alpha * uu             # (B,)
    logs: dict[str, float] = {}
    if log_r is None or divergence == "reverse_kl":
        per = b
    else:
        r = torch.exp(log_r.double())
        h, h1 = h_derivatives(r, divergence)
        h, rh1 = h.float(), (r * h1).float()
        scale = h.detach().mean().clamp_min(1e-12) if normalise else torch.ones((), device=x.device)
        per = (h / scale) * b - (rh1 / scale) * uu
        w = (h / scale).detach()
        logs.update({"si_weight_min": float(w.min()), "si_weight_max": float(w.max())})
    n = (x32.detach() - f_p.detach()).abs().mean(dims).clamp_min(1e-5) if normalise else torch.ones_like(uu)
    loss = (per / (n * numel)).mean()
    logs.update({"si_loss": float(loss.detach()), "si_score_gap": float((uu.detach() / numel).mean())})
    return loss, logs


# -- GAN terms (DMD2 Eq. 3): the critic's head and the pixel discriminator ---------------------------
def nonsaturating_d_loss(logit_fake: torch.Tensor, logit_real: torch.Tensor, loss_key: str,
                         acc_prefix: str = "") -> tuple[torch.Tensor, dict[str, float]]:
    """Non-saturating discriminator loss softplus(D(fake)) + softplus(-D(real)) (Goodfellow et al. 2014;
    DMD2 Eq. 3) from logits, with the loss and each side's accuracy for the logs (``loss_key``,
    ``{acc_prefix}d_real_acc``, ``{acc_prefix}d_fake_acc``). Shared by the critic's head and the pixel D."""
    loss = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
    return loss, {loss_key: loss.item(), f"{acc_prefix}d_real_acc": (logit_real > 0).float().mean().item(),
                  f"{acc_prefix}d_fake_acc": (logit_fake < 0).float().mean().item()}


def gan_d_loss(head, f_fake: torch.Tensor, f_real: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Discriminator loss softplus(D(fake)) + softplus(-D(real)) (DMD2 Eq. 3) on bottleneck features,
    plus the head's accuracy on each side for the logs."""
    return nonsaturating_d_loss(head(f_fake.float()), head(f_real.float()), "gan_d_loss")


def pixel_d_loss(disc: nn.Module, fake: torch.Tensor, fake_labels, real: torch.Tensor, real_labels,
                 r1: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The pixel discriminator's L_D (trainers/pixel_gan.py) on detached generator samples and real images, plus
    R1 ``(gamma / 2) E ||grad_x D(x)||^2`` on real data when ``r1`` > 0, and logs."""
    real = real.detach().float().requires_grad_(r1 > 0)
    logit_fake = disc(fake.detach(), fake_labels)
    logit_real = disc(real, real_labels)
    loss, logs = nonsaturating_d_loss(logit_fake, logit_real, "pixel_d_loss", "pixel_")
    if r1 > 0:  # R1 on real data (Mescheder et al. 2018, Eq. 9): (gamma / 2) E ||grad_x D(x)||^2
        (g,) = torch.autograd.grad(logit_real.sum(), real, create_graph=True)
        pen = g.pow(2).flatten(1).sum(1).mean()
        loss = loss + 0.5 * r1 * pen
        logs["pixel_d_r1"] = pen.item()
    return loss, logs


def pixel_g_loss(disc: nn.Module, x: torch.Tensor, labels) -> torch.Tensor:
    """L_G = softplus(-D(x)) (mean), differentiable w.r.t. the generator sample x."""
    return F.softplus(-disc(x, labels)).mean()


# -- PSO (pairwise sample optimisation) ---------------------------------------------------------------
def pso_loss(err_theta_tgt: torch.Tensor, err_ref_tgt: torch.Tensor, err_theta_ref: torch.Tensor,
             err_ref_ref: torch.Tensor, weights: torch.Tensor, beta: float, anchor: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PSO / Diffusion-DPO loss (module docstring) from (B, K) errors; returns (loss, margin (B,)).

    ``margin = Delta(x^tgt) - Delta(x^ref) - anchor * sum_k w_k max(0, err_theta_tgt - err_ref_tgt)`` with
    ``Delta(x) = sum_k w_k (err_ref - err_theta)`` (the last term: DPO-Positive, 0 by default)."""
    w = weights.to(err_theta_tgt)
    margin = ((err_ref_tgt - err_theta_tgt) - (err_ref_ref - err_theta_ref)) @ w
    if anchor > 0:
        margin = margin - anchor * (F.relu(err_theta_tgt - err_ref_tgt) @ w)
    return -F.logsigmoid(beta * margin).mean(), margin


# -- consistency (sCM / rCM) ----------------------------------------------------------------------------
def scm_loss(f: torch.Tensor, f_minus: torch.Tensor, f_teacher: torch.Tensor, x_s: torch.Tensor, dfdt: torch.Tensor,
             s: torch.Tensor, warm: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sCM's continuous-time consistency loss on the TrigFlow view, with its tangent warm-up and normalisation (Lu &
    Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", Eq. 8 and Sec. 4.2; as used
    by rCM, Zheng et al. 2025)::

        g = -cos(s) sqrt(1 - r^2 sin(s)^2) (F_minus - F_teacher) - r (cos(s) sin(s) x_s + dF/dt)
        g <- g / (||g|| + c)                                   # per sample (tangent normalisation)
        L = 0.5 * mean || F - F_minus - g ||^2                 # d L / d F = F - F_minus - g: a step along -g

    ``f``: the student's F(x_s, s) with grad; ``f_minus`` (detached) its value, ``f_teacher`` the teacher's
    (guided) F, ``dfdt`` the JVP tangent dF/dt along the teacher's ODE (:mod:`stepdistill.trigflow`), all
    (B, C, H, W) float32; ``s`` (B,) the TrigFlow times (float64: the products are formed before the cast);
    ``warm`` = r in [0, 1]; ``norm_eps`` = c. Returns (L, g)."""
    cs, sn = torch.cos(s), torch.sin(s)
    b = lambda v: _bcast(v, f_minus)  # noqa: E731 - (B,) -> (B, 1, 1, 1) float32
    g = -b(cs) * torch.sqrt(1 - warm**2 * b(sn) ** 2) * (f_minus - f_teacher) - warm * (b(cs * sn) * x_s + dfdt)
    g = torch.nan_to_num(g)
    g = g / (g.flatten(1).norm(dim=1).view(-1, *[1] * (g.ndim - 1)) + norm_eps)
    return 0.5 * ((f - f_minus - g) ** 2).mean(), g


# -- perceptual distance -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _lpips_net():
    """The LPIPS VGG network (Zhang et al. 2018), built once on first use (optional dependency)."""
    try:
        import lpips
    except ImportError as e:
        raise RuntimeError("dmd.regression_distance=lpips needs the 'lpips' package (pip install lpips)") from e
    return lpips.LPIPS(net="vgg").eval().requires_grad_(False)


def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS(a, b) (mean over the batch; Zhang et al. 2018), for DMD's regression loss with
    ``dmd.regression_distance=lpips`` (DMD Eq. 9 uses LPIPS). Grey images are repeated to 3 channels and small
    ones upsampled to 224 px, the network's training size."""
    net = _lpips_net().to(a.device)
    rep = (lambda x: x.repeat(1, 3, 1, 1)) if a.shape[1] == 1 else (lambda x: x)
    up = (lambda x: F.interpolate(x, size=224, mode="bilinear")) if a.shape[-1] < 64 else (lambda x: x)
    return net(up(rep(a.float())), up(rep(b.float()))).mean()
