"""``stepdistill teacher`` with ``model.conditioning: text``: a pixel-space ``UNet2DConditionModel`` trained on
a captioned labelled dataset (every class name under several caption templates, :mod:`stepdistill.text`),
with caption dropout to "" for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import TeacherConfig
from ..data import load_dataset
from ..denoiser import Denoiser
from ..models import ModelMeta, build_scheduler
from ..schedules import VPSchedule
from ..text import CAPTION_TEMPLATES, CaptionConditioner, PromptEncoder, caption_bank
from ..text_models import TEXT_TEACHER_PIPELINE, build_text_unet, save_text_folder
from ..utils import atomic_folder
from .core import Trainer, raise_if_interrupted
from .diffusion import DiffusionObjective


def train_text_teacher(cfg: TeacherConfig, resume: bool | str = False, accelerator=None, overwrite: bool = False) -> Path:
    data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
    templates = list(cfg.text.templates or CAPTION_TEMPLATES)
    encoder = PromptEncoder.load(cfg.text.encoder, cfg.text.max_length or 16)
    bank = caption_bank(encoder, list(data.class_names), templates)       # (C*T, L, D), null = ""
    conds = CaptionConditioner(bank, len(templates))
    unet = build_text_unet(cfg.model, encoder.dim, data.channels, data.resolution)
    scheduler = build_scheduler(cfg.model)
    schedule = VPSchedule(scheduler.alphas_cumprod.clone(), dict(scheduler.config))
    den = Denoiser(unet, schedule, cfg.model.prediction_type, null_cond=bank.null_cond)
    o = cfg.optim
    obj = DiffusionObjective(den, dict(scheduler.config), 0, o.lr, (o.beta1, o.beta2), o.weight_decay,
                             o.grad_clip, o.warmup_steps, cfg.cfg_dropout, cfg.sample_steps, cfg.guidance_scale,
                             conds=conds)
    trainer = Trainer(obj, cfg, accelerator=accelerator, data=data)
    trainer.command = "teacher"
    result = trainer.train(resume=resume, overwrite=overwrite)
    raise_if_interrupted(trainer, result)
    out = Path(cfg.output_dir) / "model"
    if trainer.acc.is_main_process:
        meta = ModelMeta(prediction_type=cfg.model.prediction_type, conditioning="text", class_names=[],
                         extra={"dataset": cfg.data.name, "steps": trainer.step,
                                "text": {"class_names": list(data.class_names), "templates": templates,
                                         "source_encoder": cfg.text.encoder}})
        with atomic_folder(out, overwrite=True) as tmp:  # the run's own folder: replaced as a whole
            save_text_folder(tmp, trainer.ema["model"], scheduler, meta, TEXT_TEACHER_PIPELINE, encoder)
            (tmp / "training_result.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"text teacher saved to {out}")
    return out
