"""Evaluation of text-to-image models: generate from prompts, then FID / KID, class accuracy, diversity and
CLIP score (Hessel et al. 2021; :mod:`stepdistill.eval.clip_score`).

Prompts come from ``--prompts FILE`` or, by default, the model's caption set (``stepdistill.json``
``extra.text``: every class name under every template, :func:`stepdistill.text.caption_set`); sample ``i``
gets prompt ``i mod P``. A prompt names a class when exactly one class name occurs in it as a word
("a silhouette of a cat" -> cat); when every prompt names one, the shipped Animal-MNIST classifier scores
class accuracy as for class-conditional models, and diversity is measured within each prompt.

:class:`TextModel` is the text counterpart of :class:`~stepdistill.eval.generate.StudentModel` /
``TeacherModel`` (registered in ``TEXT_LOADERS``): the same ``generate`` contract, with ``prompts``.
Determinism: the starting noise of sample ``i`` depends only on ``seed`` and ``i``; teacher and student
draw the same noise for the same seed.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..denoiser import sample_shape
from ..text import caption_set
from ..text_models import text_meta
from .model import EvalModel

DEFAULT_TEXT_GUIDANCE = 3.0


class TextModel(EvalModel):
    """A text teacher or student behind the eval interface (``generate(prompts=..., n=...)``)."""

    is_text = True

    def __init__(self, path: str, meta, device):
        from ..pipelines.loading import load_text_pipeline
        from ..pipelines.text import StepDistillTextPipeline
        from ..text import TextEncoderError
        from .metrics import TextModelsNotSupported

        try:
            self.pipe = load_text_pipeline(path)
        except TextEncoderError as e:
            raise TextModelsNotSupported(f"{path} is a text-conditioned model but its text encoder cannot be "
                                         f"loaded: {e}") from e
        self.path, self.meta, self.device = str(path), meta, torch.device(device)
        self.pipe.to(self.device)
        self.kind = "student" if isinstance(self.pipe, StepDistillTextPipeline) else "teacher"
        # flow models (Wan, SD3) always integrate with the flow Euler scheduler (pipelines/sampling.make_scheduler)
        self.sampler = "flow_euler" if "FlowMatch" in type(self.pipe.scheduler).__name__ else "ddim"
        self.last_generate_s: float | None = None
        self.folder = Path(path) if Path(path).is_dir() else None

    # -- shape / conditions -------------------------------------------------------------------------
    @property
    def network(self):
        return self.pipe.unet

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of an image, (C, F, H, W) of a video clip."""
        shape = sample_shape(self.unet)
        if len(shape) == 4:  # video (pixel space)
            return tuple(shape)
        C, s, _ = shape
        if self.pipe.vae is not None:
            f = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
            return (int(self.pipe.vae.config.out_channels), s * f, s * f)
        return (C, s, s)

    @property
    def class_names(self) -> list[str]:
        return list(text_meta(self.meta).get("class_names") or [])

    num_classes = 0

    def default_prompts(self) -> list[str]:
        t = text_meta(self.meta)
        if not t.get("class_names"):
            raise ConfigError(f"{self.path} has no caption set: give --prompts FILE")
        return caption_set(t["class_names"], t.get("templates"))

    def prompt_classes(self, prompts: list[str]) -> torch.Tensor | None:
        """(P,) class index named by each prompt, or None unless every prompt names exactly one class."""
        out = []
        for p in prompts:
            hits = [i for i, n in enumerate(self.class_names) if re.search(rf"\b{re.escape(n)}\b", p.lower())]
            if len(hits) != 1:
                return None
            out.append(hits[0])
        return torch.tensor(out, dtype=torch.long)

    # -- generation ----------------------------------------------------------------------------------
    def resolve_steps(self, steps: int | None) -> int:
        if self.kind == "teacher":
            steps = 50 if steps is None else int(steps)
            if steps < 1:
                raise ConfigError(f"teacher steps must be >= 1, got {steps}")
            return steps
        k = len(self.pipe.config.student_timesteps)
        steps = k if steps is None else int(steps)
        if not 1 <= steps <= k:
            raise ConfigError(f"steps must be in 1..{k} for this student ({self.path}), got {steps}")
        return steps

    def uses_cfg(self, guidance_scale: float | None) -> bool:
        return self.kind == "teacher" and (guidance_scale is None or guidance_scale != 1.0)

    @torch.no_grad()
    def generate(self, labels=None, n: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, batch_size: int = 64,
                 prompts: list[str] | None = None, progress: bool = True) -> torch.Tensor:
        """``n`` images (default: one per prompt), sample ``i`` from prompt ``i mod P``; (N, C, H, W) in [-1, 1]."""
        if labels is not None:
            raise ConfigError(f"{self.path} is a text-to-image model: give prompts, not class labels")
        prompts = list(prompts) if prompts is not None else self.default_prompts()
        n = len(prompts) if n is None else int(n)
        if n < 1 or batch_size < 1:
            raise ConfigError(f"number of samples and batch size must be >= 1, got {n}, {batch_size}")
        steps = self.resolve_steps(steps)
        per = [prompts[i % len(prompts)] for i in range(n)]
        emb = self.pipe.prompt_encoder().cached(prompts)                                  # (P, L, D)
        idx = torch.arange(n) % len(prompts)
        noise = torch.randn(n, *sample_shape(self.unet), generator=torch.Generator().manual_seed(int(seed)))
        renoise = torch.Generator().manual_seed(int(seed) + 1)
        gs = DEFAULT_TEXT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        out, t0 = [], time.perf_counter()
        for i in range(0, n, batch_size):
            cond = emb[idx[i:i + batch_size]].to(self.device)
            z = noise[i:i + batch_size]
            if self.kind == "student":
                x = self.pipe(prompt_embeds=cond, num_inference_steps=steps, latents=z, generator=renoise,
                              output_type="pt").images
            else:
                x = self.pipe(prompt_embeds=cond, num_inference_steps=steps, guidance_scale=gs, latents=z,
                              sampler=self.sampler, output_type="pt").images
            out.append(x.float().cpu())
        self.last_generate_s = time.perf_counter() - t0
        self.last_prompts = per
        return torch.cat(out).clamp(-1, 1)

    def describe(self) -> dict:
        return {**super().describe(), "conditioning": "text"}


def load_text_model(path, meta, device) -> TextModel:
    return TextModel(path, meta, device)


def evaluate_text(m: TextModel, prompts: list[str] | None, num: int, steps: int, guidance_scale: float, seed: int,
                  batch_size: int, ref: str | None, ref_split: str, ref_num: int | None, clip_model: str | None,
                  diversity_extractor: str = "auto", kid: bool = True, progress: bool = True) -> dict:
    """``stepdistill eval`` for a text model (see the module docstring)."""
    from .metrics import (classifier_accuracy, diversity_metric, fid_metrics, load_reference, reference_info,
                           training_dataset)

    prompts = prompts or m.default_prompts()
    x = m.generate(n=num, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                   prompts=prompts, progress=progress)
    gen_s = m.last_generate_s
    pidx = torch.arange(num) % len(prompts)
    pcls = m.prompt_classes(prompts)
    labels = pcls[pidx] if pcls is not None else None
    out = {"model": m.path, "kind": m.kind, "conditioning": "text", "steps": steps,
           "nfe_per_sample": m.nfe_per_sample(steps, guidance_scale), "num": num, "seed": seed,
           "batch_size": batch_size, "image_shape": list(m.image_shape), "num_prompts": len(prompts),
           "prompts_name_classes": pcls is not None}
    if m.kind == "teacher":
        out.update(guidance_scale=guidance_scale, sampler=m.sampler)
    ds_name, _ = training_dataset(m)
    ref_name = ref or ds_name
    if x.ndim == 5:  # video clips: per-frame FID, frame classes, temporal consistency, motion, collapse
        out.update(video_metrics(x, labels, pidx, ref_name or "moving_animal_mnist", ref_split, ref_num))
        out.update(generate_seconds=gen_s, latency_per_clip_s=gen_s / num,
                   frames_per_second=num * x.shape[2] / gen_s, device=str(m.device))
        return out
    if ref_name:
        ref_images, _, cache_key = load_reference(ref_name, m.resolution, m.channels, ref_split, ref_num)
        out["reference"] = reference_info(ref_name, ref_split, m.resolution, ref_images, cache_key)
        out.update(fid_metrics(x, ref_images, cache_key, kid=kid))
    else:
        out.update(fid=None, fid_note="no reference set: pass --ref")
    out.update(classifier_accuracy(x, labels, m.class_names))
    out.update(diversity_metric(x, pidx, diversity_extractor))
    if clip_model:
        from .clip_score import clip_score, load_clip

        model, proc = load_clip(clip_model, local_files_only=True)
        out.update(clip_score=clip_score(x, m.last_prompts, model, proc), clip_model=str(clip_model))
    else:
        out.update(clip_score=None, clip_note="pass --clip-model FOLDER (a local CLIP) for the CLIP score")
    out.update(generate_seconds=gen_s, latency_per_image_s=gen_s / num, device=str(m.device))
    return out


def video_metrics(x: torch.Tensor, labels, groups, ref_name: str, ref_split: str, ref_num: int | None) -> dict:
    """:func:`stepdistill.eval.video.evaluate_clips` against the real clips of ``ref_name``'s ``ref_split`` (the
    clip shape of ``x``), with the real clips' own temporal values beside them."""
    from ..data import load_dataset
    from .video import FRAME_CLASSIFIER_DIR, evaluate_clips, frame_accuracy, temporal_metrics

    _, _, F, H, _ = x.shape
    real = load_dataset(ref_name, H, ref_split, x.shape[1], F)
    idx = torch.arange(len(real.images))
    if ref_num is not None:  # a fixed random subset (the split is ordered by class)
        idx = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:ref_num].sort().values
    clips, ref_labels = real.images[idx], real.labels[idx]
    key = f"{ref_name}-{H}-{F}f-{ref_split}" + (f"-sub{len(clips)}" if ref_num is not None else "")
    out = {"reference": {"name": ref_name, "split": ref_split, "clips": len(clips), "frames": F, "resolution": H}}
    out.update(evaluate_clips(x, labels, clips, key, groups))
    real_stats = temporal_metrics(clips, ref_labels)
    if FRAME_CLASSIFIER_DIR.is_dir():
        real_stats["frame_class_accuracy"] = frame_accuracy(clips, ref_labels)
    out["real"] = real_stats
    return out
