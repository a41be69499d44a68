"""``stepdistill sample`` for text-to-image models: ``--prompt`` (repeatable or ``a|b``), ``--negative-prompt``."""
from __future__ import annotations

import json
from pathlib import Path

from .models import ModelMeta, _resolve


def is_text_model(path: str) -> bool:
    """True when the folder's ``stepdistill.json`` says ``conditioning: text`` (reads no weights)."""
    p = Path(_resolve(str(path)))
    meta = ModelMeta.load(p) if p.is_dir() else None
    return meta is not None and meta.conditioning == "text"


def default_prompts(meta: ModelMeta) -> list[str]:
    """The model's caption set, first template of every class ("a cat", ...) or ``["" ]`` without one."""
    names = ((meta.extra or {}).get("text") or {}).get("class_names") or []
    templates = ((meta.extra or {}).get("text") or {}).get("templates") or ["{name}"]
    return [templates[0].format(name=n) for n in names] or [""]


def sample_text(a) -> None:
    """Write a grid: ``--num`` images split evenly over the prompts (one column per prompt with --nrow)."""
    import torch

    from .config import ConfigError
    from .pipelines.text import StepDistillTextPipeline, load_text_pipeline
    from .utils import save_grid

    pipe = load_text_pipeline(a.model, allow_pickle=a.allow_pickle)
    prompts = [s for p in (a.prompt or []) for s in p.split("|")] or default_prompts(pipe.meta)
    if a.classes:
        raise ConfigError("--classes is for class-conditional models; give text models --prompt")
    reps = max(1, a.num // len(prompts))
    g = torch.Generator().manual_seed(a.seed)
    if isinstance(pipe, StepDistillTextPipeline):
        if a.negative_prompt:
            raise ConfigError("--negative-prompt: a distilled student has its guidance built in (the teacher's "
                              "negative prompt was the empty prompt); sample the teacher to use one")
        if a.steps is not None and not 1 <= a.steps <= len(pipe.config.student_timesteps):
            raise ConfigError(f"--steps must be in 1..{len(pipe.config.student_timesteps)} for this student")
        x = pipe(prompts, num_images_per_prompt=reps, num_inference_steps=a.steps, generator=g, output_type="pt").images
    else:
        x = pipe(prompts, negative_prompt=a.negative_prompt, num_images_per_prompt=reps,
                 num_inference_steps=a.steps or 50, guidance_scale=a.guidance_scale, sampler=a.scheduler or "ddim",
                 generator=g, output_type="pt", progress=True).images
    # prompt-major batch -> grid with one column per prompt: reorder to (rep, prompt)
    x = x.reshape(len(prompts), reps, *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
    path = save_grid(x.clamp(-1, 1), a.out, nrow=len(prompts) if a.nrow == 10 else a.nrow, scale=a.scale)
    print(json.dumps({"grid": str(path), "n": int(x.shape[0]), "prompts": prompts}))
