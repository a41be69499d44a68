"""Teacher training: the plain denoising objective (Ho et al. 2020, Eq. 14) with label dropout
for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2). Text teachers get their conditions from a
conditioner (``conds``, e.g. :class:`stepdistill.text.CaptionConditioner`: captions, "" when dropped)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..pipelines.sampling import make_scheduler, scheduler_sample
from ..utils import class_balanced_labels
from .objective import Ctx, ObjectiveBase, Player


class DiffusionObjective(ObjectiveBase):
    """L = E_{x0, c, t, eps} || net(alpha_t x0 + sigma_t eps, t, c~) - target ||^2,
    target by prediction type (eps, v or x0), c~ = null class with probability ``cfg_dropout``."""

    def __init__(self, den: Denoiser, scheduler_config: dict, num_classes: int, optim, cfg_dropout: float,
                 sample_steps: int, guidance_scale: float, conds=None):
        self.den = den
        self.players = {"model": Player.from_optim(den.backbone, optim, ema=True)}  # optim: config.OptimConfig
        self.scheduler_config = scheduler_config
        self.num_classes, self.cfg_dropout = num_classes, cfg_dropout
        self.sample_steps, self.guidance_scale = sample_steps, guidance_scale
        self.conds = conds  # None: class labels; else train_cond(labels, drop, ctx) / grid(n, device) / null_cond

    def updates(self, step: int) -> list[str]:
        return ["model"]

    def loss(self, player: str, ctx: Ctx):
        x0, labels = ctx.real_batch()                                   # (B, C, H, W), (B,)
        drop = ctx.rand() < self.cfg_dropout
        if self.conds is not None:
            labels = self.conds.train_cond(labels, drop, ctx)                # (B, L, D) text embeddings
        else:
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes), labels)
        eps = ctx.randn(*x0.shape[1:])
        T = self.den.schedule.num_train_timesteps
        t = ctx.sample_t(self.den.schedule, 0, T - 1)
        x_t = self.den.schedule.add_noise(x0, eps, t)
        target = self.den.schedule.x0_eps_to_pred(x0, eps, t, self.den.prediction_type)
        pred = self.den.raw(x_t, t, labels)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"diffusion_loss": loss.item()}

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        null = self.conds.null_cond.to(device) if self.conds is not None else None
        den = Denoiser(ema["model"], self.den.schedule, self.den.prediction_type, null_class=self.num_classes,
                       null_cond=null)
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(n, *self._shape(), generator=g).to(device)
        if self.conds is not None:
            labels = self.conds.grid(n, device)
        else:
            labels = class_balanced_labels(n, self.num_classes).to(device)
        sched = make_scheduler("flow_euler" if self.den.schedule.kind == "flow" else "ddim", self.scheduler_config)
        return scheduler_sample(den, sched, labels, self.sample_steps, self.guidance_scale, noise)

    def _shape(self):
        return self.den.sample_shape
