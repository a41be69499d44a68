"""The DMD family as registry methods (:mod:`stepdistill.methods`): ``dmd`` and ``dmd2``.

One builder for the family: teacher, student and critic, the teacher ODE pairs, and the objective the
``dmd`` section selects (:func:`dmd_objective_class`): DMD / DMD2 (:mod:`~stepdistill.trainers.dmd`), f-distill
(:mod:`~stepdistill.trainers.fdistill`) or Decoupled DMD (:mod:`~stepdistill.trainers.decoupled_dmd`). rCM
(:mod:`~stepdistill.trainers.rcm`) builds through it with its own objective.
"""
from __future__ import annotations

import torch.nn as nn

from ..denoiser import Denoiser
from ..recipe import flatten_set
from .decoupled_dmd import DecoupledDMDObjective
from .dmd import DMDConfig, DMDObjective, check_dmd_section
from .fdistill import FDistillObjective
from .objective import real_data_std


def dmd_objective_class(c: DMDConfig, schedule=()) -> type[DMDObjective]:
    """The objective a ``dmd`` section asks for: Decoupled DMD (``decoupled``), f-distill (a ``divergence`` other
    than reverse_kl, from the start or from a ``schedule`` entry) or DMD / DMD2 (config checks refuse both at
    once). f-distill with reverse_kl in force is DMD2 bit for bit, so a scheduled switch changes nothing before it."""
    if c.decoupled:
        return DecoupledDMDObjective
    scheduled = {flatten_set(e.set).get("dmd.divergence", "reverse_kl") for e in schedule or ()}
    if c.divergence != "reverse_kl" or scheduled - {"reverse_kl"}:
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
    from .setup import check_student_timesteps, load_critic_init, prepare, student_and_critic

    s = prepare(cfg, teacher, meta, data, text_bank)
    check_student_timesteps(cfg, s)
    student, critic = student_and_critic(s, cfg.dmd.student_init, cfg.dmd.allow_pickle)
    apply_teacher_options(s.teacher, cfg.dmd, s.shared)  # after the copies: student and critic stay float32
    shape = tuple(s.data.images.shape[1:])
    pairs = None
    if cfg.dmd.regression_weight > 0 or cfg.dmd.regression_warmup_steps > 0:
        pairs = teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=cfg.train.seed, conds=s.conds)
    make = make_objective or dmd_objective_class(cfg.dmd, cfg.schedule)
    obj = make(s.teacher, student, critic, cfg.dmd, s.num_classes, shape, regression_pairs=pairs,
               seed=cfg.train.seed, conds=s.conds, data_std=real_data_std(s.data))
    if getattr(cfg.dmd, "critic_init", ""):
        print(load_critic_init(obj.players, cfg.dmd.critic_init))
    return obj, s.data, s.meta


def generator_ema(obj) -> dict[str, nn.Module]:
    """The one student network of a DMD-family objective (EMA player ``generator``)."""
    return {"generator": obj.student.backbone}


def export_generator(ema: dict[str, nn.Module], obj, cfg, meta, out):
    from .export import export_student

    return export_student(ema["generator"], cfg, meta, out, schedule=obj.student.schedule)


def dmd_passes_per_step(cfg) -> int:
    """Network forward passes of one generator step of DMD2 at batch 1 (for budgets in passes): each critic
    update runs the student once and the critic twice with the GAN (fake + real), once without; the generator
    update runs the student, the critic once and the teacher twice (CFG); a regression term adds one student
    pass. Backward simulation adds student passes (on average (K-1)/2 per generated sample). Forward passes
    only; each trained pass also has a backward."""
    d = cfg.dmd
    K = len(d.student_timesteps)
    sim = (K - 1) / 2 if d.backward_simulation and K > 1 else 0
    gen = 1 + sim
    critic = d.critic_updates * (gen + (2 if d.gan else 1))
    teacher = 2 if d.real_guidance_scale != 1.0 else 1
    generator = gen + 1 + (1 if d.gan and d.gan_fresh_t else 0) + teacher + (1 if d.regression_weight > 0 else 0)
    return int(round(critic + generator))


def describe_dmd_run(config: dict) -> str:
    """What this run actually used, read from its config (never the method's textbook description): the
    regression loss and warm-up, the GAN terms, the pixel discriminator, the critic ratio, learning rates and
    the ``schedule`` of changes (stepdistill/recipe.py)."""
    d = config.get("dmd") or {}
    if not d:
        return ""
    out = []
    warm, rw = d.get("regression_warmup_steps", 0), d.get("regression_weight", 0)
    if warm:
        out.append(f"a regression warm-up of {warm} generator steps on {d.get('regression_pairs')} teacher ODE pairs")
    if rw:
        out.append(f"DMD's regression loss at weight {rw:g} beside the distribution-matching term")
    else:
        out.append("no regression loss after the warm-up" if warm else "no regression loss")
    if d.get("gan"):
        out.append(f"the GAN head on the critic (generator weight {d.get('gan_g_weight', 0):g})")
    if d.get("pixel_gan_g_weight"):
        out.append(f"a pixel-space patch discriminator at weight {d['pixel_gan_g_weight']:g}")
    out.append(f"{d.get('critic_updates')} critic update(s) per generator step, noise levels t in "
               f"[{d.get('t_min', 0):g}, {d.get('t_max', 0):g}]")
    lr = (d.get("optim") or {}).get("lr")
    if lr is not None:
        out.append(f"learning rate {lr:g}")
    text = "This student was trained with " + "; ".join(out) + "."
    sched = config.get("schedule") or []
    if sched:
        changes = "; ".join(f"from step {e.get('at')}: " + ", ".join(f"{k} = {v:g}" if isinstance(v, (int, float))
                                                                   else f"{k} = {v}" for k, v in (e.get("set") or {}).items())
                            for e in sched)
        text += f" The settings then changed during the run ({changes})."
    tr = config.get("train") or {}
    if tr:
        text += f" {tr.get('max_steps')} generator steps at batch {tr.get('batch_size')}, seed {tr.get('seed')}."
    return text


DMD_CARD = ("DMD (Distribution Matching Distillation; Yin et al., CVPR 2024)",
    "The student is trained so that its output distribution matches the teacher's: the gradient is the "
    "difference between a *fake* score (a critic diffusion model fitted online to student samples) and "
    "the *real* score (the frozen teacher with classifier-free guidance), plus a regression loss on "
    "teacher-generated noise/image pairs.")

DMD2_CARD = ("DMD2 (Improved Distribution Matching Distillation; Yin et al., NeurIPS 2024)",
    "Distribution matching (the paper drops DMD's regression loss; what this run used is listed under "
    "\"This run\"): a two-time-scale update rule (several critic updates per student update) keeps the fake"
    " score accurate, a GAN head on the critic's bottleneck features adds a real-data loss, and "
    "multi-step students are trained on their own backward-simulated inputs so that training matches "
    "few-step inference.")


def _method(name: str, description: str, card: tuple):
    from ..methods import Method

    return Method(name, build=build_dmd_family, ema_modules=generator_ema, export=export_generator, curve=True,
                  description=description, sections={"dmd": DMDConfig}, checks=check_dmd_section, card=card,
                  describe_run=describe_dmd_run)


DMD_METHOD = _method("dmd", "DMD (Yin et al. 2024): distribution matching + regression on teacher ODE pairs", DMD_CARD)
DMD2_METHOD = _method("dmd2", "DMD2 (Yin et al. 2024): distribution matching, two time-scale critic, GAN", DMD2_CARD)
