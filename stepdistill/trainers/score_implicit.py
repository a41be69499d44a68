"""SiD and Uni-Instruct: the score-implicit (Fisher) branch beside DMD's score-difference branch.

* **SiD** (Zhou, Zheng, Wang, Yin, Huang, ICML 2024, "Score identity Distillation: Exponentially Fast Distillation
  of Pretrained Diffusion Models for One-Step Generation", Eq. 23; code mingyuanzhou/SiD): the generator minimises
  the Fisher divergence between the teacher's and its own noised distributions, E_{q_t} ||f_psi - f_phi||^2 in x0
  units. Tweedie's identity turns the term that depends on the (implicit) fake score into one on the generator's
  own sample, so the loss ``(f_psi - f_phi) . ((f_psi - x) - alpha (f_psi - f_phi))`` is back-propagated **through
  the teacher and the fake score** (their weights frozen) into x. SiDA (Zhou et al. 2025) adds the GAN head on the
  fake score's encoder: here ``dmd.gan``. alpha = 1.2 is the authors' default; 0.5 is the exact Fisher gradient.
* **Uni-Instruct** (Wang et al. 2025, "Uni-Instruct: One-step Diffusion Model through Unified Diffusion
  Divergence Instruction", arXiv 2505.20755): minimises the diffusion-expanded f-divergence
  int w(t) D_f(p_t || q_t) dt. Its gradient mixes two branches, each weighted by f through the density ratio
  r = p_t / q_t (from the discriminator on the fake score's encoder, as f-distill reads it):

  - the **score-difference** branch (Diff-Instruct / DMD; with h(r) = f''(r) r^2, f-distill's Thm. 1): DMD's
    gradient weighted by h(r) (:func:`~stepdistill.trainers.losses.dm_loss`), weight ``sid.di_weight``;
  - the **score-implicit** branch (SiD / SIM): the gradient of the f-weighted Fisher divergence
    E_{q_t}[h(r) ||s_p - s_q||^2], whose integral over t is the expanded divergence by the de Bruijn identity
    (:func:`~stepdistill.trainers.losses.score_implicit_loss`: exact when the ratio's own gradient, here the
    discriminator's, is kept in the graph), weight ``sid.si_weight``.

Selected by ``method: sid`` (reverse KL, score-implicit branch only, alpha 1.2) or ``method: uni_instruct``
(``dmd.divergence`` reverse_kl | forward_kl | js; both branches; alpha 0.5). Everything else is DMD2's (critic,
GAN head, two time-scale rule, regression, pixel discriminator: the ``dmd`` section). ``uni_instruct`` with
``dmd.divergence: reverse_kl`` and ``sid.si_weight: 0`` is DMD2 bit for bit (tests/test_score_implicit.py).

Cost: the score-implicit branch runs the teacher and the fake score once more with their graphs and
back-propagates through both (SiD's price over DMD).
"""
from __future__ import annotations

from dataclasses import dataclass

from .divergences import f_weights
from .dmd import DMDConfig, DMDObjective, check_dmd_section
from .fdistill import ratio_logits
from .losses import nonfinite_frac, score_implicit_loss
from .objective import Ctx


class ScoreImplicitObjective(DMDObjective):
    """DMD2 whose DM term is ``di_weight`` x the (f-weighted) score-difference loss + ``si_weight`` x the
    score-implicit loss (module docstring)."""

    def __init__(self, *args, sid: "SiDConfig", **kw):
        super().__init__(*args, **kw)
        self.sid = sid

    def dm_term(self, ctx: Ctx, x, x_t, t, cond, k: int, real_x0, fake_x0, logits, weight=None):
        c, s = self.cfg, self.sid
        logs: dict[str, float] = {}
        ratio = c.divergence != "reverse_kl"
        if ratio:  # f-distill's weights from the GAN head at this x_t, for the score-difference branch
            logits = ratio_logits(self, x_t, t, cond, logits)
            weight = f_weights(logits, c.divergence, c.divergence_logit_clip)
            logs.update({"f_weight_min": weight.min().item(), "f_weight_max": weight.max().item()})
        total = None
        if s.di_weight > 0:  # score difference (DMD / f-distill); weight 1: the very same tensor as DMD2's
            l_di, di_logs = super().dm_term(ctx, x, x_t, t, cond, k, real_x0, fake_x0, logits, weight)
            total = l_di if s.di_weight == 1.0 else s.di_weight * l_di
            logs.update(di_logs)
        if s.si_weight > 0:  # score-implicit: teacher and fake score again, now with their graphs through x_t
            real_g = self.teacher(x_t, t, cond, guidance_scale=c.real_guidance_scale)
            log_r = None
            if ratio:  # one critic pass gives the fake score and the discriminator's features, both with graphs
                fake_g, feats = self.critic.x0_and_features(x_t, t, cond)
                lim = c.divergence_logit_clip
                log_r = self.head(feats.float()).clamp(-lim, lim)
            else:
                fake_g = self.critic(x_t, t, cond, guidance_scale=c.fake_guidance_scale)
            l_si, si_logs = score_implicit_loss(x, real_g, fake_g, s.alpha, log_r, c.divergence)
            total = s.si_weight * l_si if total is None else total + s.si_weight * l_si
            logs.update(si_logs)
            logs["si_nonfinite_frac"] = nonfinite_frac(real_g.detach(), fake_g.detach())
        return total, logs


def build_score_implicit(cfg, teacher=None, meta=None, data=None, text_bank=None):
    """The DMD family's players (teacher, student, critic with its GAN head) with the score-implicit objective."""
    from .dmd_method import build_dmd_family

    return build_dmd_family(cfg, teacher, meta, data, text_bank,
                            make_objective=lambda *a, **k: ScoreImplicitObjective(*a, sid=cfg.sid, **k))


# -- the methods' config sections, checks and cards (their one home; stepdistill/methods.py) ---------------
@dataclass
class SiDConfig:
    """``method: sid`` (SiD; trainers/score_implicit.py): the score-implicit branch alone. The ``dmd`` section
    keeps the teacher, guidance, critic (fake score), GAN (SiDA) and timesteps; ``dmd.dm_weight`` scales the
    whole distribution-matching term."""
    alpha: float = 1.2        # SiD's alpha: (f_psi - f_phi).((f_psi - x) - alpha (f_psi - f_phi)); 0.5 = exact Fisher
    si_weight: float = 1.0    # the score-implicit (Fisher) branch
    di_weight: float = 0.0    # the score-difference (DMD) branch


@dataclass
class UniInstructConfig(SiDConfig):
    """``method: uni_instruct`` (trainers/score_implicit.py): both branches under ``dmd.divergence``'s f."""
    alpha: float = 0.5
    si_weight: float = 1.0
    di_weight: float = 1.0


def check_sid(cfg, check) -> None:
    """``method: sid`` / ``uni_instruct``: the DMD section's ranges (f-divergences and the pixel discriminator
    allowed), no Decoupled DMD, branch weights >= 0 and not both 0."""
    d, s = cfg.dmd, cfg.sid
    check_dmd_section(cfg, check, dm_options=True)
    check(not d.decoupled, "dmd.decoupled", f"is not supported by method {cfg.method}")
    check(d.dm_weight > 0, "dmd.dm_weight", f"must be > 0 with method {cfg.method} (it scales both branches)")
    check(s.alpha >= 0, "sid.alpha", "must be >= 0")
    check(s.si_weight >= 0 and s.di_weight >= 0, "sid.si_weight", "branch weights must be >= 0")
    check(s.si_weight > 0 or s.di_weight > 0, "sid.si_weight", "sid.si_weight and sid.di_weight are both 0")
    if cfg.method == "sid":
        check(d.divergence == "reverse_kl", "dmd.divergence",
              "method sid minimises the Fisher divergence (reverse_kl); for forward_kl / js use method uni_instruct")
    else:
        check(d.divergence == "reverse_kl" or d.gan, "dmd.divergence",
              "forward_kl / js need dmd.gan=true (the discriminator gives the density ratio)")
        check(d.divergence == "reverse_kl" or d.fake_guidance_scale == 1.0, "dmd.fake_guidance_scale",
              "must be 1 with forward_kl / js (one critic pass gives the fake score and the ratio)")


SID_CARD = ("SiD (Score identity Distillation; Zhou et al., ICML 2024)",
    "The one-step student minimises the Fisher divergence between the teacher's and its own noised "
    "distributions: a fake score fitted online to the student's samples, and a generator loss built from the "
    "teacher's and the fake score's denoised estimates at the student's noised sample, back-propagated through "
    "both networks (score identity). A GAN head on the fake score's encoder makes it SiDA.")

UNI_CARD = ("Uni-Instruct (unified diffusion divergence instruction; Wang et al. 2025)",
    "The one-step student minimises a diffusion-expanded f-divergence to the teacher: DMD's score-difference "
    "gradient and SiD's score-implicit (Fisher) gradient, both weighted through the f-divergence by the density "
    "ratio that the discriminator on the fake score's encoder estimates.")


def passes_per_step(cfg) -> int:
    """DMD2's count (:func:`~stepdistill.trainers.dmd_method.dmd_passes_per_step`) plus the score-implicit
    branch's teacher (CFG: 2) and fake-score passes."""
    from .dmd_method import dmd_passes_per_step

    extra = (2 if cfg.dmd.real_guidance_scale != 1.0 else 1) + 1 if cfg.sid.si_weight > 0 else 0
    return dmd_passes_per_step(cfg) + extra


def _method(name: str, section: type, description: str, card: tuple):
    from ..methods import Method
    from .dmd_method import describe_dmd_run, export_generator, generator_ema

    return Method(name, build=build_score_implicit, ema_modules=generator_ema, export=export_generator, curve=True,
                  description=description, sections={"dmd": DMDConfig, "sid": section}, checks=check_sid,
                  card=card, describe_run=describe_dmd_run, passes=passes_per_step)


SID_METHOD = _method("sid", SiDConfig, "SiD (Zhou et al. 2024): score identity distillation, the Fisher divergence",
                     SID_CARD)
UNI_INSTRUCT_METHOD = _method("uni_instruct", UniInstructConfig,
                              "Uni-Instruct (Wang et al. 2025): score-difference + score-implicit branches under an "
                              "f-divergence", UNI_CARD)
