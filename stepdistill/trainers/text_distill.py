"""Distilling a text teacher from a config alone: the prompt bank, bank-aligned real data, the student export.

DMD2 trains the student on the prompt distribution it will serve (Yin et al. 2024): by default the teacher's
own caption set (``stepdistill.json`` ``extra.text``: class names x templates), encoded once with the teacher's
text encoder into a :class:`~stepdistill.conditioning.TextEmbeddingBank` whose "" embedding is the CFG null
input. The GAN real branch needs (image, prompt) pairs: every real image gets one caption of its class
(:func:`stepdistill.text.bank_aligned`). Latent teachers (a ``vae/``) see VAE latents of the real images
(``vae.encode(x).latent_dist.mean * scaling_factor``). ``text.prompts: <file>`` distills on a prompt file
instead (no pairs: ``dmd.gan=false``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..data import ArrayDataset, load_dataset
from ..text import CAPTION_TEMPLATES, bank_aligned, caption_bank, prompt_bank
from ..text_models import (SD_PIPELINE, TEXT_PIPELINE, is_sd_family, load_text_components, save_text_folder,
                           text_meta)


def text_distill_setup(cfg, meta, data=None):
    """(TextEmbeddingBank, real data) for ``build_dmd`` from ``cfg.dmd.teacher`` and ``cfg.text``."""
    encoder, vae = load_text_components(cfg.dmd.teacher, meta, cfg.text.max_length or None)
    t = text_meta(meta)
    meta.extra = {**(meta.extra or {}), "text": {**t, "max_length": encoder.max_length}}  # export copies the encoder
    if cfg.text.prompts:
        from ..text import read_prompts

        if cfg.dmd.gan:
            raise ConfigError("text.prompts: a prompt file gives no (image, prompt) pairs for the GAN real branch; "
                              "set dmd.gan=false (or text.prompts='' for the teacher's caption set)")
        bank = prompt_bank(encoder, read_prompts(cfg.text.prompts))
        if data is None:
            data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
            data = ArrayDataset(data.images, torch.zeros_like(data.labels), list(data.class_names))
    else:
        names = t.get("class_names")
        if not names:
            raise ConfigError("text.prompts: the teacher has no caption set (stepdistill.json extra.text.class_names); "
                              "give a prompt file")
        templates = list(cfg.text.templates or t.get("templates") or CAPTION_TEMPLATES)
        bank = caption_bank(encoder, names, templates)
        if data is None:
            raw = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
            if list(raw.class_names) != list(names):
                raise ConfigError(f"data.name: {cfg.data.name} has classes {raw.class_names}, the teacher's captions "
                                  f"name {names}")
            data = bank_aligned(raw, len(templates), seed=cfg.train.seed)
    if vae is not None and data.images.shape[1] != vae.config.latent_channels:
        data = ArrayDataset(encode_latents(vae, data.images), data.labels, list(data.class_names))
    return bank, data


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> scaled VAE latents (the mean of the posterior)."""
    out = [vae.encode(images[i:i + batch_size].to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()


def save_text_student(out: Path, backbone, scheduler, smeta, teacher_src: str, teacher_meta) -> Path:
    """The student folder with the teacher's text encoder / tokenizer (and VAE) and an ``LCMScheduler`` whose
    boundary condition is off (``timestep_scaling`` 1e3: c_skip < 1e-9 at t >= 1), so its step with explicit
    ``timesteps`` is the student chain. SD-family components give a stock ``StableDiffusionPipeline`` folder."""
    from diffusers import LCMScheduler

    encoder, vae = load_text_components(teacher_src, teacher_meta)
    smeta.extra = {**(smeta.extra or {}), "text": text_meta(teacher_meta)}
    cls = SD_PIPELINE if is_sd_family(encoder.text_encoder, vae) else TEXT_PIPELINE
    if "FlowMatch" in type(scheduler).__name__:  # flow teachers keep the stochastic flow scheduler (see distill.py)
        return save_text_folder(out, backbone, scheduler, smeta, TEXT_PIPELINE, encoder, vae=vae)
    T = scheduler.config.num_train_timesteps
    import inspect

    keep = set(inspect.signature(LCMScheduler.__init__).parameters)  # DDPM-only keys (variance_type) dropped
    lcm = LCMScheduler.from_config({k: v for k, v in scheduler.config.items() if k in keep},
                                   timestep_scaling=1000.0, original_inference_steps=T,
                                   clip_sample=False, thresholding=False, steps_offset=1)
    if cls == SD_PIPELINE:  # the stock pipeline pads prompts to tokenizer.model_max_length: make it ours
        encoder.tokenizer.model_max_length = encoder.max_length
    return save_text_folder(out, backbone, lcm, smeta, cls, encoder, vae=vae)
