"""What every teacher-distilling method starts from (DMD, DMD2, rCM, Phased DMD, MSD): the teacher (loaded, or
a Python ``Denoiser``), its metadata, the data, the condition sampler, and with ``dmd.lora_rank > 0`` the
teacher as the adapters-disabled view of a shared LoRA base. :func:`student_and_critic` copies it into the
two trainable players of the DMD family."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ..config import DistillConfig
from ..data import load_dataset
from ..denoiser import Denoiser
from ..errors import ConfigError
from ..models import ModelMeta, load_denoiser


@dataclass
class Setup:
    teacher: Denoiser
    meta: ModelMeta
    data: object                 # ArrayDataset (images in [-1, 1] / latents, labels)
    conds: object | None         # None: class labels (conditioning.ClassLabels); text teachers: a TextEmbeddingBank
    num_classes: int
    shared: object | None        # LoRA: the shared base (stepdistill.lora); None: full networks
    T: int                       # the teacher schedule's num_train_timesteps


def prepare(cfg: DistillConfig, teacher: Denoiser | None = None, meta: ModelMeta | None = None,
            data=None, text_bank=None) -> Setup:
    """Teacher, data and conditions for ``cfg`` (see :func:`stepdistill.trainers.distill.build_dmd`)."""
    teacher_given = teacher is not None
    if teacher is None:
        teacher, meta = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    if meta is not None and meta.student_timesteps and not cfg.dmd.allow_student_teacher:
        raise ConfigError(f"dmd.teacher {cfg.dmd.teacher} is a distilled student (timesteps {meta.student_timesteps}), "
                          "not a many-step teacher; its one-step score is not a data score. Use the teacher it came "
                          "from, or set dmd.allow_student_teacher=true if you mean it")
    data_given = data is not None
    if data is None and meta.conditioning != "text":
        data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
    num_classes = len(meta.class_names) if meta.conditioning == "class" else 0
    if num_classes and data.num_classes != num_classes:
        raise ValueError(f"teacher has {num_classes} classes but dataset {cfg.data.name} has {data.num_classes}")
    conds = None
    if meta.conditioning == "text":
        if text_bank is None and teacher_given:
            raise ValueError("a text-conditional teacher passed in Python needs text_bank=TextEmbeddingBank(...) "
                             "(stepdistill.conditioning): the prompt embeddings to distill on")
        if text_bank is None:  # from the config: the teacher's caption set + bank-aligned real data (text_distill.py)
            from .text_distill import text_distill_setup

            text_bank, data = text_distill_setup(cfg, meta, data if data_given else None)
        elif data is None:
            data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
        if cfg.dmd.regression_weight > 0 or cfg.dmd.regression_warmup_steps > 0:
            raise ValueError("dmd.regression_weight / dmd.regression_warmup_steps (DMD's ODE pairs) are not supported "
                             "for text teachers")
        conds = text_bank
        if teacher.null_cond is None:
            teacher.null_cond = text_bank.null_cond
    T = teacher.schedule.num_train_timesteps
    shared = None
    if cfg.dmd.lora_rank > 0:  # the teacher becomes the adapters-disabled view of its own backbone
        from ..lora import lora_teacher

        teacher, shared = lora_teacher(teacher, cfg.dmd, seed=cfg.train.seed)
    return Setup(teacher, meta, data, conds, num_classes, shared, T)


def check_student_timesteps(cfg: DistillConfig, s: Setup) -> None:
    if any(not 0 <= t < s.T for t in cfg.dmd.student_timesteps):
        raise ValueError(f"dmd.student_timesteps {cfg.dmd.student_timesteps} must lie in [0, {s.T})")


def student_and_critic(s: Setup) -> tuple[Denoiser, Denoiser]:
    """Two trainable copies of the teacher (LoRA: two adapter roles on the shared base), in train mode."""
    teacher = s.teacher
    if s.shared is not None:
        from ..lora import lora_roles

        student, critic = lora_roles(teacher, s.shared, ("student", "critic"))
    else:
        student = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                           teacher.null_class, teacher.null_cond)
        critic = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                          teacher.null_class, teacher.null_cond)
    student.backbone.train()
    critic.backbone.train()
    return student, critic
