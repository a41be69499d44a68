r"""Phased DMD ("Phased DMD: Few-step Distribution Matching Distillation via Score Matching within
Subintervals", SenseNova 2025) as an Objective for :class:`~stepdistill.trainers.core.Trainer`.

Phases. Boundaries ``s_0 > s_1 > ... > s_K = 0`` on the training-time axis (e.g. ``[999, 500, 0]``,
K = 2) split sampling into K phases; phase k owns ``(s_{k+1}, s_k]`` and has its own *expert*
(a copy of the teacher backbone, one :class:`Player` ``expert_k`` each). The student timesteps are
the phase starts ``s_0..s_{K-1}``. Expert k maps ``x_{s_k}`` to ``x_{s_{k+1}}``: it predicts x0_hat
(through the :class:`~stepdistill.denoiser.Denoiser`) and, for k < K-1, transports it with a
**DDIM step on its own predicted eps**::

    x0_hat, eps_hat = pred_to_x0_eps(expert_k(x_{s_k}, s_k))
    x_{s_{k+1}} = alpha_{s_{k+1}} x0_hat + sigma_{s_{k+1}} eps_hat      (k < K-1; x0_hat for k = K-1)

Why DDIM rather than DMD2's re-noising with fresh noise: (1) it is the VP form of the reference
trainer's "Euler step to sigma_s" (for flow matching schedules it *is* that Euler step); (2) the
intermediate output is then a genuinely noisy sample, not a re-noised x0_hat, and the fake score
can only use what x_s itself implies: exactly the subinterval score matching below (with fresh
re-noising x0_hat would be a valid clean anchor and the subinterval targets would be redundant);
(3) the chain is deterministic given the starting noise, so the noise structure of x_{s_0} is
carried through the phases and the exported pipeline needs no extra randomness
(:func:`stepdistill.pipelines.phased.phased_sample`, shared by training and inference).

Progressive training. ``updates(step)`` picks the phase k from the step count
(``phased.steps_per_phase``, default an even split of ``train.max_steps``): ``critic_k`` x
``dmd.critic_updates`` then ``expert_k``. Inputs of phase k are produced by running the frozen
experts 0..k-1 (no grad) from pure noise. The core sets ``requires_grad`` per updating player, so
earlier experts get no gradient and AdamW leaves them unchanged. Each phase has its own fake
score ``critic_k`` (initialised from the teacher): subintervals are disjoint and each phase has
its own fake distribution, and separate players keep resume exact (no optimizer resets); the cost
is K critic copies in memory (K experts + K critics + teacher). Warm-up (``dmd.optim.warmup_steps``)
counts global steps, so it acts on phase 0 only. EMA (``train.ema_decay``) runs on every expert
every step; a finished expert's weights are constant, so its EMA converges to the frozen weights
that produced the later phases' inputs (decay^steps: 0.95^120 ~ 2e-3 in the shipped config), and
the export (EMA experts) matches training.

Score matching within a subinterval. Write the forward process as ``x_t = a_t x0 + s_t e``
(a = alpha, s = sigma; VP or flow). For t > s (lower SNR)::

    x_t | x_s ~ N(alpha_{t|s} x_s, beta_{t|s}^2 I),   alpha_{t|s} = a_t / a_s,
                                                       beta_{t|s}^2 = s_t^2 - alpha_{t|s}^2 s_s^2
    (VP: beta^2 = 1 - abar_t / abar_s;  flow: alpha_{t|s} = (1 - sigma_t) / (1 - sigma_s))

because x_t = alpha x_s + beta e' = a_t x0 + (alpha s_s e1 + beta e') and the bracket is
N(0, (alpha^2 s_s^2 + beta^2) I) = N(0, s_t^2 I): from x_s ~ p_s the subinterval process gives the
direct forward marginal p_t. With p_t(x_t) = int p(x_t | x_s) p_s(x_s) dx_s (denoising score
matching, Vincent 2011)::

    grad log p_t(x_t) = E[ grad_{x_t} log p(x_t | x_s) | x_t ] = E[ -(x_t - alpha x_s) / beta^2 | x_t ]

A standard eps-predictor at t represents the score as ``-eps / s_t`` (Tweedie), so the fake score
network (a plain x0/eps/v/flow predictor, the teacher's parameterisation) is regressed on::

    eps_target = s_t (x_t - alpha x_s) / beta^2 = (s_t / beta) e'
    x0_target  = (x_t - s_t eps_target) / a_t  = x_s / a_s - a_t s_s^2 / (a_s^2 beta) e'

(the closed form avoids dividing by a small a_t). ``x_t = a_t x0_target + s_t eps_target``
holds by construction and every prediction type is affine in (x0, eps) at fixed (x_t, t), so the
minimiser of ``E || f(x_t, t) - x0_eps_to_pred(x0_target, eps_target) ||^2`` is the native
prediction of the marginal p_t: E[eps_target | x_t] = -s_t grad log p_t(x_t). For the last phase
the anchor is clean data (s = "0": a_s = 1, s_s = 0): alpha = a_t, beta = s_t, eps_target = e',
x0_target = x_s, i.e. DMD's ordinary denoising loss. The target's variance s_t^2 / beta^2 grows
without bound as t -> s, so the per-sample loss is weighted by ``w = beta^2 / s_t^2`` in (0, 1]
(a weight depending on t only keeps the per-t minimiser; w = 1 in the last phase, exactly DMD2's
critic loss) and t >= s + ``phased.margin``. See :func:`subinterval_targets`.

Score times. Phase k < K-1 trains its fake score and evaluates the DM gradient only for
t in [s_{k+1} + margin, min(s_k, dmd.t_max)]: its input already follows the (matched)
distribution at s_k, so only the subinterval is left to match. The last phase uses
[dmd.t_min, min(s_{K-1}, dmd.t_max)].

Distribution-matching gradient. For KL(p_fake,t || p_real,t) over the subinterval the gradient
w.r.t. the expert output x_s is E_t[lambda(t) alpha_{t|s} (grad log p_fake,t - grad log p_real,t)(x_t)] and
grad log p_fake - grad log p_real = (a_t / s_t^2)(x0_fake - x0_real): the DMD2 direction in x0
space. So, as in :func:`~stepdistill.trainers.losses.dm_loss`, ``grad = (x0_fake - x0_real) /
mean|x0_hat - x0_real|`` (teacher x0 with CFG ``dmd.real_guidance_scale``; the per-sample
normaliser uses the expert's clean estimate x0_hat) and ``L_DM = 0.5 || x_s - sg(x_s - grad) ||^2``
flows into the expert through its output x_s (x_s = x0_hat in the last phase: exactly DMD2).

GAN. With ``dmd.gan`` the last phase's critic carries DMD2's :class:`GANHead` (its bottleneck
features, non-saturating losses, real data noised in the same subinterval); earlier phases have
no clean output to discriminate and use the DM loss only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DistillConfig
from ..denoiser import Denoiser
from ..modelcard import phased_card
from ..partitions import even_split  # noqa: F401 (re-exported)
from ..pipelines.phased import MAX_EXPERTS, expert_step, expert_subfolder, phased_sample, route
from ..schedules import NoiseSchedule, _bcast
from .objective import Ctx, ObjectiveBase, Player, real_data_std
from ..conditioning import ClassLabels
from .dmd import DMDConfig, GANHead, check_dmd_section, scores_and_gan_g
from .losses import dm_loss, gan_d_loss, nonfinite_frac

PHASED_PIPELINE = "PhasedDMDPipeline"


# -- subinterval math (pure functions) ----------------------------------------------------------
def subinterval_coefficients(schedule: NoiseSchedule, s, t, batch: int, device=None):
    """(alpha_{t|s}, beta_{t|s}, a_s, s_s, a_t, s_t), each (B,) float64; ``s=None``: clean anchor."""
    t = schedule._t(t, batch, device)
    a_t, s_t = (v.double() for v in schedule.alpha_sigma(t))
    if s is None:
        a_s, s_s = torch.ones_like(a_t), torch.zeros_like(s_t)
    else:
        a_s, s_s = (v.double() for v in schedule.alpha_sigma(schedule._t(s, batch, device)))
    alpha = a_t / a_s
    beta2 = s_t**2 - alpha**2 * s_s**2
    if bool((beta2 <= 0).any()):
        raise ValueError("subinterval times must satisfy t > s (lower SNR at t than at the anchor s)")
    return alpha, beta2.sqrt(), a_s, s_s, a_t, s_t


def subinterval_targets(schedule: NoiseSchedule, x_s: torch.Tensor, eps: torch.Tensor, s, t):
    """Forward process from the anchor x_s (time s) to t > s and the fake score's regression targets.

    Returns ``(x_t, eps_target, x0_target)`` (module docstring)::

        x_t        = alpha_{t|s} x_s + beta_{t|s} eps
        eps_target = s_t (x_t - alpha_{t|s} x_s) / beta_{t|s}^2 = (s_t / beta) eps
        x0_target  = (x_t - s_t eps_target) / a_t = x_s / a_s - a_t s_s^2 / (a_s^2 beta) eps

    ``s``: scalar or (B,) time of the anchor, or ``None`` for a clean anchor (x_s = x0: the usual
    ``x_t = add_noise(x0, eps, t)``, ``eps_target = eps``, ``x0_target = x0``). ``t``: scalar or (B,).
    Differentiable in ``x_s``.
    """
    if s is None:
        return schedule.add_noise(x_s, eps, t), eps, x_s
    alpha, beta, a_s, s_s, a_t, s_t = subinterval_coefficients(schedule, s, t, x_s.shape[0], x_s.device)
    b = lambda v: _bcast(v.to(x_s.device), x_s)  # noqa: E731
    x_t = b(alpha) * x_s + b(beta) * eps
    eps_target = b(s_t / beta) * eps
    x0_target = x_s / b(a_s) - b(a_t * s_s**2 / (a_s**2 * beta)) * eps
    return x_t, eps_target, x0_target


def subinterval_weight(schedule: NoiseSchedule, s, t, batch: int, device=None) -> torch.Tensor:
    """Per-sample loss weight ``beta_{t|s}^2 / s_t^2`` in (0, 1] (1 for a clean anchor), (B,) float32."""
    if s is None:
        return torch.ones(batch, device=device)
    alpha, beta, *_, s_t = subinterval_coefficients(schedule, s, t, batch, device)
    return (beta**2 / s_t**2).float().to(device)


# -- the objective ------------------------------------------------------------------------------
class PhasedDMDObjective(ObjectiveBase):
    """Phased DMD (module docstring). Players ``expert_0..expert_{K-1}`` (EMA) and
    ``critic_0..critic_{K-1}`` (fake scores; the last one also holds the GAN head when ``dmd.gan``).

    Args:
        teacher: frozen real score.
        experts, critics: K Denoisers each (trainable backbones, usually teacher copies).
        cfg: :class:`DMDConfig` (learning rates, guidance, critic_updates, t_min/t_max, GAN).
        phased: :class:`PhasedConfig` (boundaries, margin, weighting).
        steps_per_phase: generator steps of each phase (sums to ``train.max_steps``).
    """

    def __init__(self, teacher: Denoiser, experts: list[Denoiser], critics: list[Denoiser], cfg: DMDConfig,
                 phased: PhasedConfig, num_classes: int, sample_shape: tuple[int, int, int],
                 steps_per_phase: list[int], seed: int = 0, conds=None, data_std: float = 1.0):
        self.teacher, self.experts, self.critics, self.cfg, self.phased = teacher, experts, critics, cfg, phased
        self.teacher.requires_grad_(False).eval()
        self.boundaries = [float(b) for b in phased.boundaries]
        self.K = K = len(self.boundaries) - 1
        self.timesteps = self.boundaries[:-1]
        T = teacher.schedule.num_train_timesteps
        if not (len(experts) == len(critics) == K and len(steps_per_phase) == K):
            raise ValueError(f"{K} phases need {K} experts, critics and steps_per_phase entries")
        if not 0 < self.boundaries[0] < T or self.boundaries[-1] != 0:
            raise ValueError(f"phased.boundaries {self.boundaries} must start in (0, {T}) and end at 0")
        if K > MAX_EXPERTS:
            raise ValueError(f"at most {MAX_EXPERTS} phases are supported, got {K}")
        if cfg.regression_weight > 0 or cfg.regression_warmup_steps > 0:
            raise ValueError("dmd.regression_weight / dmd.regression_warmup_steps (DMD's regression loss) are not "
                             "supported by phased_dmd")
        for k in range(K):
            lo, hi = self.t_range(k)
            if lo > hi:
                raise ValueError(f"phase {k}: empty score-time range [{lo}, {hi}] "
                                 "(check phased.boundaries / phased.margin / dmd.t_min / dmd.t_max)")
        self.steps_per_phase = [int(n) for n in steps_per_phase]
        self.shape = tuple(sample_shape)
        self.conds = conds if conds is not None else ClassLabels(num_classes)  # text teachers: a prompt bank
        self.data_std = float(data_std)  # std of the real data: normalises the collapse guard's diversity
        self.players: dict[str, Player] = {}
        for k, e in enumerate(experts):
            self.players[f"expert_{k}"] = Player.from_optim(e.backbone, cfg.optim, ema=True)
        self.head = None
        for k, c in enumerate(critics):
            mod = nn.ModuleDict({"fake": c.backbone})
            if cfg.gan and k == K - 1:
                with torch.random.fork_rng(devices=[]):  # head init depends on the seed only (as DMD)
                    torch.manual_seed(seed)
                    self.head = GANHead(c.feature_channels, self._feature_spatial(c))
                mod["head"] = self.head
            self.players[f"critic_{k}"] = Player.from_optim(mod, cfg.critic_optim)

    def _feature_spatial(self, critic: Denoiser) -> int:
        with torch.no_grad():
            x = torch.zeros(1, *self.shape)
            cond = torch.zeros(1, dtype=torch.long) if self.conds.num_classes else None
            f = critic.features(x, torch.tensor([self.timesteps[-1]]), cond)
        return f.shape[-1]

    # -- phases -------------------------------------------------------------------------------
    def phase_of(self, step: int) -> int:
        end = 0
        for k, n in enumerate(self.steps_per_phase):
            end += n
            if step < end:
                return k
        return self.K - 1

    def anchor(self, k: int) -> float | None:
        """Time of phase k's output x_s (its phase end), None for the clean last phase."""
        return self.boundaries[k + 1] if k < self.K - 1 else None

    def t_range(self, k: int) -> tuple[float, float]:
        """Score times of phase k: [s_{k+1} + margin, min(s_k, t_max)] ([t_min, ...] for the last)."""
        hi = min(self.boundaries[k], self.cfg.t_max)
        lo = self.boundaries[k + 1] + self.phased.margin if k < self.K - 1 else self.cfg.t_min
        return lo, hi

    def uses_gan(self, k: int) -> bool:
        return self.head is not None and k == self.K - 1

    def updates(self, step: int) -> list[str]:
        k = self.phase_of(step)
        return [f"critic_{k}"] * self.cfg.critic_updates + [f"expert_{k}"]

    # -- generator chain ------------------------------------------------------------------------
    def generate(self, ctx: Ctx, cond, k: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase k's (x0_hat, output): pure noise at s_0 through the frozen experts 0..k-1 (no grad),
        then expert k (with grad if ``grad``). The output is x_{s_{k+1}} (k < K-1) or x0_hat."""
        x = ctx.randn(*self.shape)                                   # x_{s_0}
        with torch.no_grad():
            for j in range(k):
                _, x = expert_step(self.experts[j], x, self.timesteps[j], self.boundaries[j + 1], cond)
        assert route(self.timesteps[k], self.boundaries) == k
        with torch.set_grad_enabled(grad):
            return expert_step(self.experts[k], x, self.timesteps[k], self.anchor(k), cond)

    # -- losses -------------------------------------------------------------------------------
    def loss(self, player: str, ctx: Ctx):
        kind, k = player.rsplit("_", 1)
        return self.generator_loss(ctx, int(k)) if kind == "expert" else self.critic_loss(ctx, int(k))

    def generator_loss(self, ctx: Ctx, k: int):
        c = self.cfg
        cond = self.conds(ctx)
        x0_hat, out = self.generate(ctx, cond, k, grad=True)
        logs = {"phase": float(k)}
        total = torch.zeros((), device=out.device)
        sched, critic = self.teacher.schedule, self.critics[k]
        lo, hi = self.t_range(k)
        t = ctx.sample_t(sched, lo, hi)
        x_t, _, _ = subinterval_targets(sched, out, ctx.randn(*self.shape), self.anchor(k), t)  # keeps grad (GAN)
        l_g, real_x0, fake_x0 = scores_and_gan_g(self.teacher, critic, self.head if self.uses_gan(k) else None,
                                                 x_t, t, cond, c)
        if l_g is not None:
            total = total + c.gan_g_weight * l_g
            logs["gan_g_loss"] = l_g.item()
        if c.dm_weight > 0:
            _, grad = dm_loss(x0_hat.detach(), real_x0, fake_x0)   # DMD2 direction + normaliser
            logs["dm_nonfinite_frac"] = nonfinite_frac(real_x0, fake_x0)
            o = out.float()
            l_dm = 0.5 * F.mse_loss(o, (o - grad).detach(), reduction="mean")
            total = total + c.dm_weight * l_dm
            logs["dm_loss"] = l_dm.item()
            logs["dm_grad_abs"] = grad.abs().mean().item()
        logs["generator_loss"] = total.item()
        logs["sample_std"] = x0_hat.detach().float().std().item()
        return total, logs

    def critic_loss(self, ctx: Ctx, k: int):
        """Fake-score update of phase k: weighted subinterval denoising loss (+ L_D in the last phase)."""
        c = self.cfg
        cond = self.conds(ctx)
        with torch.no_grad():
            _, x_s = self.generate(ctx, cond, k, grad=False)
        critic = self.critics[k]
        sched = critic.schedule
        lo, hi = self.t_range(k)
        t = ctx.sample_t(sched, lo, hi)
        s = self.anchor(k)
        x_t, eps_tgt, x0_tgt = subinterval_targets(sched, x_s, ctx.randn(*self.shape), s, t)
        target = sched.x0_eps_to_pred(x0_tgt, eps_tgt, t, critic.prediction_type)
        gan = self.uses_gan(k)
        if gan:
            pred, f_fake = critic.x0_and_features(x_t, t, cond, output="raw")
        else:
            pred = critic.raw(x_t, t, cond)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        w = subinterval_weight(sched, s, t, per.shape[0], per.device) if self.phased.subinterval_weighting \
            else torch.ones_like(per)
        l_fake = (w * per).mean()
        total, logs = l_fake, {"fake_loss": l_fake.item(), "phase": float(k)}
        if gan:
            real, real_labels = ctx.real_batch()
            t_r = ctx.sample_t(sched, lo, hi)
            xr = sched.add_noise(real, ctx.randn(*self.shape), t_r)
            f_real = critic.features(xr, t_r, self.conds.real_cond(real_labels))  # stops at the bottleneck
            l_d, d_logs = gan_d_loss(self.head, f_fake, f_real)
            total = total + c.gan_d_weight * l_d
            logs.update(d_logs)
        logs["critic_loss"] = total.item()
        return total, logs

    # -- samples ------------------------------------------------------------------------------
    def expert_denoisers(self, modules: dict[str, nn.Module]) -> list[Denoiser]:
        e0 = self.experts[0]
        return [Denoiser(modules[f"expert_{k}"], e0.schedule, e0.prediction_type, e0.null_class) for k in range(self.K)]

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device, noise: torch.Tensor | None = None, cond=None,
               trace: list | None = None) -> torch.Tensor:
        """The training-time sampler (grids): the exported pipeline's chain on the given modules."""
        if noise is None:
            noise = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(1234))
            cond = self.conds.grid(n, device)
        return phased_sample(self.expert_denoisers(ema), self.timesteps, self.boundaries, cond, noise.to(device),
                             trace=trace)


# -- building / export ----------------------------------------------------------------------------
def build_phased_dmd(cfg: DistillConfig, teacher: Denoiser, num_classes: int,
                     shape: tuple[int, int, int], conds=None, data_std: float = 1.0) -> PhasedDMDObjective:
    """K experts and K critics, all initialised from the teacher (called by ``build_method``); ``conds``: a text
    teacher's prompt bank (default: class labels), ``data_std``: the real data's std (collapse guards)."""
    K = len(cfg.phased.boundaries) - 1

    def copy_of_teacher() -> Denoiser:
        d = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type, teacher.null_class)
        d.backbone.train()
        return d

    experts = [copy_of_teacher() for _ in range(K)]
    critics = [copy_of_teacher() for _ in range(K)]
    steps = list(cfg.phased.steps_per_phase) or even_split(cfg.train.max_steps, K)
    return PhasedDMDObjective(teacher, experts, critics, cfg.dmd, cfg.phased, num_classes, shape, steps,
                              seed=cfg.train.seed, conds=conds, data_std=data_std)


def export_phased(experts: list[nn.Module], cfg: DistillConfig, meta, out: Path, schedule=None) -> Path:
    """EMA experts -> one diffusers folder loadable with ``PhasedDMDPipeline.from_pretrained``, written once by
    :func:`~stepdistill.trainers.export.export_student`: expert 0 in ``unet/`` (or ``transformer/``), experts
    1..K-1 in ``expert_k/``; ``model_index.json`` names the pipeline, the experts and the phase boundaries,
    ``stepdistill.json`` gets ``extra.experts`` / ``extra.phase_boundaries``, the card the phased chain.
    """
    from ..denoiser import component_name
    from .export import ExportParts, export_student

    # LoRA experts are views on a shared base: write plain merged networks
    experts = [m.merged() if getattr(m, "is_lora_view", False) is True else m for m in experts]
    out = Path(out)
    bounds = [float(b) for b in cfg.phased.boundaries]
    ts = bounds[:-1]
    if len(experts) != len(ts):
        raise ValueError(f"{len(ts)} phases but {len(experts)} experts")
    cfg_ts = dataclasses.replace(cfg, dmd=dataclasses.replace(cfg.dmd, student_timesteps=ts))
    sub0 = component_name(experts[0])  # "transformer" for SD3 / Flux / DiT experts
    experts_meta = [{"name": f"expert_{k}", "subfolder": expert_subfolder(k) if k else sub0, "timesteps": [ts[k]],
                     "phase": [bounds[k], bounds[k + 1]]} for k in range(len(ts))]
    parts = ExportParts(networks={expert_subfolder(k): m for k, m in enumerate(experts[1:], start=1)},
                        index={"phase_boundaries": bounds}, pipeline=PHASED_PIPELINE,
                        meta={"experts": experts_meta, "phase_boundaries": bounds, "pipeline": PHASED_PIPELINE,
                              "transport": "ddim"},
                        card=phased_card(out, ts, meta))
    return export_student(experts[0], cfg_ts, meta, out, schedule=schedule, parts=parts)


# -- the method (stepdistill/methods.py) -------------------------------------------------------------------
def build(cfg: DistillConfig, teacher: Denoiser | None = None, meta=None, data=None, text_bank=None):
    """Teacher, data and conditions as for DMD (trainers/setup.py), then K experts and K critics."""
    from ..lora import apply_teacher_options
    from .setup import prepare

    s = prepare(cfg, teacher, meta, data, text_bank)
    if s.conds is not None and cfg.dmd.gan:
        raise ValueError("phased_dmd with a text teacher needs dmd.gan=false")
    obj = build_phased_dmd(cfg, s.teacher, s.num_classes, tuple(s.data.images.shape[1:]), conds=s.conds,
                           data_std=real_data_std(s.data))
    apply_teacher_options(obj.teacher, cfg.dmd, s.shared)
    return obj, s.data, s.meta


def _ema(obj) -> dict[str, nn.Module]:
    return {f"expert_{k}": obj.experts[k].backbone for k in range(obj.K)}


def _export(ema, obj, cfg, meta, out):
    return export_phased([ema[f"expert_{k}"] for k in range(obj.K)], cfg, meta, out, schedule=obj.experts[0].schedule)


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
@dataclass
class PhasedConfig:
    """Phased DMD (SenseNova 2025; method: phased_dmd): K phases on the training-time axis, one
    expert per phase, trained progressively. The other hyper-parameters come from ``dmd``."""
    boundaries: list[float] = field(default_factory=lambda: [999.0, 500.0, 0.0])  # s_0 > ... > s_K = 0
    steps_per_phase: list[int] = field(default_factory=list)  # [N_0, ..]; [] splits train.max_steps evenly
    margin: float = 1.0            # score times of phase k < K-1 lie in [s_{k+1} + margin, s_k]
    subinterval_weighting: bool = True  # weight the fake-score loss by beta_{t|s}^2 / sigma_t^2


def check_phased(cfg: DistillConfig, check) -> None:
    """``method: phased_dmd`` (trainers/phased_dmd.py)."""
    check_dmd_section(cfg, check)
    check(not cfg.dmd.critic_init, "dmd.critic_init", "is not supported by method phased_dmd (one critic per phase, "
          "each fitted to its own expert)")
    b, n, K, tr = cfg.phased.boundaries, cfg.phased.steps_per_phase, len(cfg.phased.boundaries) - 1, cfg.train
    check(K >= 1 and all(x > y for x, y in zip(b, b[1:])) and b[-1] == 0, "phased.boundaries",
          "needs >= 2 strictly decreasing entries ending at 0, e.g. [999, 500, 0]")
    check((len(n) == K and min(n) >= 1 and sum(n) == tr.max_steps) if n else tr.max_steps >= K,
          "phased.steps_per_phase", f"needs {K} entries >= 1 summing to train.max_steps ({tr.max_steps}), "
          f"or [] for an even split of train.max_steps (>= {K})")
    check(cfg.phased.margin > 0, "phased.margin", "must be > 0")


CARD = ("Phased DMD (distribution matching per SNR phase)",
    "The noise range is split into phases; each student step is distilled with distribution matching "
    "restricted to its phase, giving a few-step student whose steps specialise.")


def _method():
    from ..methods import Method

    return Method("phased_dmd", build=build, ema_modules=_ema, export=_export, pipeline=PHASED_PIPELINE,
                  description="Phased DMD: one expert per phase of the SNR range",
                  sections={"dmd": DMDConfig, "phased": PhasedConfig}, checks=check_phased, card=CARD)


METHOD = _method()
