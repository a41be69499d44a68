"""The DMD family as registry methods (:mod:`stepdistill.methods`): ``dmd`` and ``dmd2``.

One builder for the family: teacher, student and critic, the teacher ODE pairs, and the objective the
``dmd`` section selects (:func:`dmd_objective_class`): DMD / DMD2 (:mod:`~stepdistill.trainers.dmd`), f-distill
(:mod:`~stepdistill.trainers.fdistill`) or Decoupled DMD (:mod:`~stepdistill.trainers.decoupled_dmd`). rCM
(:mod:`~stepdistill.trainers.rcm`) builds through it with its own objective.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import DMDConfig
from ..denoiser import Denoiser
from .decoupled_dmd import DecoupledDMDObjective
from .dmd import DMDObjective
from .fdistill import FDistillObjective
from .objective import real_data_std


def dmd_objective_class(c: DMDConfig) -> type[DMDObjective]:
    """The objective a ``dmd`` section asks for: Decoupled DMD (``decoupled``), f-distill (a ``divergence`` other
    than reverse_kl) or DMD / DMD2 (config checks refuse both at once)."""
    if c.decoupled:
        return DecoupledDMDObjective
    if c.divergence != "reverse_kl":
        return FDistillObjective
    return DMDObjective


def build_dmd_family(cfg, teacher: Denoiser | None = None, meta=None, data=None, text_bank=None,
                     make_objective=None):
    """DMD / DMD2 (and rCM, through ``make_objective``): teacher (frozen real score), student and critic (both
    initialised from the teacher), DMD's ODE pairs when the regression loss or warm-up asks for them.

    ``text_bank``: a :class:`~stepdistill.conditioning.TextEmbeddingBank` of prompt embeddings, required
    when ``meta.conditioning == "text"`` (its empty-prompt embedding is the teacher's CFG null input);
    ``data`` is then an ``ArrayDataset`` of latents (for the shape, and for the GAN real branch: labels
    = bank indices). ``dmd.lora_rank > 0``: student and critic are LoRA adapters on the teacher itself
    (:mod:`stepdistill.lora`; one copy of the base weights in memory).
    """
    from ..lora import apply_teacher_options
    from ..pairs import teacher_ode_pairs
    from .setup import check_student_timesteps, prepare, student_and_critic

    s = prepare(cfg, teacher, meta, data, text_bank)
    check_student_timesteps(cfg, s)
    student, critic = student_and_critic(s, cfg.dmd.student_init, cfg.dmd.allow_pickle)
    apply_teacher_options(s.teacher, cfg.dmd, s.shared)  # after the copies: student and critic stay float32
    shape = tuple(s.data.images.shape[1:])
    pairs = None
    if cfg.dmd.regression_weight > 0 or cfg.dmd.regression_warmup_steps > 0:
        pairs = teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=cfg.train.seed, conds=s.conds)
    make = make_objective or dmd_objective_class(cfg.dmd)
    obj = make(s.teacher, student, critic, cfg.dmd, s.num_classes, shape, regression_pairs=pairs,
               seed=cfg.train.seed, conds=s.conds, data_std=real_data_std(s.data))
    return obj, s.data, s.meta


def generator_ema(obj) -> dict[str, nn.Module]:
    """The one student network of a DMD-family objective (EMA player ``generator``)."""
    return {"generator": obj.student.backbone}


def export_generator(ema: dict[str, nn.Module], obj, cfg, meta, out):
    from .export import export_student

    return export_student(ema["generator"], cfg, meta, out, schedule=obj.student.schedule)


def _method(name: str, description: str):
    from ..methods import Method

    return Method(name, build=build_dmd_family, ema_modules=generator_ema, export=export_generator, curve=True,
                  description=description)


DMD_METHOD = _method("dmd", "DMD (Yin et al. 2024): distribution matching + regression on teacher ODE pairs")
DMD2_METHOD = _method("dmd2", "DMD2 (Yin et al. 2024): distribution matching, two time-scale critic, GAN")
