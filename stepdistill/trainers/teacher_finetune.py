"""``stepdistill teacher`` from a trained model (``finetune.init``): a full fine-tune, or a LoRA adapter on the frozen
model (``finetune.lora_rank > 0``), on all of the data or on a class-restricted / transformed part of it.

The LoRA case is how a user makes a *style* LoRA for their teacher (the diffusers ``train_text_to_image_lora``
recipe): the same denoising objective (Ho et al. 2020, Eq. 14; CFG dropout as for the teacher) trains only
``W + (alpha / r) B A`` in the chosen layers (Hu et al. 2022). Because the adapter is written in diffusers' LoRA
format, it loads with ``load_lora_adapter`` / ``load_lora_weights`` beside a distilled LoRA of the same teacher and
stacks with ``set_adapters`` (``docs/methods/lora_stacking.md``).

The export is the teacher's own folder layout (merged weights: a plain model that stock diffusers loads) plus
``lora/`` with the adapter in peft's, diffusers' and kohya's formats, as for a distilled LoRA student.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import ArrayDataset
from ..denoiser import Denoiser, component_name
from ..errors import ConfigError
from ..models import ModelMeta, load_denoiser, load_scheduler_config


@dataclass
class FinetuneStart:
    den: Denoiser            # the network to train (LoRA: a Denoiser over the adapter's view)
    meta: ModelMeta          # the init's metadata (class names, prediction type, text caption set)
    scheduler: object        # the init's diffusers scheduler (saved with the result)
    conds: object | None     # text: a CaptionConditioner over the init's own caption bank
    encoder: object | None   # text: the init's PromptEncoder (saved with the result)
    vae: object | None       # a latent text model's VAE (the data is trained as its latents; saved with the result)
    data: ArrayDataset       # what the objective trains on (latent models: the images' VAE latents)


def restrict(data: ArrayDataset, classes: list, transform: str) -> ArrayDataset:
    """The training images of ``classes`` only (names or indices; [] = all), with ``transform`` applied
    (:func:`stepdistill.trainers.pso_data.apply_transform`: none | invert | bold)."""
    from .pso_data import apply_transform, select_classes

    images, labels = data.tensors
    if classes:
        try:
            images, labels = select_classes(images, labels, classes, list(data.class_names), "finetune.classes",
                                            "the training data")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return ArrayDataset(apply_transform(images, transform), labels, list(data.class_names))


def finetune_start(cfg, data: ArrayDataset) -> FinetuneStart:
    """Load ``finetune.init`` and make what the denoising objective trains (the model, or a LoRA view of it)."""
    from diffusers import DDPMScheduler

    f = cfg.finetune
    den, meta = load_denoiser(f.init)
    if den.schedule.kind != "vp":
        raise ConfigError(f"finetune.init: {f.init} is a {den.schedule.kind} model; stepdistill teacher trains the "
                          "VP denoising objective (DDPM / DDIM-family schedulers)")
    scheduler = DDPMScheduler.from_config(load_scheduler_config(f.init, None))
    conds = encoder = vae = None
    if meta.conditioning == "text":
        from ..text import CaptionConditioner, caption_bank
        from ..text_models import load_text_components, text_meta

        t = text_meta(meta)
        names, templates = list(t.get("class_names") or []), list(t.get("templates") or [])
        if not names or not templates:
            raise ConfigError(f"finetune.init: {f.init} has no caption set (stepdistill.json extra.text)")
        _check_names(names, data)
        encoder, vae = load_text_components(f.init, meta, cfg.text.max_length or None)
        conds = CaptionConditioner(caption_bank(encoder, names, templates), len(templates))
        if vae is not None:  # a latent model (Stable-Diffusion style) learns the scaled VAE latents of the images
            from ..text_models import encode_latents

            with torch.no_grad():
                data = ArrayDataset(encode_latents(vae, data.images), data.labels, list(data.class_names))
    elif meta.conditioning == "class":
        _check_names(list(meta.class_names), data)
    backbone = den.backbone
    if f.lora_rank > 0:
        from ..lora import SharedLoRA

        shared = SharedLoRA(backbone, f.lora_rank, f.lora_alpha, f.lora_targets, seed=cfg.train.seed)
        shared.add_adapter("style")
        backbone = shared.view("style")
    null_cond = conds.null_cond if conds is not None else None
    den = Denoiser(backbone, den.schedule, den.prediction_type, null_class=meta.null_class, null_cond=null_cond)
    if tuple(data.images.shape[1:]) != tuple(den.sample_shape):
        raise ConfigError(f"data.resolution: the data's samples are {tuple(data.images.shape[1:])}, finetune.init "
                          f"{f.init} denoises {tuple(den.sample_shape)} (set data.resolution / data.channels)")
    return FinetuneStart(den, meta, scheduler, conds, encoder, vae, data)


def init_pipeline_class(init: str, default: str) -> str:
    """The pipeline class the init's ``model_index.json`` names (a stock ``StableDiffusionPipeline`` teacher stays
    one), else ``default``."""
    import json

    from ..models import _resolve

    index = Path(_resolve(str(init))) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name") or default
    return default


def _check_names(names: list[str], data: ArrayDataset) -> None:
    if list(data.class_names) != names:
        raise ConfigError(f"data.name: the data's classes {list(data.class_names)} are not the classes of "
                          f"finetune.init {names} (same names, same order)")


def save_finetuned(folder: Path, start: FinetuneStart, trained, cfg, extra: dict, pipeline_class: str) -> None:
    """Write the fine-tuned model (``trained``: the EMA network; a LoRA view is merged into a plain copy) in the
    init's layout, plus ``lora/`` (peft, diffusers, kohya files) for a LoRA."""
    from ..models import save_model_folder

    f = cfg.finetune
    lora_view = trained if getattr(trained, "is_lora_view", False) is True else None
    backbone = lora_view.merged() if lora_view is not None else trained
    m = start.meta
    extra = {**(m.extra or {}), **extra, "finetuned_from": f.init,
             "finetune": {"classes": list(f.classes), "transform": f.transform, "lora_rank": f.lora_rank}}
    meta = ModelMeta(prediction_type=m.prediction_type, conditioning=m.conditioning, class_names=list(m.class_names),
                     null_class=m.null_class, extra=extra)
    if lora_view is not None:
        from ..lora import lora_file_names

        meta.extra["lora"] = {"rank": f.lora_rank, "alpha": f.lora_alpha or f.lora_rank, "targets": list(f.lora_targets),
                              "adapter": "lora/", "files": lora_file_names(component_name(backbone))}
    if start.encoder is not None:
        from ..text_models import save_text_folder

        save_text_folder(folder, backbone, start.scheduler, meta, pipeline_class, start.encoder, vae=start.vae)
    else:
        save_model_folder(folder, backbone, start.scheduler, meta, pipeline_class)
    if lora_view is not None:
        from ..lora import write_lora_files

        lora_view.save_adapter(folder / "lora")
        write_lora_files(lora_view.shared.adapter_state_dict(lora_view.adapter), folder / "lora", f.lora_rank,
                         f.lora_alpha, component_name(backbone))
