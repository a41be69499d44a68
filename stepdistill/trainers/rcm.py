"""rCM: score-regularised continuous-time consistency distillation (Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency", arXiv 2510.08431; code NVlabs/rcm).

sCM (Lu & Song 2024, arXiv 2410.11081) trains the student's TrigFlow velocity F_theta (stepdistill/trigflow.py)
to make f_theta(x_s, s) = cos(s) x_s - sin(s) F_theta(x_s, s) constant along the teacher's probability-flow
ODE dx_s/ds = F_teacher. On real data x0, eps ~ N(0, I) and s = arctan(sigma), sigma ~ LogNormal(P_mean, P_std)
(sCM's time law, sigma_data = 1):

    x_s = cos(s) x0 + sin(s) eps
    dF/ds along the ODE   = jvp(F_theta, (x_s, s), (cos s sin s F_teacher, cos s sin s)) / (cos s sin s)
    g    = -cos(s) sqrt(1 - r^2 sin^2 s) (F_theta^- - F_teacher) - r cos(s) sin(s) (x_s + dF/ds)      (sCM Eq. 8,
           with the tangent warm-up r = min(1, step / tangent_warmup_steps) and the JVP rearrangement, Sec. 5.1)
    g   <- g / (||g||_2 + 0.1)                                   (per-sample tangent normalisation, Sec. 4.2)
    L_sCM = scm_weight * 0.5 * mean (F_theta - F_theta^- - g)^2  (F^-: stop-gradient; grad wrt F = -g)

``0.5 * mean`` is the scaling of our DM surrogate (:func:`~stepdistill.trainers.losses.dm_loss`), so ``scm_weight``
= 100 with the DM term at weight 1 keeps rCM's ratio (its ``loss_scale`` 100, ``loss_scale_dmd`` 1, both sums).

sCM alone is mode-covering and soft; rCM adds DMD's reverse-divergence score distillation as a regulariser
(after the tangent warm-up, as the authors' code does): the student's few-step samples (backward
simulation), noised, pulled along mu_fake - mu_real (dmd.py ``dm_loss``), with the critic (fake score)
trained on them. ``rcm.dmd_weight: 0`` is plain sCM (no critic). No GAN: ``dmd.gan`` must be false.

Multi-step sampling is the student chain at ``dmd.student_timesteps`` (the paper's TrigFlow times
[pi/2, 1.5, 1.4, 1.0] for 4 steps are VP t = [999, 954, 889, 633] on our cosine schedule), exported through
the same diffusers folder and ``StepDistillPipeline``.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch

from ..schedules import _bcast
from ..trigflow import TrigFlow, tangent
from .objective import Ctx
from .dmd import DMDConfig, DMDObjective, check_dmd_section
from .losses import scm_loss


class RCMObjective(DMDObjective):
    """rCM as an Objective: sCM on real data + (after the tangent warm-up) DMD's DM term on student samples."""

    def __init__(self, *args, rcm: RCMConfig, **kw):
        super().__init__(*args, **kw)
        self.rcm = rcm
        self.trig_teacher, self.trig_student = TrigFlow(self.teacher), TrigFlow(self.student)
        T = self.teacher.schedule.num_train_timesteps
        self.s_min, self.s_max = self.trig_teacher.s_range(1, T - 1)

    def dmd_active(self, step: int) -> bool:
        return self.rcm.dmd_weight > 0 and step >= self.rcm.tangent_warmup_steps

    def updates(self, step: int) -> list[str]:
        if not self.dmd_active(step):  # sCM alone needs no critic
            return ["generator"]
        return ["critic"] * self.cfg.critic_updates + ["generator"]

    def sample_s(self, ctx: Ctx) -> torch.Tensor:
        """sCM's training times s = arctan(sigma), log sigma ~ N(P_mean, P_std^2), inside the schedule's range."""
        n = torch.randn(ctx.global_batch, generator=ctx.gen, dtype=torch.float64)
        s = torch.atan(torch.exp(self.rcm.p_mean + self.rcm.p_std * n))
        return ctx._slice(s.clamp(self.s_min, self.s_max))

    def scm_loss(self, ctx: Ctx) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.rcm
        x0, labels = ctx.real_batch()
        cond = self.conds.real_cond(labels)
        s = self.sample_s(ctx)                                             # (B,) float64
        eps = ctx.randn(*self.shape)
        cs, sn = torch.cos(s), torch.sin(s)
        b = lambda v: _bcast(v, x0.float())  # noqa: E731 - (B,) -> (B, 1, 1, 1) float32
        x_s = b(cs) * x0.float() + b(sn) * eps
        with torch.no_grad():
            f_teacher = self.trig_teacher.F(x_s, s, cond, self.cfg.real_guidance_scale).float()
        tx, ts = b(cs * sn) * f_teacher, (cs * sn)                        # the ODE direction, rescaled (Sec. 5.1)
        f_minus, t_f, how = tangent(lambda x, t: self.trig_student.F(x, t, cond), x_s, s, tx, ts, r.tangent,
                                    r.fd_size, module=self.student.backbone)
        f_minus, t_f = f_minus.detach().float(), t_f.detach().float()
        warm = min(1.0, ctx.step / r.tangent_warmup_steps) if r.tangent_warmup_steps > 0 else 1.0
        f = self.trig_student.F(x_s, s, cond).float()                     # with grad
        l_scm, g = scm_loss(f, f_minus, f_teacher, x_s, t_f, s, warm, r.norm_eps)
        return r.scm_weight * l_scm, {"scm_loss": l_scm.item(), "scm_g_abs": g.abs().mean().item(),
                                      "tangent_warmup": warm, "tangent_fd": float(how == "fd")}

    def generator_loss(self, ctx: Ctx):
        total, logs = self.scm_loss(ctx)
        if self.dmd_active(ctx.step):
            l_dmd, dlogs = super().generator_loss(ctx)
            total = total + self.rcm.dmd_weight * l_dmd
            logs.update({f"dmd_{k}" if not k.startswith("dm") else k: v for k, v in dlogs.items()})
        logs["generator_loss"] = total.item()
        return total, logs


def rcm_times(mid_s: list[float], trig: TrigFlow) -> list[float]:
    """VP/flow timesteps of the paper's TrigFlow sampling times (pi/2 first), for ``dmd.student_timesteps``."""
    s = torch.tensor([math.pi / 2 - 1e-4, *mid_s], dtype=torch.float64)
    return [float(round(float(t))) for t in trig.t_of_s(s)]


def build_rcm(cfg, teacher=None, meta=None, data=None, text_bank=None):
    """The DMD family's players with the rCM objective."""
    from .dmd_method import build_dmd_family

    return build_dmd_family(cfg, teacher, meta, data, text_bank,
                            make_objective=lambda *a, **k: RCMObjective(*a, rcm=cfg.rcm, **k))


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
@dataclass
class RCMConfig:
    """rCM (Zheng et al. 2025; method: rcm): sCM on the TrigFlow view of the student + DMD's DM term as a
    regulariser (stepdistill/trainers/rcm.py). ``dmd.*`` keeps the teacher, guidance, critic and timesteps."""
    scm_weight: float = 100.0      # rCM's loss_scale (our DM surrogate's scaling: see trainers/rcm.py)
    dmd_weight: float = 1.0        # the DMD regulariser; 0 = plain sCM (no critic)
    tangent: str = "auto"          # auto (JVP, plain attention; finite differences if an op lacks forward AD) | jvp | fd
    fd_size: float = 1.0e-3        # finite-difference step in TrigFlow time
    tangent_warmup_steps: int = 100  # r = min(1, step / N) in sCM's tangent; DMD starts after it
    p_mean: float = -0.8           # sCM's time law: s = arctan(sigma), log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    norm_eps: float = 0.1          # tangent normalisation g / (||g|| + norm_eps)


def check_rcm(cfg, check) -> None:
    """``method: rcm`` (trainers/rcm.py)."""
    d, rc = cfg.dmd, cfg.rcm
    check_dmd_section(cfg, check)
    check(not d.gan, "dmd.gan", "must be false with method rcm (rCM needs no GAN)")
    check(rc.tangent in ("auto", "jvp", "fd"), "rcm.tangent", "must be auto | jvp | fd")
    check(rc.fd_size > 0, "rcm.fd_size", "must be > 0")
    check(rc.tangent_warmup_steps >= 0, "rcm.tangent_warmup_steps", "must be >= 0")
    check(rc.p_std > 0, "rcm.p_std", "must be > 0")
    check(rc.norm_eps > 0, "rcm.norm_eps", "must be > 0")


CARD = ("rCM (score-regularised continuous-time consistency; Zheng et al. 2025)",
    "Continuous-time consistency distillation (sCM, Lu & Song 2024) on the TrigFlow view of the teacher: "
    "the student's velocity is trained, with a Jacobian-vector-product tangent, to stay constant along "
    "the teacher's probability-flow ODE, plus DMD's score-distillation term as a reverse-divergence "
    "regulariser.")


def _method():
    from ..methods import Method
    from .dmd_method import export_generator, generator_ema

    return Method("rcm", build=build_rcm, ema_modules=generator_ema, export=export_generator, curve=True,
                  description="rCM (Zheng et al. 2025): sCM on TrigFlow + DMD regulariser",
                  sections={"dmd": DMDConfig, "rcm": RCMConfig}, checks=check_rcm, card=CARD)


METHOD = _method()
