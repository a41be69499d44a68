"""A text model folder (or ``builtin:`` name) -> its pipeline: text-to-image (:mod:`.text`) or text-to-video
(:mod:`.video`), teacher or distilled student, by what the folder holds."""
from __future__ import annotations

from pathlib import Path

from .text import StepDistillTextPipeline, StepDistillTextTeacherPipeline
from .video import StepDistillVideoPipeline, StepDistillVideoTeacherPipeline


def load_text_pipeline(path: str | Path, allow_pickle: bool = False):
    """A text teacher or student folder (or ``builtin:`` name) -> its pipeline. Works for folders that only
    reference their text encoder (``stepdistill.json`` ``extra.text.encoder``, e.g. the shipped MiniLM)."""
    import diffusers

    from ..models import load_denoiser, load_scheduler_config
    from ..text_models import load_text_components

    den, meta = load_denoiser(path, allow_pickle=allow_pickle)
    if meta.conditioning != "text":
        raise ValueError(f"{path} is not a text-conditioned model (conditioning: {meta.conditioning})")
    encoder, vae = load_text_components(path, meta)
    sched_cfg = load_scheduler_config(path, None)
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    scheduler = sched_cls.from_config(sched_cfg)
    kw = dict(scheduler=scheduler, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer,
              vae=vae, max_length=encoder.max_length, prediction_type=meta.prediction_type)
    if den.kind == "wan":  # text-to-video (pipelines/video.py)
        student_cls, teacher_cls, kw["transformer"] = StepDistillVideoPipeline, StepDistillVideoTeacherPipeline, \
            den.backbone
    else:
        student_cls, teacher_cls, kw["unet"] = StepDistillTextPipeline, StepDistillTextTeacherPipeline, den.backbone
    if (meta.extra or {}).get("causal"):  # a causal / streaming video student (trainers/causal.py)
        kw["causal"] = dict(meta.extra["causal"])
    if meta.student_timesteps:
        pipe = student_cls(student_timesteps=meta.student_timesteps, **kw)
    else:
        pipe = teacher_cls(**kw)
    pipe.meta = meta
    return pipe
