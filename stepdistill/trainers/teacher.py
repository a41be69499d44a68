"""``stepdistill teacher``: train a teacher and save it as a diffusers folder.

* ``model.conditioning: class``: a class-conditional ``UNet2DModel`` (null class = num_classes, for CFG);
* ``model.conditioning: text``: a pixel-space ``UNet2DConditionModel`` on a captioned labelled dataset (every
  class name under several caption templates, :mod:`stepdistill.text`), with caption dropout to "" for
  classifier-free guidance (Ho & Salimans 2022, Sec. 3.2).

Both train the one denoising objective (:mod:`stepdistill.trainers.diffusion`) in the one trainer core."""
from __future__ import annotations

import json
from pathlib import Path

import torch

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
    data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
    if cfg.finetune.init or cfg.finetune.classes or cfg.finetune.transform != "none":
        from .teacher_finetune import restrict

        data = restrict(data, cfg.finetune.classes, cfg.finetune.transform)
    if cfg.finetune.init:
        return _finetune(cfg, data, resume, accelerator, overwrite)
    video = cfg.model.family == "wan"
    if video:  # a video transformer trained with flow matching (stepdistill/video_models.py)
        from ..schedules import FlowMatchSchedule
        from ..video_models import video_scheduler

        scheduler = video_scheduler(cfg.model)
        schedule = FlowMatchSchedule.from_scheduler_config(dict(scheduler.config))
    else:
        scheduler = build_scheduler(cfg.model)
        schedule = VPSchedule(scheduler.alphas_cumprod.clone(), dict(scheduler.config))
    prediction_type = "flow_prediction" if video else cfg.model.prediction_type
    text = cfg.model.conditioning == "text"
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed alone
        torch.manual_seed(cfg.train.seed)
        if text:
            from ..text import CAPTION_TEMPLATES, CaptionConditioner, PromptEncoder, caption_bank
            from ..text_models import build_text_unet

            templates = list(cfg.text.templates or CAPTION_TEMPLATES)
            encoder = PromptEncoder.load(cfg.text.encoder, cfg.text.max_length or 16)
            bank = caption_bank(encoder, list(data.class_names), templates)       # (C*T, L, D), null = ""
            if video:
                from ..video_models import build_video_transformer

                unet = build_video_transformer(cfg.model, encoder.dim, data.channels, data.frames, data.resolution)
            else:
                unet = build_text_unet(cfg.model, encoder.dim, data.channels, data.resolution)
            den = Denoiser(unet, schedule, prediction_type, null_cond=bank.null_cond)
            obj = DiffusionObjective(den, dict(scheduler.config), 0, cfg.optim, cfg.cfg_dropout, cfg.sample_steps,
                                     cfg.guidance_scale, conds=CaptionConditioner(bank, len(templates)))
        else:
            unet = build_teacher_unet(cfg.model, data.num_classes, data.channels, data.resolution)
            den = Denoiser(unet, schedule, cfg.model.prediction_type, null_class=data.num_classes)
            obj = DiffusionObjective(den, dict(scheduler.config), data.num_classes, cfg.optim, cfg.cfg_dropout,
                                     cfg.sample_steps, cfg.guidance_scale)

    def save(tmp: Path, model, extra: dict) -> None:
        if text:
            from ..text_models import TEXT_TEACHER_PIPELINE, save_text_folder

            extra["text"] = {"class_names": list(data.class_names), "templates": templates,
                             "source_encoder": cfg.text.encoder}
            if video:
                from ..video_models import VIDEO_TEACHER_PIPELINE

                extra["sample_shape"] = list(den.sample_shape)                      # (C, F, H, W)
            meta = ModelMeta(prediction_type=prediction_type, conditioning="text", class_names=[], extra=extra)
            save_text_folder(tmp, model, scheduler, meta, VIDEO_TEACHER_PIPELINE if video else TEXT_TEACHER_PIPELINE,
                             encoder)
        else:
            meta = ModelMeta(prediction_type=cfg.model.prediction_type, conditioning="class",
                             class_names=list(data.class_names), null_class=data.num_classes, extra=extra)
            save_model_folder(tmp, model, scheduler, meta, TEACHER_PIPELINE)

    return _train_and_save(cfg, obj, data, resume, accelerator, overwrite, save, "text teacher" if text else "teacher")


def _train_and_save(cfg: TeacherConfig, obj, data, resume, accelerator, overwrite: bool, save, what: str) -> Path:
    """Train ``obj`` in the one trainer core, then write the run's ``model/`` folder with ``save(tmp, ema network,
    extra metadata)`` (the run's own folder: replaced whole)."""
    trainer = Trainer(obj, cfg, accelerator=accelerator, data=data)
    trainer.command = "teacher"
    result = trainer.train(resume=resume, overwrite=overwrite)
    raise_if_interrupted(trainer, result)
    out = Path(cfg.output_dir) / "model"
    if trainer.acc.is_main_process:
        with atomic_folder(out, own=True) as tmp:
            save(tmp, trainer.ema["model"], {"dataset": cfg.data.name, "steps": trainer.step})
            (tmp / "training_result.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"{what} saved to {out}")
    return out


def _finetune(cfg: TeacherConfig, data, resume, accelerator, overwrite: bool) -> Path:
    """``finetune.init``: the same denoising objective from a trained model (LoRA: its adapter only)."""
    from .teacher_finetune import finetune_start, init_pipeline_class, save_finetuned

    start = finetune_start(cfg, data)
    data = start.data
    text = start.conds is not None
    num_classes = 0 if text else data.num_classes
    obj = DiffusionObjective(start.den, dict(start.scheduler.config), num_classes, cfg.optim, cfg.cfg_dropout,
                             cfg.sample_steps, cfg.guidance_scale, conds=start.conds)
    from ..text_models import TEXT_TEACHER_PIPELINE

    pipeline = init_pipeline_class(cfg.finetune.init, TEXT_TEACHER_PIPELINE if text else TEACHER_PIPELINE)
    return _train_and_save(cfg, obj, data, resume, accelerator, overwrite,
                           lambda tmp, model, extra: save_finetuned(tmp, start, model, cfg, extra, pipeline),
                           f"fine-tuned {'LoRA' if cfg.finetune.lora_rank else 'model'} of {cfg.finetune.init}")
