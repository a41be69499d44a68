"""``stepdistill distill``: build teacher / student / critic from a config, train, export."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..config import DistillConfig
from ..data import load_dataset
from ..denoiser import Denoiser
from ..models import ModelMeta, load_denoiser, load_scheduler_config, save_model_folder
from ..pairs import teacher_ode_pairs
from ..utils import atomic_folder, atomic_write_text
from .core import Trainer, raise_if_interrupted
from .dmd import DMDObjective

STUDENT_PIPELINE = "StepDistillPipeline"


def build_dmd(cfg: DistillConfig, teacher: Denoiser | None = None, meta: ModelMeta | None = None,
              data=None, text_bank=None) -> tuple[DMDObjective, object, ModelMeta]:
    """Teacher (frozen real score), student and critic (both initialised from the teacher).

    ``text_bank``: a :class:`~stepdistill.conditioning.TextEmbeddingBank` of prompt embeddings, required
    when ``meta.conditioning == "text"`` (its empty-prompt embedding is the teacher's CFG null input);
    ``data`` is then an ``ArrayDataset`` of latents (for the shape, and for the GAN real branch: labels
    = bank indices). ``dmd.lora_rank > 0``: student and critic are LoRA adapters on the teacher itself
    (:mod:`stepdistill.lora`; one copy of the base weights in memory).
    """
    if cfg.method in ("pso", "pso_naive"):  # tune a distilled model (trainers/pso.py): ``teacher`` = that model
        from .pso import build_pso

        return build_pso(cfg, model=teacher, meta=meta, data=data)
    teacher_given = teacher is not None
    if teacher is None:
        teacher, meta = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    if meta is not None and meta.student_timesteps and not cfg.dmd.allow_student_teacher:
        from ..errors import ConfigError

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
    if cfg.method == "phased_dmd":  # one expert per phase (trainers/phased_dmd.py); DMD's path below is unchanged
        from ..lora import apply_teacher_options
        from .phased_dmd import build_phased_dmd

        if conds is not None and cfg.dmd.gan:
            raise ValueError("phased_dmd with a text teacher needs dmd.gan=false")
        obj = build_phased_dmd(cfg, teacher, num_classes, tuple(data.images.shape[1:]))
        if conds is not None:
            obj.conds = conds
        apply_teacher_options(obj.teacher, cfg.dmd, shared)
        obj.data_std = float(data.images[:2048].float().std())
        return obj, data, meta
    if any(not 0 <= t < T for t in cfg.dmd.student_timesteps):
        raise ValueError(f"dmd.student_timesteps {cfg.dmd.student_timesteps} must lie in [0, {T})")
    if cfg.method == "msd":  # K students, one per class group (trainers/multi_student.py)
        from .multi_student import build_multi_student

        return build_multi_student(cfg, teacher, num_classes, data), data, meta
    if shared is not None:
        from ..lora import lora_roles

        student, critic = lora_roles(teacher, shared, ("student", "critic"))
    else:
        student = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                           teacher.null_class, teacher.null_cond)
        critic = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                          teacher.null_class, teacher.null_cond)
    student.backbone.train()
    critic.backbone.train()
    from ..lora import apply_teacher_options

    apply_teacher_options(teacher, cfg.dmd, shared)  # after the copies: student and critic stay float32
    shape = tuple(data.images.shape[1:])
    pairs = None
    if cfg.dmd.regression_weight > 0 or cfg.dmd.regression_warmup_steps > 0:
        pairs = teacher_ode_pairs(teacher, cfg.dmd, num_classes, shape, seed=cfg.train.seed)
    if cfg.method == "rcm":  # sCM + DMD regulariser (trainers/rcm.py): the same players
        from .rcm import RCMObjective

        obj = RCMObjective(teacher, student, critic, cfg.dmd, num_classes, shape, regression_pairs=pairs,
                           seed=cfg.train.seed, conds=conds, rcm=cfg.rcm)
    else:
        obj = DMDObjective(teacher, student, critic, cfg.dmd, num_classes, shape, regression_pairs=pairs,
                           seed=cfg.train.seed, conds=conds)
    obj.data_std = float(data.images[:2048].float().std())  # normalises the collapse guard's diversity
    return obj, data, meta


def distill(cfg: DistillConfig, resume: bool | str = False, accelerator=None, teacher: Denoiser | None = None,
            meta: ModelMeta | None = None, data=None, text_bank=None, overwrite: bool = False,
            fork: str | Path | None = None) -> Path:
    """Train and export. ``teacher``/``meta`` let Python users bring any ``nn.Module`` denoiser
    (see :mod:`stepdistill.denoiser` for the call signature) instead of ``cfg.dmd.teacher``;
    ``data`` / ``text_bank`` as in :func:`build_dmd` (text-conditional teachers). ``resume`` /
    ``overwrite`` / ``fork`` as in :meth:`~stepdistill.trainers.core.Trainer.train`; an interrupted run raises
    :class:`~stepdistill.errors.TrainingInterrupted` after saving its checkpoint."""
    if cfg.train.threads > 0:  # before the build: teacher ODE pairs are sampled there
        torch.set_num_threads(cfg.train.threads)
    obj, data, meta = build_dmd(cfg, teacher=teacher, meta=meta, data=data, text_bank=text_bank)
    trainer = Trainer(obj, cfg, accelerator=accelerator, data=data,
                      on_checkpoint=getattr(obj, "on_checkpoint", None))  # PSO keeps its online references
    result = trainer.train(resume=resume, overwrite=overwrite, fork=fork)
    raise_if_interrupted(trainer, result)
    out = Path(cfg.output_dir) / "student"
    ema = trainer.plain_ema()  # FSDP: gathered copies (collective)
    if trainer.acc.is_main_process:
        with atomic_folder(out, overwrite=True) as tmp:  # the run's own student: replaced as a whole
            if cfg.method == "phased_dmd":
                from .phased_dmd import export_phased

                experts = [ema[f"expert_{k}"] for k in range(obj.K)]
                export_phased(experts, cfg, meta, tmp, schedule=obj.experts[0].schedule)  # merges LoRA experts
            elif cfg.method == "msd":
                from .multi_student import export_multi_student

                export_multi_student([ema[f"student_{k}"] for k in range(obj.K)], cfg, meta, tmp, obj.groups,
                                     schedule=obj.students[0].schedule)
            else:
                export_student(ema["generator"], cfg, meta, tmp, schedule=obj.student.schedule)
        atomic_write_text(Path(cfg.output_dir) / "training_result.json", json.dumps(result, indent=2, default=str))
        print(f"student exported to {out}")
    return out


def export_student(backbone, cfg: DistillConfig, meta: ModelMeta, out: Path, schedule=None) -> Path:
    """EMA student -> diffusers folder (safetensors unet + stock DDPMScheduler config + pipeline index).

    A custom ``nn.Module`` student (no ``save_pretrained``) is written as
    ``unet/model.safetensors`` + ``unet/config.json`` naming its class; rebuild the module
    yourself and ``load_state_dict`` (we never unpickle or import code from a model folder).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    pso = cfg.method in ("pso", "pso_naive")  # a tuned distilled model (trainers/pso.py) keeps meta's timesteps
    base = cfg.pso.model if pso else cfg.dmd.teacher
    if schedule is not None and hasattr(schedule, "config") and schedule.config:
        sched_cfg = dict(schedule.config)
    elif schedule is not None and schedule.kind == "flow":
        # stochastic_sampling: the stock scheduler's step is then x0 = x - sigma u, x' = (1 - sigma') x0 + sigma' eps
        # with fresh eps: exactly the student chain (set_timesteps(sigmas=[t / T for t in student_timesteps]))
        sched_cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", **schedule.to_config(),
                     "stochastic_sampling": True}
        sched_cfg.pop("kind", None)
    elif schedule is not None:  # a VP schedule given as alphas_cumprod only: recover the betas
        ac = schedule.alphas_cumprod
        betas = (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist()
        sched_cfg = {"num_train_timesteps": len(betas), "trained_betas": betas,
                     "prediction_type": meta.prediction_type, "clip_sample": False}
    else:
        sched_cfg = load_scheduler_config(base, None)
    sched_cls = FlowMatchEulerDiscreteScheduler if "FlowMatch" in sched_cfg.get("_class_name", "") else DDPMScheduler
    scheduler = sched_cls.from_config(sched_cfg)
    if sched_cls is DDPMScheduler:  # a stock loop's set_timesteps(K) lands on 999, ... (as LCM / TCD / Turbo students)
        scheduler.register_to_config(timestep_spacing="trailing")
    ts = meta.student_timesteps if pso else cfg.dmd.student_timesteps
    extra = {"teacher": (meta.extra or {}).get("teacher", base), "base_model": base} if pso else {"teacher": base}
    smeta = ModelMeta(prediction_type=meta.prediction_type, conditioning=meta.conditioning,
                      class_names=list(meta.class_names), null_class=meta.null_class,
                      student_timesteps=[float(t) for t in ts], method=cfg.method,
                      extra={**extra, "config": json.loads(json.dumps(_cfg_dict(cfg)))})
    lora_view = backbone if getattr(backbone, "is_lora_view", False) is True else None
    if lora_view is not None:  # LoRA student: a plain merged model, plus the adapter alone in lora/ (peft format)
        backbone = lora_view.merged()
        smeta.extra["lora"] = {"rank": cfg.dmd.lora_rank, "alpha": cfg.dmd.lora_alpha or cfg.dmd.lora_rank,
                               "targets": list(cfg.dmd.lora_targets), "adapter": "lora/"}
    if smeta.conditioning == "text" and not pso and "text" in (meta.extra or {}):  # teacher from a text folder:
        # + text encoder, tokenizer, VAE, LCMScheduler (text_distill.py)
        from .text_distill import save_text_student

        save_text_student(out, backbone, scheduler, smeta, base, meta)
    else:
        save_model_folder(out, backbone, scheduler, smeta, STUDENT_PIPELINE)
    if lora_view is not None:
        lora_view.save_adapter(out / "lora")
    index = json.loads((out / "model_index.json").read_text())
    index.update({"student_timesteps": smeta.student_timesteps, "class_names": smeta.class_names,
                  "prediction_type": smeta.prediction_type})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    from ..modelcard import write_model_card

    write_model_card(out, method=cfg.method, teacher=base, steps=smeta.student_timesteps,
                     config=_cfg_dict(cfg), metrics=None, class_names=smeta.class_names)
    return out


def _cfg_dict(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)


def load_trained_generator(cfg: DistillConfig, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """EMA generator weights from a run's checkpoint (latest by default), for ``stepdistill export``."""
    from .core import load_ema_weights

    obj, _, _ = build_dmd(cfg)
    load_ema_weights(cfg.output_dir, {"generator": obj.student.backbone}, checkpoint)
    return obj.student.backbone
