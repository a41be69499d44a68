"""What a method is to the training loop: its players, the randomness of one update, and the
:class:`Objective` contract (:mod:`stepdistill.trainers.core` runs it; every method's objective implements it).

Determinism: all randomness of an update comes from a ``torch.Generator`` seeded by ``(seed, step, update)``
(:func:`update_seed`); :class:`Ctx` draws the *global* batch from it and returns this rank's slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn


@dataclass
class Player:
    """A trainable module with its own optimizer (AdamW) settings."""
    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0
    ema: bool = False
    # child module name -> lr multiplier (its own param group): a number, or a function of no arguments that gives
    # it (read at every update, so a scheduled learning rate moves it: stepdistill/recipe.py)
    lr_scales: dict = field(default_factory=dict)
    optim: object = None  # the OptimConfig this player was made from: its lr is read live (a schedule may change it)

    @classmethod
    def from_optim(cls, module: nn.Module, optim, ema: bool = False) -> "Player":
        """A player trained with an :class:`~stepdistill.config.OptimConfig` (every config's optimizer section)."""
        return cls(module, optim.lr, (optim.beta1, optim.beta2), optim.weight_decay, optim.grad_clip,
                   optim.warmup_steps, ema=ema, optim=optim)

    def current_lr(self) -> float:
        """The base learning rate now: the OptimConfig's (live) or the fixed ``lr``."""
        return float(self.optim.lr) if self.optim is not None else self.lr

    def group_scales(self) -> list:
        """One entry per optimizer param group (see :func:`_param_groups`): None for the main group, then each
        ``lr_scales`` multiplier, evaluated now."""
        return [None] + [s() if callable(s) else s for s in self.lr_scales.values()]


def _param_groups(p: "Player") -> list:
    """The optimizer's parameters: one group, or with ``lr_scales`` one group per scaled child module (its
    ``lr_scale`` is kept in the group) and one for the rest."""
    trainable = [q for q in p.module.parameters() if q.requires_grad]
    if not p.lr_scales:
        return trainable
    scaled = {name: [q for q in p.module.get_submodule(name).parameters() if q.requires_grad] for name in p.lr_scales}
    ids = {id(q) for qs in scaled.values() for q in qs}
    groups = [{"params": [q for q in trainable if id(q) not in ids]}]
    scales = dict(zip(p.lr_scales, p.group_scales()[1:]))
    groups += [{"params": qs, "lr": p.lr * scales[name], "lr_scale": scales[name]} for name, qs in scaled.items()]
    return groups


@dataclass
class Ctx:
    """Randomness and data for one update; draws global batches and returns this rank's slice."""
    gen: torch.Generator
    rank: int
    world: int
    global_batch: int
    device: torch.device
    step: int
    data: object = None  # ArrayDataset or None

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        n = self.local_batch
        return x[self.rank * n:(self.rank + 1) * n].to(self.device)

    def randn(self, *shape) -> torch.Tensor:
        return self._slice(torch.randn(self.global_batch, *shape, generator=self.gen))

    def rand(self) -> torch.Tensor:
        return self._slice(torch.rand(self.global_batch, generator=self.gen, dtype=torch.float64))

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._slice(torch.randint(low, high, (self.global_batch,), generator=self.gen))

    def sample_t(self, schedule, t_min: float, t_max: float) -> torch.Tensor:
        """Training times for the global batch (schedule's own law), this rank's slice."""
        return self._slice(schedule.sample_t(self.global_batch, t_min, t_max, generator=self.gen))

    def scalar_randint(self, low: int, high: int) -> int:
        """The same random int on every rank (e.g. DMD2's backward-simulation step count)."""
        return int(torch.randint(low, high, (1,), generator=self.gen))

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.global_batch,), generator=self.gen)
        idx = idx[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)


class Objective(Protocol):
    """What a method implements: the whole contract between a method and :class:`~stepdistill.trainers.core.Trainer`.

    Required::

        players: dict[str, Player]      # trainable networks, each with its optimizer settings (and EMA flag)
        updates(step) -> [player, ...]  # who updates in this step, in order (DMD2: 5 x "critic", "generator")
        loss(player, ctx) -> (loss, logs)
        sample(ema, n, device) -> (n, C, H, W) in [-1, 1]  # the periodic sample grid

    Optional, with the defaults of :class:`ObjectiveBase` (the loop reads them, it never probes)::

        teacher: Denoiser | None        # the frozen teacher: checkpoints record its hash, FSDP may shard it
        data_std: float = 1.0           # std of the real data: normalises the collapse guard's diversity
        conds                           # condition sampler of the grids (conditioning.ClassLabels / a text bank)
        to(device) -> self              # move what is not a player (teacher, references) to the device
        guard_stats(ema) -> dict        # collapse / saturation guard stats (trainers/guards.py)
        on_checkpoint(trainer, folder)  # called after every periodic checkpoint (PSO saves its references)
    """
    players: dict[str, Player]
    teacher: object
    data_std: float
    conds: object

    def updates(self, step: int) -> list[str]: ...
    def loss(self, player: str, ctx: Ctx) -> tuple[torch.Tensor, dict[str, float]]: ...
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor: ...
    def to(self, device) -> "Objective": ...
    def guard_stats(self, ema: dict[str, nn.Module]) -> dict: ...
    def on_checkpoint(self, trainer, folder: Path) -> None: ...


class ObjectiveBase:
    """The optional members of :class:`Objective` with their defaults; every built-in objective derives from it,
    and so may yours (or define the members itself)."""
    teacher = None
    data_std: float = 1.0
    conds = None

    def to(self, device):
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    @torch.no_grad()
    def guard_stats(self, ema: dict[str, nn.Module]) -> dict:
        """Diversity / saturation of the sample grid (:func:`~stepdistill.trainers.guards.sample_guard_stats`);
        nothing to measure without a condition sampler."""
        if self.conds is None:
            return {}
        from .guards import sample_guard_stats

        return sample_guard_stats(self, ema)

    def on_checkpoint(self, trainer, folder: Path) -> None:
        return None


def real_data_std(data) -> float:
    """std of (up to 2,048 images of) the real data: an objective's ``data_std``."""
    return float(data.images[:2048].float().std())


def update_seed(seed: int, step: int, update: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + update) % (2**63 - 1)
