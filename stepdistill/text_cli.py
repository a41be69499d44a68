"""``stepdistill sample`` for text-to-image models: ``--prompt`` (repeatable or ``a|b``), ``--negative-prompt``."""
from __future__ import annotations

import json
import sys
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
    from .utils import save_labeled_grid

    pipe = load_text_pipeline(a.model, allow_pickle=a.allow_pickle)
    if getattr(a, "compile", False):
        pipe.unet.compile()
    prompts = [s for p in (a.prompt or []) for s in p.split("|")] or default_prompts(pipe.meta)
    if a.classes:
        raise ConfigError("--classes is for class-conditional models; give text models --prompt")
    reps = max(1, a.num // len(prompts))
    if reps * len(prompts) != a.num:
        print(f"note: --num {a.num} over {len(prompts)} prompt(s) gives {reps * len(prompts)} images "
              f"({reps} per prompt); each prompt gets the same number", file=sys.stderr)
    g = torch.Generator().manual_seed(a.seed)
    if isinstance(pipe, StepDistillTextPipeline):
        if a.negative_prompt:
            raise ConfigError("--negative-prompt: a distilled student has its guidance built in (the teacher's "
                              "negative prompt was the empty prompt); sample the teacher to use one")
        if a.steps is not None and not 1 <= a.steps <= len(pipe.config.student_timesteps):
            raise ConfigError(f"--steps must be in 1..{len(pipe.config.student_timesteps)} for this student")
        ignored = [f for f, v in (("--scheduler", a.scheduler), ("--guidance-scale", a.guidance_scale)) if v is not None]
        if ignored:
            print(f"warning: {' and '.join(ignored)} ignored: a distilled student samples with its own chain, "
                  f"guidance built in", file=sys.stderr)
        x = pipe(prompts, num_images_per_prompt=reps, num_inference_steps=a.steps, generator=g, output_type="pt").images
    else:
        x = pipe(prompts, negative_prompt=a.negative_prompt, num_images_per_prompt=reps,
                 num_inference_steps=a.steps or 50, guidance_scale=2.0 if a.guidance_scale is None else a.guidance_scale, sampler=a.scheduler or "ddim",
                 generator=g, output_type="pt", progress=True).images
    # prompt-major batch -> grid with one column per prompt: reorder to (rep, prompt)
    x = x.reshape(len(prompts), reps, *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
    captions = [p for _ in range(reps) for p in prompts]
    path = save_labeled_grid(x.clamp(-1, 1), a.out, nrow=a.nrow or len(prompts), scale=a.scale, captions=captions)
    print(json.dumps({"grid": str(path), "n": int(x.shape[0]), "prompts": prompts}))
