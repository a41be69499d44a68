"""``stepdistill teacher``: train a class-conditional diffusers UNet2DModel and save it as a folder."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import TeacherConfig
from ..data import load_dataset
from ..denoiser import Denoiser
from ..models import ModelMeta, build_scheduler, build_teacher_unet, save_model_folder
from ..schedules import VPSchedule
from ..utils import atomic_folder
from .core import Trainer, raise_if_interrupted
from .diffusion import DiffusionObjective

TEACHER_PIPELINE = "StepDistillTeacherPipeline"


def train_teacher(cfg: TeacherConfig, resume: bool | str = False, accelerator=None, overwrite: bool = False) -> Path:
    if cfg.model.conditioning == "text":  # UNet2DConditionModel on captions (trainers/text_teacher.py)
        from .text_teacher import train_text_teacher

        return train_text_teacher(cfg, resume=resume, accelerator=accelerator, overwrite=overwrite)
    data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
    unet = build_teacher_unet(cfg.model, data.num_classes, data.channels, data.resolution)
    scheduler = build_scheduler(cfg.model)
    schedule = VPSchedule(scheduler.alphas_cumprod.clone(), dict(scheduler.config))
    den = Denoiser(unet, schedule, cfg.model.prediction_type, null_class=data.num_classes)
    o = cfg.optim
    obj = DiffusionObjective(den, dict(scheduler.config), data.num_classes, o.lr, (o.beta1, o.beta2), o.weight_decay,
                             o.grad_clip, o.warmup_steps, cfg.cfg_dropout, cfg.sample_steps, cfg.guidance_scale)
    trainer = Trainer(obj, cfg, accelerator=accelerator, data=data)
    trainer.command = "teacher"
    result = trainer.train(resume=resume, overwrite=overwrite)
    raise_if_interrupted(trainer, result)
    out = Path(cfg.output_dir) / "model"
    if trainer.acc.is_main_process:
        meta = ModelMeta(prediction_type=cfg.model.prediction_type, conditioning="class",
                         class_names=list(data.class_names), null_class=data.num_classes,
                         extra={"dataset": cfg.data.name, "steps": trainer.step})
        with atomic_folder(out, overwrite=True) as tmp:  # the run's own folder: replaced as a whole
            save_model_folder(tmp, trainer.ema["model"], scheduler, meta, TEACHER_PIPELINE)
            (tmp / "training_result.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"teacher saved to {out}")
    return out
