"""DMD and DMD2 objectives.

* DMD  (Yin et al. 2023, "One-step Diffusion with Distribution Matching Distillation"):
  distribution-matching gradient (Eq. 7) + regression loss on teacher ODE pairs (Eq. 9).
* DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"):
  no regression, two time-scale update rule (Sec. 4.1), GAN loss on the fake score's bottleneck
  (Sec. 4.2, Eq. 3), multi-step students trained with backward simulation (Sec. 4.3).

Players: ``generator`` (the student G) and ``critic`` (the fake score mu_fake plus the GAN
classifier head). The real score mu_real (the teacher) is frozen and is not a player.
All three see the data only through :class:`~stepdistill.denoiser.Denoiser`, so any backbone
family works.

Distribution-matching gradient (DMD Eq. 7, with DMD2's normalisation, authors' code)::

    x = G(z)                                     # (B, C, H, W) the student's clean sample
    x_t = alpha_t x + sigma_t eps,  t ~ U[t_min, t_max]
    p_real = x - mu_real(x_t, t, c; w)           # teacher x0 with CFG scale w
    p_fake = x - mu_fake(x_t, t, c)
    grad = (p_real - p_fake) / mean_{C,H,W} |p_real|          # per-sample normaliser
    L_DM = 0.5 * || x - stopgrad(x - grad) ||^2  (mean)       # d L_DM / d x = grad / numel

The gradient of ``L_DM`` w.r.t. x is proportional to ``mu_fake - mu_real``: it moves the
student's samples toward the teacher's denoised estimate and away from the critic's.

Variants that change only the DM term are objectives of their own: :mod:`~stepdistill.trainers.fdistill`
(f-divergence weights, ``dmd.divergence``) and :mod:`~stepdistill.trainers.decoupled_dmd` (``dmd.decoupled``);
the method records (build, export) are in :mod:`~stepdistill.trainers.dmd_method`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning import ClassLabels
from ..config import OptimConfig, SharedDistillConfig, dmd2_optim
from ..denoiser import Denoiser
from ..pipelines.sampling import grid_sample
from .losses import dm_loss, gan_d_loss, lpips_distance, nonfinite_frac, pixel_d_loss, pixel_g_loss
from .objective import Ctx, ObjectiveBase, Player
from .pixel_gan import PixelDiscriminator, labels_of


class GANHead(nn.Module):
    """DMD2's classifier head: (conv k4 s2 -> GroupNorm -> SiLU) down to 2x2, then a 1x1 conv to a
    logit map averaged into one logit. (Stopping at 2x2 rather than 1x1 keeps GroupNorm from
    normalising single values to a constant, which would cut the gradient.)"""

    def __init__(self, channels: int, spatial: int, width: int | None = None):
        super().__init__()
        width = width or channels
        layers, c, s = [], channels, spatial
        while s > 2:
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
            c, s = width, s // 2
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:   # (B, C', h, w) -> (B,)
        return self.net(feats).flatten(1).mean(1)


def _groups(c: int) -> int:
    """Largest group count <= 32 dividing c with at least 4 channels per group."""
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0 and c // g >= 4:
            return g
    return 1


def scores_and_gan_g(teacher: Denoiser, critic: Denoiser, head, x_t, t, cond, c: DMDConfig, real: bool = True):
    """The generator update's critic and teacher passes at one noised sample ``x_t`` (keeps grad).

    Returns ``(L_G, mu_real, mu_fake)``: the non-saturating G loss softplus(-D(x_t)) (DMD2 Eq. 3;
    None when ``head`` is None), and the teacher's (CFG scale ``c.real_guidance_scale``) and the
    critic's x0 predictions, detached (None when ``c.dm_weight`` is 0). One critic pass serves
    both the GAN features and mu_fake unless the critic itself is guided. ``real=False`` skips the
    teacher pass (decoupled DMD makes its own cond / uncond passes).
    """
    l_g, _, real_x0, fake_x0 = scores_gan_logits(teacher, critic, head, x_t, t, cond, c, real)
    return l_g, real_x0, fake_x0


def scores_gan_logits(teacher: Denoiser, critic: Denoiser, head, x_t, t, cond, c: DMDConfig, real: bool = True):
    """:func:`scores_and_gan_g` plus the discriminator's per-sample logits D(x_t) (B,), detached (None without
    ``head``): f-distill's density ratio r = exp(D(x_t)) at the DM term's own noised sample."""
    l_g = fake_x0 = real_x0 = logits = None
    if head is not None:
        fake_x0, feats = critic.x0_and_features(x_t, t, cond)
        logit = head(feats.float())
        l_g = F.softplus(-logit).mean()
        logits = logit.detach()
    if c.dm_weight > 0:
        with torch.no_grad():
            if real:
                real_x0 = teacher(x_t.detach(), t, cond, guidance_scale=c.real_guidance_scale)
            if fake_x0 is None or c.fake_guidance_scale != 1.0:
                fake_x0 = critic(x_t.detach(), t, cond, guidance_scale=c.fake_guidance_scale)
        fake_x0 = fake_x0.detach()
    return l_g, logits, real_x0, fake_x0


class DMDObjective(ObjectiveBase):
    """DMD / DMD2 as an Objective for :class:`~stepdistill.trainers.core.Trainer`.

    Args:
        teacher: frozen real score mu_real.
        student: generator G (a Denoiser; its backbone is the trainable network).
        critic:  fake score mu_fake (a Denoiser; trainable, usually initialised from the teacher).
        cfg:     :class:`~stepdistill.config.DMDConfig`.
        num_classes: class count (0 for unconditional).
        regression_pairs: (noise, condition indices, teacher_x0) for the DMD regression loss
            (:func:`stepdistill.pairs.teacher_ode_pairs`), or None.
        conds: condition sampler (default :class:`~stepdistill.conditioning.ClassLabels` over ``num_classes``; text teachers:
            :class:`~stepdistill.conditioning.TextEmbeddingBank`).
    """

    #: the generator loss's score pass also runs the (guided) teacher; Decoupled DMD makes its own cond / uncond passes
    teacher_in_score_pass = True

    def __init__(self, teacher: Denoiser, student: Denoiser, critic: Denoiser, cfg: DMDConfig, num_classes: int,
                 sample_shape: tuple[int, int, int], regression_pairs=None, seed: int = 0, conds=None,
                 data_std: float = 1.0):
        self.teacher, self.student, self.critic, self.cfg = teacher, student, critic, cfg
        self.teacher.requires_grad_(False).eval()
        self.shape = tuple(sample_shape)
        self.conds = conds if conds is not None else ClassLabels(num_classes)
        self.timesteps = [float(t) for t in cfg.student_timesteps]
        critic_mod = nn.ModuleDict({"fake": critic.backbone})
        if cfg.gan:
            res = self._feature_spatial()
            with torch.random.fork_rng(devices=[]):  # head init depends on the seed only
                torch.manual_seed(seed)
                self.head = GANHead(critic.feature_channels, res)
            critic_mod["head"] = self.head
        self.pixel_disc = None
        if cfg.pixel_gan_g_weight > 0:  # trainers/pixel_gan.py; trained with the critic
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.pixel_disc = PixelDiscriminator(self.shape[0], cfg.pixel_gan_width,
                                                     num_classes=self.conds.num_classes, video=len(self.shape) == 4)
            critic_mod["pixel_disc"] = self.pixel_disc
        self.players = {
            "generator": Player.from_optim(student.backbone, cfg.optim, ema=True),
            "critic": Player.from_optim(critic_mod, cfg.critic_optim),
        }
        if self.pixel_disc is not None and cfg.pixel_gan_lr > 0:  # a fresh D learns faster than the fake score
            # read at every update: a schedule may change either learning rate (stepdistill/recipe.py)
            self.players["critic"].lr_scales = {"pixel_disc": lambda: cfg.pixel_gan_lr / cfg.critic_optim.lr}
        self.pairs = regression_pairs
        self.data_std = float(data_std)  # std of the real data: normalises the collapse guard's diversity

    def _feature_spatial(self) -> int:
        with torch.no_grad():
            x = torch.zeros(1, *self.shape)
            cond = self.conds.grid(1, x.device)  # label 0 / first prompt / None
            f = self.critic.features(x, torch.tensor([500.0]), cond)
        return f.shape[-1]

    # -- schedule of updates: the two time-scale rule (DMD2 Sec. 4.1) -----------------------
    def updates(self, step: int) -> list[str]:
        if self.in_warmup(step):  # regression warm-up: the critic waits for a student worth scoring
            return ["generator"]
        return ["critic"] * self.cfg.critic_updates + ["generator"]

    def in_warmup(self, step: int) -> bool:
        """Regression warm-up (DMD2 Sec. 4.3 / App.: the one-step SDXL student starts from an ODE regression):
        the first ``dmd.regression_warmup_steps`` generator steps minimise DMD Eq. 9 alone."""
        return step < self.cfg.regression_warmup_steps

    # -- generator sample with backward simulation (DMD2 Sec. 4.3) ---------------------------
    def generate(self, ctx: Ctx, cond, grad: bool) -> tuple[torch.Tensor, int]:
        """x0 from the student at a training step k of its chain.

        k ~ U{0..K-1} (same k on all ranks). With backward simulation the input x_{t_k} is
        produced by running the student's own k-step chain (no grad, fresh noise per re-noising);
        otherwise it is noised real data (as FastGen). Returns (x0 (B, C, H, W), k).
        """
        K = len(self.timesteps)
        k = ctx.scalar_randint(0, K) if K > 1 else 0
        x = ctx.randn(*self.shape)                               # x_{t_0}: pure noise
        if k > 0:
            if self.cfg.backward_simulation:
                with torch.no_grad():
                    for j in range(k):
                        x0 = self.student(x, self._tt(self.timesteps[j], x), cond)
                        x = self.student.schedule.add_noise(x0, ctx.randn(*self.shape), self._tt(self.timesteps[j + 1], x))
            else:
                real, _ = ctx.real_batch()
                x = self.student.schedule.add_noise(real, ctx.randn(*self.shape), self._tt(self.timesteps[k], real))
        with torch.set_grad_enabled(grad):
            x0 = self.student(x, self._tt(self.timesteps[k], x), cond)
        return x0, k

    @staticmethod
    def _tt(t: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), float(t), device=like.device)

    # -- losses -------------------------------------------------------------------------------
    def loss(self, player: str, ctx: Ctx):
        return self.generator_loss(ctx) if player == "generator" else self.critic_loss(ctx)

    def generator_loss(self, ctx: Ctx):
        """G update: c_dm * L_DM + c_G * L_G (+ c_reg * L_reg for DMD).

        One critic pass serves both terms: on x_t = add_noise(x, eps, t), t ~ U[t_min, t_max],
        it gives mu_fake (detached, for L_DM) and the bottleneck features whose logit gives the
        non-saturating G loss L_G = softplus(-D(x_t)) (DMD2 Eq. 3), differentiable w.r.t. x.
        """
        c = self.cfg
        if self.in_warmup(ctx.step):
            l_reg = self.regression_loss(ctx)
            return l_reg, {"regression_loss": l_reg.item(), "generator_loss": l_reg.item()}
        cond = self.conds(ctx)
        x, k = self.generate(ctx, cond, grad=True)                     # (B, C, H, W)
        logs = {"backsim_k": float(k)}
        total = torch.zeros((), device=x.device)
        t = ctx.sample_t(self.teacher.schedule, c.t_min, c.t_max)
        x_t = self.teacher.schedule.add_noise(x, ctx.randn(*self.shape), t)  # keeps grad for the GAN term
        head = self.head if c.gan and not c.gan_fresh_t else None
        l_g, logits, real_x0, fake_x0 = scores_gan_logits(self.teacher, self.critic, head, x_t, t, cond, c,
                                                          real=self.teacher_in_score_pass)
        if c.gan and c.gan_fresh_t:  # DMD2's code: the G term at its own noise level t' ~ U[0, T)
            T = self.critic.schedule.num_train_timesteps
            t_g = ctx.sample_t(self.critic.schedule, 0, T - 1)
            x_g = self.critic.schedule.add_noise(x, ctx.randn(*self.shape), t_g)
            feats = self.critic.features(x_g, t_g, cond)
            l_g = F.softplus(-self.head(feats.float())).mean()
        if l_g is not None:
            total = total + c.gan_g_weight * l_g
            logs["gan_g_loss"] = l_g.item()
        if c.dm_weight > 0:  # the distribution-matching term: DMD's here; f-distill's and Decoupled DMD's override it
            l_dm, dlogs = self.dm_term(ctx, x, x_t, t, cond, k, real_x0, fake_x0, logits)
            total = total + c.dm_weight * l_dm
            logs.update(dlogs)
        if self.pixel_disc is not None:  # texture signal on the clean sample (trainers/pixel_gan.py)
            l_pg = pixel_g_loss(self.pixel_disc, x, labels_of(cond))
            total = total + c.pixel_gan_g_weight * l_pg
            logs["pixel_gan_g_loss"] = l_pg.item()
        if c.regression_weight > 0 and self.pairs is not None:
            l_reg = self.regression_loss(ctx)
            total = total + c.regression_weight * l_reg
            logs["regression_loss"] = l_reg.item()
        logs["generator_loss"] = total.item()
        logs["sample_std"] = x.detach().float().std().item()
        return total, logs

    def dm_term(self, ctx: Ctx, x, x_t, t, cond, k: int, real_x0, fake_x0, logits, weight=None):
        """DMD's distribution-matching loss (module docstring; DMD Eq. 7 with DMD2's normaliser) at the
        generator loss's noised sample: ``(L_DM, logs)``. ``weight``: per-sample weights (f-distill)."""
        l_dm, grad = dm_loss(x, real_x0, fake_x0, weight)
        return l_dm, {"dm_nonfinite_frac": nonfinite_frac(real_x0, fake_x0), "dm_loss": l_dm.item(),
                      "dm_grad_abs": grad.abs().mean().item()}

    def pair_batch(self, ctx: Ctx):
        """(noise z, teacher x0 y, condition) of a random batch of the teacher's ODE pairs."""
        noise, labels, target = self.pairs
        idx = ctx.randint(0, noise.shape[0]).cpu()
        z, y = noise[idx].to(ctx.device), target[idx].to(ctx.device)
        return z, y, self.conds.index(labels[idx], ctx.device)  # class labels, prompt embeddings or None

    def regression_loss(self, ctx: Ctx) -> torch.Tensor:
        """DMD Eq. 9: E ||G(z) - y||, (z, y) pairs from the teacher's deterministic ODE sampler."""
        z, y, cond = self.pair_batch(ctx)
        pred = self.student(z, self._tt(self.timesteps[0], z), cond)
        if self.cfg.regression_distance == "lpips":
            return lpips_distance(pred, y)
        return F.mse_loss(pred.float(), y.float())

    def critic_loss(self, ctx: Ctx):
        """Critic update: L_fake + c_D * L_D.

        L_fake: denoising loss of mu_fake on detached generator samples, t ~ U[0, T) (DMD Eq. 6).
        L_D = softplus(D(x_t^fake)) + softplus(-D(x_t^real)) (DMD2 Eq. 3); the fake logits reuse
        the L_fake forward pass (same noised samples), the real ones use noised training data.
        """
        c = self.cfg
        cond = self.conds(ctx)
        with torch.no_grad():
            x, _ = self.generate(ctx, cond, grad=False)
        sched = self.critic.schedule
        T = sched.num_train_timesteps
        t = ctx.sample_t(sched, 0, T - 1)
        eps = ctx.randn(*self.shape)
        x_t = sched.add_noise(x, eps, t)
        target = sched.x0_eps_to_pred(x, eps, t, self.critic.prediction_type)
        if c.gan:
            pred, f_fake = self.critic.x0_and_features(x_t, t, cond, output="raw")
        else:
            pred = self.critic.raw(x_t, t, cond)
        l_fake = F.mse_loss(pred.float(), target.float())
        total, logs = l_fake, {"fake_loss": l_fake.item()}
        real = None
        if c.gan:
            real, real_labels = ctx.real_batch()
            t_r = ctx.sample_t(sched, 0, T - 1)
            xr = sched.add_noise(real, ctx.randn(*self.shape), t_r)
            f_real = self.critic.features(xr, t_r, self.conds.real_cond(real_labels))  # stops at the bottleneck
            l_d, d_logs = gan_d_loss(self.head, f_fake, f_real)
            total = total + c.gan_d_weight * l_d
            logs.update(d_logs)
        if self.pixel_disc is not None:  # the pixel discriminator on clean samples: the same real batch as the head's
            if real is None:
                real, real_labels = ctx.real_batch()
            l_pd, p_logs = pixel_d_loss(self.pixel_disc, x, labels_of(cond), real,
                                        labels_of(self.conds.real_cond(real_labels)), c.pixel_gan_r1)
            total = total + c.pixel_gan_d_weight * l_pd
            logs.update(p_logs)
        logs["critic_loss"] = total.item()
        return total, logs

    # -- samples for grids ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        return grid_sample(self.student, ema["generator"], self.timesteps, self.conds.grid(n, device), self.shape,
                           n, device)


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
@dataclass
class DMDConfig(SharedDistillConfig):
    """DMD / DMD2 hyper-parameters (Yin et al. 2023, 2024); defaults follow DMD2 where they transfer. The ``dmd``
    section of the DMD family (``dmd``, ``dmd2``, ``phased_dmd``, ``msd``, ``rcm``): the shared fields
    (:class:`~stepdistill.config.SharedDistillConfig`: teacher, student timesteps, optimizer, LoRA) plus these."""
    backward_simulation: bool = True
    fake_guidance_scale: float = 1.0
    t_min: float = 20.0            # 0.02 T
    t_max: float = 980.0           # 0.98 T
    critic_updates: int = 5        # fake-score updates per generator update (two time-scale rule)
    dm_weight: float = 1.0
    gan: bool = True
    gan_g_weight: float = 3e-3
    gan_d_weight: float = 1e-2
    regression_weight: float = 0.0  # original DMD regression loss; > 0 builds teacher ODE pairs
    regression_pairs: int = 256
    regression_steps: int = 25
    regression_distance: str = "mse"  # mse | lpips
    regression_warmup_steps: int = 0  # first N generator steps: regression on teacher ODE pairs only (no critic)
    gan_fresh_t: bool = False      # generator GAN term at its own t ~ U[0, T) (DMD2's code) instead of the DM step's t
    pixel_gan_g_weight: float = 0.0  # > 0: a pixel-space patch discriminator on clean samples (trainers/pixel_gan.py)
    pixel_gan_d_weight: float = 1.0  # its loss weight in the critic update
    pixel_gan_r1: float = 0.0        # R1 penalty gamma on real images (0 = off)
    pixel_gan_width: int = 32        # first conv width (doubles at each of its two stride-2 convs)
    pixel_gan_lr: float = 0.0        # its learning rate (own param group of the critic's AdamW); 0 = dmd.critic_optim.lr
    divergence: str = "reverse_kl"  # reverse_kl (DMD) | forward_kl | js: f-distill's h(r) weights (needs dmd.gan)
    divergence_logit_clip: float = 10.0  # the discriminator logit log r is clipped to +-this before h(r)
    critic_optim: OptimConfig = field(default_factory=dmd2_optim)  # the fake score and its GAN head
    critic_init: str = ""          # a dmd / dmd2 run (or one checkpoint of it) whose critic the critic(s) start from
    # Decoupled DMD (Liu et al. 2025): the guided DM gradient split into a CFG-augmentation (CA) term and a
    # distribution-matching term, each with its own weight and re-noising schedule (trainers/decoupled_dmd.py)
    decoupled: bool = False
    ca_weight: float = 1.0         # weight of the CA term -(w-1)(mu_real_cond - mu_real_uncond)
    dm_term_weight: float = 1.0    # weight of the DM term mu_fake - mu_real_cond (its t: t_min..t_max)
    ca_schedule: str = "above_student"  # shared (the DM term's t and noise: DMD2) | uniform | above_student
    ca_t_min: float = 20.0         # CA times: U[ca_t_min, ca_t_max] (above_student: U[max(t_k, ca_t_min), ca_t_max])
    ca_t_max: float = 980.0


#: methods whose objective trains :mod:`pixel_gan`'s discriminator with the critic (MSD: one per part's critic)
PIXEL_GAN_METHODS = ("dmd", "dmd2", "msd")


def check_dmd_section(cfg, check, dm_options: bool | None = None) -> None:
    """The ``dmd`` section of every DMD-family method: ranges of the critic, GAN, regression and pixel-GAN options;
    f-distill, Decoupled DMD and the pixel discriminator are options of the DMD objective only (``dm_options``:
    whether the method's objective is a DMD objective that takes them; default: method dmd / dmd2)."""
    d = cfg.dmd
    check(0 <= d.t_min < d.t_max, "dmd.t_min", "must satisfy 0 <= t_min < t_max")
    check(d.critic_updates >= 1, "dmd.critic_updates", "must be >= 1")
    check(d.regression_distance in ("mse", "lpips"), "dmd.regression_distance", "must be mse | lpips")
    check(d.regression_warmup_steps >= 0, "dmd.regression_warmup_steps", "must be >= 0")
    check(d.divergence in ("reverse_kl", "forward_kl", "js"), "dmd.divergence",
          "must be reverse_kl | forward_kl | js")
    check(d.divergence_logit_clip > 0, "dmd.divergence_logit_clip", "must be > 0")
    check(d.regression_pairs >= 1, "dmd.regression_pairs", "must be >= 1")
    check(d.pixel_gan_width >= 1, "dmd.pixel_gan_width", "must be >= 1")
    check(d.pixel_gan_r1 >= 0, "dmd.pixel_gan_r1", "must be >= 0")
    check(d.critic_optim.lr > 0, "dmd.critic_optim.lr", "must be > 0")
    check(not (d.critic_init and d.lora_rank > 0), "dmd.critic_init",
          "is not supported with dmd.lora_rank > 0 (the critic is an adapter role on the student's shared base)")
    if dm_options is None:
        dm_options = cfg.method in ("dmd", "dmd2")
    if dm_options:
        check(d.divergence == "reverse_kl" or (d.gan and not d.decoupled), "dmd.divergence",
              "forward_kl / js need dmd.gan=true (the discriminator gives the density ratio) and no dmd.decoupled")
        if d.decoupled:
            check(d.ca_schedule in ("shared", "uniform", "above_student"), "dmd.ca_schedule",
                  "must be shared | uniform | above_student")
            check(0 <= d.ca_t_min <= d.ca_t_max, "dmd.ca_t_min", "must satisfy 0 <= ca_t_min <= ca_t_max")
            check(d.ca_weight >= 0 and d.dm_term_weight >= 0, "dmd.ca_weight", "term weights must be >= 0")
            check(d.dm_weight > 0, "dmd.dm_weight", "must be > 0 with dmd.decoupled (it scales both terms)")
    else:
        check(d.divergence == "reverse_kl", "dmd.divergence",
              f"forward_kl / js are supported by method dmd / dmd2 only, not {cfg.method}")
        check(not d.decoupled, "dmd.decoupled", f"is supported by method dmd / dmd2 only, not {cfg.method}")
        check(d.pixel_gan_g_weight == 0 or cfg.method in PIXEL_GAN_METHODS, "dmd.pixel_gan_g_weight",
              f"the pixel discriminator is supported by methods {' / '.join(PIXEL_GAN_METHODS)} only, not {cfg.method}")
