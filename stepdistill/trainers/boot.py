"""BOOT: data-free distillation by bootstrapping along the teacher's ODE (Gu, Zhai, Zhang, Liu, Susskind, ICML 2024
workshop / arXiv 2306.05544, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping").

One network g_theta(eps, t) maps the starting noise eps and a time t to the *signal* y_t of the teacher's ODE
trajectory that starts at x_T = eps, where ``x_t = alpha_t y_t + sigma_t eps`` (BOOT Sec. 3.1). With
lambda_t = log(alpha_t / sigma_t) the teacher's probability-flow ODE in y is linear (the signal-ODE, Eq. 6)::

    dy_t / d lambda = f_teacher(x_t, t) - y_t          (f: the teacher's x0 prediction, with CFG)

so one teacher step from t to s < t (Delta = lambda_s - lambda_t > 0) is::

    euler:  y_s = y_t + Delta (f - y_t)                          (BOOT's Euler step, Eq. 7)
    ddim:   y_s = y_t + (1 - exp(-Delta)) (f - y_t)              (the exact step with f frozen = DDIM's update)

Training needs only the teacher and noise (no images, no ODE pairs; BOOT Alg. 1)::

    i ~ U{1..N};  t, s = grid[i-1], grid[i]                        # a grid of N intervals from T down to 0
    y_t    = sg[g(eps, t)];   x_t = alpha_t y_t + sigma_t eps
    target = y_t + delta (f_teacher(x_t, t, c; w) - y_t)           # delta = Delta (euler) or 1 - exp(-Delta) (ddim)
    L_boot = || g(eps, s) - target ||^2 / delta^2                  # BOOT's weighting by the step (Eq. 8), mean
    L_bc   = || g(eps, T) - sg[f_teacher(eps, T, c; w)] ||^2       # the boundary condition at t = T
    L      = L_boot + boundary_weight * L_bc

Sampling is one evaluation, y_0 = g(eps, 0).

**Parametrisation** (so the export is a standard one-step student): g is the student network, initialised from
the teacher, run on the noise at the reversed time tau = T - t, its output read as the teacher's prediction type at
the final student time T (``dmd.student_timesteps[0]``)::

    g(eps, t) = x0_of(net(eps, T - t), x = eps, time = T)

At t = 0 that is exactly what every one-step pipeline computes (the network at time T on noise), so our pipeline,
the stock-diffusers loop, eval and the demo load a BOOT student like a DMD2 one; at initialisation
g(eps, 0) is the teacher's own one-step estimate.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning import ClassLabels
from ..denoiser import Denoiser
from ..errors import ConfigError
from ..pipelines.sampling import grid_sample
from .objective import Ctx, ObjectiveBase, Player


def time_grid(t_end: float, n: int) -> torch.Tensor:
    """(n + 1,) teacher times from t_end down to 0, evenly spaced and rounded to integers (VP teachers train on
    integer times)."""
    return torch.round(torch.linspace(float(t_end), 0.0, n + 1, dtype=torch.float64))


def log_snr_half(schedule, t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) (B,), float64; sigma floored at 1e-6 (a flow schedule's t = 0)."""
    a, s = schedule.alpha_sigma(t)
    return torch.log(a.double().clamp_min(1e-12)) - torch.log(s.double().clamp_min(1e-6))


def bootstrap_target(teacher: Denoiser, y_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond,
                     guidance_scale: float, update: str = "ddim") -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher step of the signal-ODE from t to s (module docstring): ``(target, delta)``, (B, C, H, W) and (B,).
    ``y_t`` (B, C, H, W) the signal at t, ``eps`` the trajectory's noise, ``t`` / ``s`` (B,) teacher times."""
    sched = teacher.schedule
    a, sg = sched.alpha_sigma(t)
    x_t = _b(a, y_t) * y_t + _b(sg, y_t) * eps
    f = teacher(x_t, t, cond, guidance_scale=guidance_scale).float()
    lam = log_snr_half(sched, s) - log_snr_half(sched, t)
    delta = lam if update == "euler" else -torch.expm1(-lam)
    return y_t + _b(delta, y_t) * (f - y_t), delta


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.ndim - 1))


class BootObjective(ObjectiveBase):
    """BOOT as an Objective: one player, the signal network g (module docstring). Reads no data."""

    def __init__(self, teacher: Denoiser, student: Denoiser, dmd, boot: "BootConfig", conds, sample_shape):
        self.teacher, self.student, self.cfg, self.boot = teacher, student, dmd, boot
        self.teacher.requires_grad_(False).eval()
        self.conds = conds
        self.shape = tuple(sample_shape)
        self.t_end = float(dmd.student_timesteps[0])
        self.grid = time_grid(self.t_end, boot.num_steps)
        self.players = {"generator": Player.from_optim(student.backbone, dmd.optim, ema=True)}

    def updates(self, step: int) -> list[str]:
        return ["generator"]

    def signal(self, eps: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """g(eps, t) = x0_of(net(eps, T - t), eps, T) (B, C, H, W), float32."""
        st = self.student
        tau = (self.t_end - t).to(eps.device)
        raw = st.raw(eps, tau, cond)
        t_end = torch.full_like(tau, self.t_end)
        return st.schedule.pred_to_x0_eps(raw.float(), eps.float(), t_end, st.prediction_type)[0]

    def loss(self, player: str, ctx: Ctx):
        b, c = self.boot, self.cfg
        cond = self.conds(ctx)
        eps = ctx.randn(*self.shape)                                   # (B, C, H, W): x_T of the trajectory
        i = ctx.randint(1, b.num_steps + 1)                            # (B,) interval index
        t, s = self.grid[i - 1].to(eps.device), self.grid[i].to(eps.device)
        with torch.no_grad():
            y_t = self.signal(eps, t, cond)
            target, delta = bootstrap_target(self.teacher, y_t, eps, t, s, cond, c.real_guidance_scale, b.update)
        pred = self.signal(eps, s, cond)
        per = ((pred - target) ** 2).flatten(1).mean(1) / delta.to(pred).clamp_min(1e-8) ** 2
        l_boot = per.mean()
        logs = {"boot_loss": l_boot.item(), "boot_delta_min": float(delta.min())}
        total = l_boot
        if b.boundary_weight > 0:
            t_end = torch.full((eps.shape[0],), self.t_end, dtype=torch.float64, device=eps.device)
            with torch.no_grad():
                y_end = self.teacher(eps, t_end, cond, guidance_scale=c.real_guidance_scale).float()
            l_bc = F.mse_loss(self.signal(eps, t_end, cond), y_end)
            total = total + b.boundary_weight * l_bc
            logs["boundary_loss"] = l_bc.item()
        logs["generator_loss"] = total.item()
        return total, logs

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        """g(eps, 0): the one-step chain at ``dmd.student_timesteps`` (the same computation, see the docstring)."""
        return grid_sample(self.student, ema["generator"], [self.t_end], self.conds.grid(n, device), self.shape, n,
                           device)


def _data_free_conds(cfg, teacher: Denoiser, meta, text_bank):
    """The condition sampler from the teacher alone: its classes, or its caption set (or ``text.prompts``) encoded by
    its own text encoder (:func:`~stepdistill.trainers.setup.teacher_text_bank`; no images are paired with it)."""
    if meta.conditioning == "class":
        return ClassLabels(len(meta.class_names))
    if meta.conditioning != "text":
        return ClassLabels(0)
    if text_bank is None:
        from .setup import teacher_text_bank

        text_bank = teacher_text_bank(cfg, meta)[0]
    if teacher.null_cond is None:
        teacher.null_cond = text_bank.null_cond
    return text_bank


def build_boot(cfg, teacher=None, meta=None, data=None, text_bank=None):
    """Teacher, the student (a copy of it, or ``dmd.student_init``) and the condition sampler: no data is loaded,
    ``data`` is ignored (returned as None)."""
    from ..models import load_denoiser
    from .setup import student_from

    if teacher is None:
        teacher, meta = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    if meta is not None and meta.student_timesteps and not cfg.dmd.allow_student_teacher:
        raise ConfigError(f"dmd.teacher {cfg.dmd.teacher} is a distilled student, not a many-step teacher")
    T = teacher.schedule.num_train_timesteps
    if not 0 < cfg.dmd.student_timesteps[0] < T:
        raise ConfigError(f"dmd.student_timesteps {cfg.dmd.student_timesteps} must lie in (0, {T})")
    conds = _data_free_conds(cfg, teacher, meta, text_bank)
    if cfg.dmd.student_init:  # a trained student of the teacher's architecture, or a pruned one (its own)
        student = student_from(teacher, cfg.dmd.student_init, cfg.dmd.allow_pickle)
    else:
        student = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                           teacher.null_class, teacher.null_cond)
    student.backbone.train()
    obj = BootObjective(teacher, student, cfg.dmd, cfg.boot, conds, teacher.sample_shape)
    return obj, None, meta


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
@dataclass
class BootConfig:
    """``method: boot`` (trainers/boot.py). The ``dmd`` section keeps the teacher, its guidance
    (``dmd.real_guidance_scale``), the one student time (``dmd.student_timesteps``) and the optimizer."""
    num_steps: int = 32            # N: intervals of the time grid from T down to 0
    update: str = "ddim"           # ddim (exact step with f frozen) | euler (BOOT's Eq. 7)
    boundary_weight: float = 1.0   # the boundary loss g(eps, T) = teacher(eps, T)


def check_boot(cfg, check) -> None:
    d, b = cfg.dmd, cfg.boot
    check(len(d.student_timesteps) == 1, "dmd.student_timesteps", "BOOT makes a one-step student: give one time")
    check(d.lora_rank == 0, "dmd.lora_rank", "is not supported by method boot")
    check(b.num_steps >= 1, "boot.num_steps", "must be >= 1")
    check(b.update in ("ddim", "euler"), "boot.update", "must be ddim | euler")
    check(b.boundary_weight >= 0, "boot.boundary_weight", "must be >= 0")
    check(d.real_guidance_scale >= 1, "dmd.real_guidance_scale", "must be >= 1")


def passes_per_step(cfg) -> int:
    """Forward passes of one sample per BOOT step: the student at t (no grad) and at s, the teacher at t (CFG: 2),
    and with the boundary loss the student and the teacher at T."""
    teacher = 2 if cfg.dmd.real_guidance_scale != 1.0 else 1
    return 2 + teacher + ((1 + teacher) if cfg.boot.boundary_weight > 0 else 0)


def describe_boot_run(config: dict) -> str:
    b, d = config.get("boot") or {}, config.get("dmd") or {}
    if not b:
        return ""
    return (f"This student was trained without data: {b.get('num_steps')} intervals of the teacher's ODE, "
            f"{b.get('update')} steps with teacher guidance {d.get('real_guidance_scale')}, boundary weight "
            f"{b.get('boundary_weight')}.")


CARD = ("BOOT (data-free distillation with bootstrapping; Gu et al. 2023)",
    "A one-step student trained from the teacher alone, with no images and no teacher trajectories: one network "
    "predicts the signal of the teacher's ODE trajectory at every time from the starting noise, trained so that "
    "its prediction at a lower noise level matches one teacher step from its own (stop-gradient) prediction at the "
    "level above, with the teacher's first estimate as the boundary condition.")


def _method():
    from ..methods import Method
    from .dmd_method import export_generator, generator_ema

    return Method("boot", build=build_boot, ema_modules=generator_ema, export=export_generator, curve=True,
                  description="BOOT (Gu et al. 2023): data-free bootstrapping along the teacher's ODE",
                  sections={"boot": BootConfig}, checks=check_boot, card=CARD, describe_run=describe_boot_run,
                  passes=passes_per_step)


METHOD = _method()
