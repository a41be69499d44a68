r"""Multi-student distillation (MSD; Song et al. 2024, "Multi-student Diffusion Distillation for Better
One-step Generators") as an Objective for :class:`~stepdistill.trainers.core.Trainer`.

The algorithm, with the losses of each stage and the player each loss updates::

    Input: frozen teacher mu_real over classes 0..C-1; K students (msd.num_students)
    1. Partition the classes into K disjoint groups P_0..P_{K-1}: msd.groups, a balanced contiguous
       split (partition_classes), or k-means of the classes' mean real images (msd.partition: kmeans,
       class_groups_by_mean_image). route(c) = k for c in P_k.
    2. Students G_k (players student_k, EMA). Same size: copies of the teacher. Smaller
       (msd.student_channels / msd.student_layers_per_block): a fresh UNet2DModel with the teacher's
       sample size, channels and class embeddings (build_student_backbone), random init (seed + k).
       dmd.student_init: copies of that model, e.g. a layer-pruned teacher retrained by normalised feature
       distillation (stepdistill prune, method kd): smaller students that start from the teacher's function.
    3. TSM stage (msd.tsm_steps updates per student; updates student_k only):
         (x, c) ~ real images of part k and their labels     # c in P_k
         t ~ U[0, T), eps ~ N(0, I), x_t = alpha_t x + sigma_t eps
         L_TSM = || G_k.raw(x_t, t, c) - mu_real.raw(x_t, t, c) ||^2        # teacher without CFG
    4. DM stage (msd.steps_per_student updates per student): DMD2 restricted to part k
       (dmd.py's DMDObjective, unchanged, with c ~ U(P_k) and a GAN real batch from part k):
         student_k:  c_dm L_DM + c_G softplus(-D(x_t)) [+ c_reg ||G_k(z_i, c_i) - y_i||^2]
                     x = G_k(z, c), c ~ U(P_k); (z_i, c_i, y_i) teacher ODE pairs with c_i in P_k
                     (dmd.regression_weight > 0: DMD's regression loss, keeps the part's modes)
         critic_k:   L_fake + c_D [softplus(D(fake)) + softplus(-D(real))]   real ~ part k
       (dmd.pixel_gan_g_weight > 0: DMD2's pixel-space discriminator too, one per critic, on the part's real
       images; dmd.critic_init: every critic_k starts from a DMD2 run's critic, e.g. the one that trained the
       student that dmd.student_init copies)

Teacher score matching (TSM). A smaller student cannot start from the teacher's weights, and DM from
a random network is slow and unstable, so (as in the paper) it first learns the teacher's denoiser:
the target is the teacher's CFG-free prediction at a random training time, on **noised real images of
the student's own part** (``ctx.real_batch`` restricted to the part, their own labels; t drawn with
the schedule's training law over [0, T-1], fresh eps). Both networks predict x0 through their native
parameterisation (the teacher's ``prediction_type``), and the loss is measured in that native space:
for v-prediction ``||v_S - v_T||^2 = ||x0_S - x0_T||^2 / sigma_t^2``, i.e. x0 regression with the
teacher's own training weight. Only real inputs are used: before TSM the student's outputs are noise,
and noised real data is exactly where the teacher's score was trained. DM then starts from the
TSM-trained (raw, not EMA) weights: the same player and optimizer continue (AdamW state included),
only the loss changes. TSM also works for same-size students (they start at the teacher, so its loss
starts near 0); the shipped same-size config skips it.

Conditions per part. Each student's generator conditions come from a part's
:class:`~stepdistill.conditioning.ClassLabels` (uniform
over its classes) and every real batch it touches from :class:`PartCtx` (a :class:`Ctx` whose
``real_batch`` draws from the part's row list with the same global-batch / rank-slice convention and
the same ``ctx.gen`` stream), so a student never sees another part's classes.

Critics. ``msd.shared_critic: false``: one fake score (plus GAN head) per student, ``critic_k``, trained
on its student's samples and its part's real data. ``true``: one player ``critic`` for all, fitted to
the *routed* generator G(z, c) = G_{route(c)}(z, c) (:class:`RoutedGenerator`; conditions over all
classes, real batch from the whole data set). Because the parts are disjoint, its class-conditional
fake distribution p_fake(x | c) is exactly the owning student's, so each student's DM gradient has the
same target as with a private critic; the price is that each part gets 1/K of the critic's updates.
Critics are teacher copies (teacher-sized even for smaller students, as DMD2's fake score).

Schedule (``updates(step)``; stage and student follow from the step count, so resume is exact).
``msd.schedule: round_robin``: step s trains student k = s mod K only (``critic_k`` x
``dmd.critic_updates`` then ``student_k``; shared: ``critic`` x n then ``student_k``), so a step costs
what a DMD2 step costs. ``all``: every student every step. TSM steps come first (``student_k`` only, no
critic). Equal budget per student is explicit: each gets exactly ``msd.tsm_steps`` TSM and
``msd.steps_per_student`` DM generator updates, i.e. the schedule takes P x (tsm_steps +
steps_per_student) global steps, P = K (round_robin) or 1 (all). A smaller ``train.max_steps`` stops
early (a prefix of the same schedule, warned: unequal budgets; resuming with the full count continues
it exactly), a larger one is refused; ``steps_per_student: 0`` derives it from ``train.max_steps``
(which must then be a multiple of P).
EMA (``train.ema_decay``) runs on every student every global step, so under round_robin a student's
EMA decays by ``ema_decay^K`` per own update. ``dmd.optim.warmup_steps`` counts global steps.

Logs carry the student / critic index as a suffix (``dm_loss_2``, ``tsm_loss_0``, ``critic_loss_1``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, DistillConfig, TeacherModelConfig
from ..denoiser import Denoiser, backbone_kind
from ..modelcard import msd_card
from ..models import build_teacher_unet, count_params
from ..partitions import class_groups_by_mean_image, partition_classes, routing_table
from ..pipelines.multi_student import (PIPELINE_CLASS, multi_student_sample, student_rows,
                                       student_subfolder)
from .objective import Ctx, ObjectiveBase, real_data_std
from ..conditioning import ClassLabels
from .dmd import DMDConfig, DMDObjective, check_dmd_section


# -- partitions -----------------------------------------------------------------------------------
# -- smaller students -----------------------------------------------------------------------------
def build_student_backbone(teacher_backbone, msd: MSDConfig, seed: int):
    """A fresh class-conditional UNet2DModel with the teacher's sample size, in/out channels, class
    embeddings (``num_class_embeds``, null class included) and attention levels, but
    ``msd.student_channels`` widths (one per teacher level; [] = the teacher's) and
    ``msd.student_layers_per_block`` (0 = the teacher's); built with
    :func:`~stepdistill.models.build_teacher_unet`, weights from ``torch.manual_seed(seed)``."""
    c = getattr(teacher_backbone, "config", None)
    if backbone_kind(teacher_backbone) != "unet2d" or not getattr(c, "num_class_embeds", None):
        raise ConfigError(f"msd.student_channels: smaller students are class-conditional UNet2DModels and need "
                          f"one as teacher, got {type(teacher_backbone).__name__}")
    levels = [t.startswith("Attn") for t in c.down_block_types]
    ch = [int(v) for v in (msd.student_channels or c.block_out_channels)]
    if len(ch) != len(levels):
        raise ConfigError(f"msd.student_channels: needs {len(levels)} entries (one per teacher level), got {ch}")
    attn_ch = [v for v, a in zip(ch, levels) if a] + [ch[-1]]   # + the mid block's attention
    head = c.attention_head_dim if isinstance(c.attention_head_dim, int) else min(attn_ch)
    mc = TeacherModelConfig(block_out_channels=ch, layers_per_block=msd.student_layers_per_block or c.layers_per_block,
                            attention_levels=levels, norm_num_groups=math.gcd(c.norm_num_groups, *ch),
                            attention_head_dim=math.gcd(head, *attn_ch))
    size = c.sample_size[0] if isinstance(c.sample_size, (list, tuple)) else c.sample_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_teacher_unet(mc, c.num_class_embeds - 1, c.in_channels, size)


# -- one part's view of conditions and data ------------------------------------------------------
@dataclass
class PartCtx(Ctx):
    """A :class:`Ctx` (same generator, step, rank) whose real batches come from one part only."""
    index: torch.Tensor | None = None   # (N_k,) rows of ``data`` whose labels lie in the part

    @classmethod
    def of(cls, ctx: Ctx, index: torch.Tensor) -> "PartCtx":
        return cls(**{f.name: getattr(ctx, f.name) for f in dataclasses.fields(Ctx)}, index=index)

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Ctx.real_batch's draw (global batch from ctx.gen, this rank's slice) over the part's rows
        j = torch.randint(0, len(self.index), (self.global_batch,), generator=self.gen)
        idx = self.index[j[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]]
        return self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)


class RoutedGenerator:
    """The K students as one class-conditional generator, G(z, c) = G_{route(c)}(z, c): what a shared
    critic models. Offers what :class:`DMDObjective` uses of its student (call, ``schedule``, ``backbone``)."""

    def __init__(self, students: list[Denoiser], table: list[int]):
        self.students, self.table = students, table
        self.schedule = students[0].schedule
        self.backbone = nn.ModuleList([s.backbone for s in students])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)             # (B, C, H, W) x0
        for k, rows in student_rows(cond, self.table, len(self.students)):
            out[rows] = self.students[k](x[rows], t[rows], cond[rows]).float()
        return out


def part_pairs(pairs, group: list[int]):
    """The teacher ODE pairs (noise, labels, x0) whose label lies in ``group`` (None stays None): each student's
    regression term (``dmd.regression_weight``) pulls it toward the teacher on its own classes only."""
    if pairs is None:
        return None
    noise, labels, x0 = pairs
    keep = torch.isin(labels, torch.tensor(group, dtype=labels.dtype))
    if not bool(keep.any()):
        raise ConfigError(f"dmd.regression_pairs: none of the teacher ODE pairs has a class of group {group}; "
                          "raise dmd.regression_pairs")
    return noise[keep], labels[keep], x0[keep]


# -- the objective --------------------------------------------------------------------------------
class MultiStudentObjective(ObjectiveBase):
    """MSD (module docstring). Players ``student_0..student_{K-1}`` (EMA) and ``critic_0..critic_{K-1}``
    (or one ``critic`` with ``msd.shared_critic``); each critic holds its fake score and, with
    ``dmd.gan``, DMD2's GAN head.

    Args:
        teacher: frozen real score. students: K Denoisers. critics: K Denoisers (1 when shared).
        cfg: :class:`DMDConfig` (DMD2 hyper-parameters, shared by all students).
        msd: :class:`MSDConfig`. groups: the partition (class indices per student).
        data_labels: (N,) labels of the training set (for the per-part real batches).
    """

    def __init__(self, teacher: Denoiser, students: list[Denoiser], critics: list[Denoiser], cfg: DMDConfig,
                 msd: MSDConfig, groups: list[list[int]], num_classes: int, sample_shape: tuple[int, int, int],
                 data_labels: torch.Tensor | None = None, seed: int = 0, data_std: float = 1.0,
                 regression_pairs=None):
        K = len(students)
        if len(groups) != K or len(critics) != (1 if msd.shared_critic else K):
            raise ValueError(f"{K} students need {K} groups and {1 if msd.shared_critic else K} critic(s)")
        self.teacher, self.students, self.critics, self.cfg, self.msd = teacher, students, critics, cfg, msd
        self.teacher.requires_grad_(False).eval()
        self.K, self.groups = K, [list(g) for g in groups]
        self.table = routing_table(self.groups, num_classes)
        self.shape = tuple(sample_shape)
        self.timesteps = [float(t) for t in cfg.student_timesteps]
        self.conds = ClassLabels(num_classes)  # all classes: grids, guards, the shared critic
        self.data_std = float(data_std)  # std of the real data: normalises the collapse guard's diversity
        self.part_index = None
        if data_labels is not None:
            self.part_index = [torch.isin(data_labels, torch.tensor(g)).nonzero().flatten() for g in self.groups]
            empty = [k for k, idx in enumerate(self.part_index) if len(idx) == 0]
            if empty and (cfg.gan or msd.tsm_steps > 0):
                raise ConfigError(f"msd.groups: group {empty[0]} {self.groups[empty[0]]} has no training images "
                                  "(the GAN and TSM need real data of every part)")
        # one DMD2 objective per part: DMD2's losses, unchanged, on the part's conditions and data
        self.subs = [DMDObjective(teacher, s, critics[0 if msd.shared_critic else k], cfg, num_classes, self.shape,
                                  seed=seed, conds=ClassLabels(num_classes, self.groups[k]),
                                  regression_pairs=part_pairs(regression_pairs, self.groups[k]))
                     for k, s in enumerate(students)]
        self.players = {f"student_{k}": sub.players["generator"] for k, sub in enumerate(self.subs)}
        self.mixed = None
        if msd.shared_critic:  # DMD2's critic loss with the routed generator as its G
            self.mixed = DMDObjective(teacher, RoutedGenerator(students, self.table), critics[0], cfg, num_classes,
                                      self.shape, seed=seed, conds=self.conds)
            for sub in self.subs:  # one GAN head and one pixel discriminator too (trained by the shared critic)
                if cfg.gan:
                    sub.head = self.mixed.head
                if sub.pixel_disc is not None:
                    sub.pixel_disc = self.mixed.pixel_disc
            self.players["critic"] = self.mixed.players["critic"]
        else:
            for k, sub in enumerate(self.subs):
                self.players[f"critic_{k}"] = sub.players["critic"]

    # -- schedule -----------------------------------------------------------------------------------
    def stage(self, step: int) -> str:
        """``"tsm"`` for the first tsm_steps updates of every student, then ``"dm"``."""
        return "tsm" if step < self.msd.round_steps * self.msd.tsm_steps else "dm"

    def active(self, step: int) -> list[int]:
        """Students updated at ``step``: ``[step mod K]`` (round_robin) or all."""
        return [step % self.K] if self.msd.schedule == "round_robin" else list(range(self.K))

    def updates(self, step: int) -> list[str]:
        ks, n = self.active(step), self.cfg.critic_updates
        if self.stage(step) == "tsm":
            return [f"student_{k}" for k in ks]
        if self.mixed is not None:
            return ["critic"] * n + [f"student_{k}" for k in ks]
        return [name for k in ks for name in [f"critic_{k}"] * n + [f"student_{k}"]]

    def part_ctx(self, ctx: Ctx, k: int) -> PartCtx:
        return PartCtx.of(ctx, self.part_index[k] if self.part_index is not None else None)

    # -- losses -------------------------------------------------------------------------------------
    def loss(self, player: str, ctx: Ctx):
        if player == "critic":
            return self.mixed.critic_loss(ctx)
        kind, k = player.rsplit("_", 1)
        k = int(k)
        pctx = self.part_ctx(ctx, k)
        if kind == "critic":
            total, logs = self.subs[k].critic_loss(pctx)
        elif self.stage(ctx.step) == "tsm":
            total, logs = self.tsm_loss(pctx, k)
        else:
            total, logs = self.subs[k].generator_loss(pctx)
        return total, {f"{name}_{k}": v for name, v in logs.items()}

    def tsm_loss(self, ctx: Ctx, k: int):
        """Teacher score matching of student k on noised real images of its part (module docstring)."""
        x, labels = ctx.real_batch()                                           # (B, C, H, W), (B,) in P_k
        sched = self.teacher.schedule
        t = ctx.sample_t(sched, 0, sched.num_train_timesteps - 1)
        x_t = sched.add_noise(x, ctx.randn(*self.shape), t)
        with torch.no_grad():
            target = self.teacher.raw(x_t, t, labels)                          # CFG-free, native prediction
        pred = self.students[k].raw(x_t, t, labels)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"tsm_loss": loss.item()}

    # -- samples ------------------------------------------------------------------------------------
    def student_denoisers(self, modules: dict[str, nn.Module]) -> list[Denoiser]:
        s0 = self.students[0]
        return [Denoiser(modules[f"student_{k}"], s0.schedule, s0.prediction_type, s0.null_class)
                for k in range(self.K)]

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device, noise: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """The exported pipeline's routed sampler on the given modules (grids: fixed noise, all classes)."""
        g = torch.Generator().manual_seed(1234)
        if noise is None:
            noise, labels = torch.randn(n, *self.shape, generator=g), self.conds.grid(n, "cpu")
        x, _ = multi_student_sample(self.student_denoisers(ema), self.table, self.timesteps, labels.to(device),
                                    noise.to(device), generator=g)
        return x


# -- building / export ----------------------------------------------------------------------------
def build_multi_student(cfg: DistillConfig, teacher: Denoiser, num_classes: int, data) -> MultiStudentObjective:
    """Students (teacher copies, or smaller fresh UNets), critics (teacher copies), the partition
    (called by :func:`build` for ``method: msd``)."""
    from ..lora import apply_teacher_options

    m = cfg.msd
    if num_classes == 0:
        raise ConfigError("method: msd partitions the classes and needs a class-conditional teacher")
    if m.partition == "kmeans" and not m.groups:
        groups = class_groups_by_mean_image(data.images, data.labels, num_classes, m.num_students, cfg.train.seed)
    else:
        groups = partition_classes(num_classes, m.num_students, m.groups or None)
    full = m.round_steps * (m.tsm_steps + m.steps_per_student)
    if m.steps_per_student and cfg.train.max_steps < full:
        warnings.warn(f"train.max_steps={cfg.train.max_steps} stops before the end of the msd schedule "
                      f"({full} steps): students get unequal budgets", stacklevel=2)
    smaller = bool(m.student_channels) or m.student_layers_per_block > 0

    def wrap(backbone) -> Denoiser:
        return Denoiser(backbone.train(), teacher.schedule, teacher.prediction_type, teacher.null_class,
                        teacher.null_cond)

    if cfg.dmd.student_init:  # every student starts from one model: a pruned (+ KD) network, or a trained student
        from .setup import student_from

        init = student_from(teacher, cfg.dmd.student_init, cfg.dmd.allow_pickle).backbone
        students = [wrap(copy.deepcopy(init)) for _ in range(m.num_students)]
    else:
        students = [wrap(build_student_backbone(teacher.backbone, m, cfg.train.seed + k) if smaller
                         else copy.deepcopy(teacher.backbone)) for k in range(m.num_students)]
    critics = [wrap(copy.deepcopy(teacher.backbone)) for _ in range(1 if m.shared_critic else m.num_students)]
    shape = tuple(data.images.shape[1:])
    pairs = None
    if cfg.dmd.regression_weight > 0:  # DMD's regression on teacher ODE pairs, each student on its part's pairs
        from ..pairs import teacher_ode_pairs

        pairs = teacher_ode_pairs(teacher, cfg.dmd, num_classes, shape, seed=cfg.train.seed)
    obj = MultiStudentObjective(teacher, students, critics, cfg.dmd, m, groups, num_classes, shape,
                                data_labels=data.labels, seed=cfg.train.seed, data_std=real_data_std(data),
                                regression_pairs=pairs)
    if cfg.dmd.critic_init:  # every critic_k from the critic of the run the students came from
        from .setup import load_critic_init

        print(load_critic_init(obj.players, cfg.dmd.critic_init))
    apply_teacher_options(obj.teacher, cfg.dmd, None)  # after the copies: students and critics stay float32
    return obj


def export_multi_student(students: list[nn.Module], cfg: DistillConfig, meta, out: Path, groups: list[list[int]],
                         schedule=None) -> Path:
    """EMA students -> one diffusers folder loadable with ``MultiStudentPipeline.from_pretrained``, written once by
    :func:`~stepdistill.trainers.export.export_student`: student 0 in ``unet/`` (or ``transformer/``), students
    1..K-1 in ``student_k/``; ``model_index.json`` names the pipeline and holds ``student_classes``;
    ``stepdistill.json`` gets ``extra.students`` (name, subfolder, classes, params) and ``extra.partition``; the card
    a students table and routed usage.
    """
    from ..denoiser import component_name
    from .export import ExportParts, export_student

    out = Path(out)
    if len(students) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(students)} students")
    if not all(hasattr(m, "save_pretrained") for m in students):
        raise ValueError("MultiStudentPipeline folders hold diffusers students (UNet2DModel, DiT, ...); got "
                         + ", ".join(type(m).__name__ for m in students))
    sub0 = component_name(students[0])  # "transformer" for a DiT student
    students_meta = [{"name": f"student_{k}", "subfolder": student_subfolder(k) if k else sub0, "classes": list(g),
                      "params": count_params(m)} for k, (g, m) in enumerate(zip(groups, students))]
    ts = [float(t) for t in cfg.dmd.student_timesteps]
    parts = ExportParts(networks={student_subfolder(k): m for k, m in enumerate(students[1:], start=1)},
                        index={"student_classes": [list(g) for g in groups]}, pipeline=PIPELINE_CLASS,
                        meta={"students": students_meta, "pipeline": PIPELINE_CLASS,
                              "partition": {"by": "class", "groups": [list(g) for g in groups],
                                            "source": "msd.groups" if cfg.msd.groups else "balanced contiguous split"}},
                        card=msd_card(out, students_meta, meta, ts))
    return export_student(students[0], cfg, meta, out, schedule=schedule, parts=parts)


# -- the method (stepdistill/methods.py) -------------------------------------------------------------------
def build(cfg: DistillConfig, teacher: Denoiser | None = None, meta=None, data=None, text_bank=None):
    """Teacher, data and conditions as for DMD (trainers/setup.py), then K students, their critics, the partition."""
    from .setup import check_student_timesteps, prepare

    s = prepare(cfg, teacher, meta, data, text_bank)
    check_student_timesteps(cfg, s)
    return build_multi_student(cfg, s.teacher, s.num_classes, s.data), s.data, s.meta


def _ema(obj) -> dict[str, nn.Module]:
    return {f"student_{k}": obj.students[k].backbone for k in range(obj.K)}


def _export(ema, obj, cfg, meta, out):
    return export_multi_student([ema[f"student_{k}"] for k in range(obj.K)], cfg, meta, out, obj.groups,
                                schedule=obj.students[0].schedule)


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
@dataclass
class MSDConfig:
    """Multi-student distillation (Song et al. 2024; method: msd): K one-step students, each distilled
    with DMD2 (the ``dmd`` section) on its own part of the classes. See trainers/multi_student.py."""
    num_students: int = 4
    groups: list[list[int]] = field(default_factory=list)  # class indices per student; [] = msd.partition decides
    partition: str = "contiguous"  # groups = []: contiguous (balanced split) | kmeans (classes by their mean real image)
    shared_critic: bool = False    # one fake score for all students (else one per student)
    schedule: str = "round_robin"  # round_robin: one student per step | all: every student every step
    steps_per_student: int = 0     # DM generator updates per student; 0 = what train.max_steps leaves after TSM
    student_channels: list[int] = field(default_factory=list)  # [] = the teacher's architecture (teacher init)
    student_layers_per_block: int = 0  # 0 = the teacher's
    tsm_steps: int = 0             # teacher score-matching updates per student before DM (smaller students)

    @property
    def round_steps(self) -> int:
        """Global steps per update of one student: K (round_robin) or 1 (all)."""
        return self.num_students if self.schedule == "round_robin" else 1


def check_msd(cfg: DistillConfig, check) -> None:
    """``method: msd``: student count, schedule, per-student budget, architecture, groups (structure)."""
    check_dmd_section(cfg, check)
    m, K, tr, d = cfg.msd, cfg.msd.num_students, cfg.train, cfg.dmd
    check(1 <= K <= 8, "msd.num_students", "must be in 1..8 (MultiStudentPipeline holds at most 8 students)")
    check(m.schedule in ("round_robin", "all"), "msd.schedule", "must be round_robin | all")
    check(m.partition in ("contiguous", "kmeans"), "msd.partition", "must be contiguous | kmeans")
    check(not (m.groups and m.partition != "contiguous"), "msd.partition",
          "applies when msd.groups is [] (explicit groups are the partition)")
    check(m.tsm_steps >= 0, "msd.tsm_steps", "must be >= 0")
    check(m.steps_per_student >= 0, "msd.steps_per_student", "must be >= 0 (0 = split train.max_steps)")
    per = m.round_steps
    if m.steps_per_student:  # the schedule is msd's; a smaller train.max_steps stops early (a prefix of it)
        need = per * (m.tsm_steps + m.steps_per_student)
        check(tr.max_steps <= need, "msd.steps_per_student",
              f"{K} students x (msd.tsm_steps {m.tsm_steps} + {m.steps_per_student}) with schedule {m.schedule} "
              f"take train.max_steps={need} (fewer stops early), got {tr.max_steps}; or set msd.steps_per_student=0")
    else:
        check(tr.max_steps % per == 0 and tr.max_steps // per > m.tsm_steps, "msd.steps_per_student",
              f"0 splits train.max_steps evenly: with schedule {m.schedule} it must be a multiple of {per} that "
              f"leaves more than msd.tsm_steps={m.tsm_steps} updates per student, got {tr.max_steps}")
    check(all(c > 0 for c in m.student_channels), "msd.student_channels", "entries must be > 0 ([] = the teacher's)")
    check(m.student_layers_per_block >= 0, "msd.student_layers_per_block", "must be >= 0 (0 = the teacher's)")
    check(not (d.student_init and (m.student_channels or m.student_layers_per_block)), "dmd.student_init",
          "gives the students' network; leave msd.student_channels / msd.student_layers_per_block unset with it")
    check(d.lora_rank == 0, "dmd.lora_rank", "LoRA students are not supported by method msd")
    check(d.regression_warmup_steps == 0, "dmd.regression_warmup_steps", "not supported by method msd")
    if m.groups:  # structure only here (overlaps, gaps); the class count is checked against the teacher at build
        partition_classes(1 + max((c for g in m.groups for c in g), default=-1), K, m.groups)


CARD = ("MSD (Multi-Student Distillation; Song et al., 2024)",
    "Several students each distill the teacher on a subset of the conditioning space (here: classes); at "
    "inference the student owning the requested condition generates the image.")


def _method():
    from ..methods import Method

    return Method("msd", build=build, ema_modules=_ema, export=_export, pipeline=PIPELINE_CLASS,
                  description="Multi-student distillation: the classes split among K one-step students",
                  sections={"dmd": DMDConfig, "msd": MSDConfig}, checks=check_msd, card=CARD)


METHOD = _method()
