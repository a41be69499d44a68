"""A trained student -> a diffusers folder: weights (safetensors), the stock scheduler, ``model_index.json``,
``stepdistill.json`` metadata and the model card (stepdistill/modelcard.py). The one exporter: every method's
exporter hands :func:`export_student` its extra networks, index entries, metadata and card edits
(:class:`ExportParts`), and each file is written once."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import DistillConfig
from ..denoiser import backbone_kind, component_name, sample_shape
from ..models import ModelMeta, load_scheduler_config, save_model_folder

STUDENT_PIPELINE = "StepDistillPipeline"


@dataclass
class ExportParts:
    """What a method adds to the student folder beside its main network (Phased DMD's experts, MSD's students).

    ``networks``: ``{subfolder: network}`` written next to the main one and listed in ``model_index.json``;
    ``index``: more ``model_index.json`` entries; ``pipeline``: the pipeline class it names (default
    ``StepDistillPipeline``); ``meta``: more ``stepdistill.json`` ``extra`` entries; ``card``: an edit of the model
    card's text (str -> str) applied before the card is written."""
    networks: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    pipeline: str | None = None
    meta: dict = field(default_factory=dict)
    card: Callable[[str], str] | None = None


def export_student(backbone, cfg: DistillConfig, meta: ModelMeta, out: Path, schedule=None, base: str | None = None,
                   timesteps: list[float] | None = None, extra: dict | None = None,
                   parts: ExportParts | None = None) -> Path:
    """EMA student -> diffusers folder (safetensors unet + stock DDPMScheduler config + pipeline index).

    ``base``: the model it was trained from (default ``dmd.teacher``; its scheduler config when ``schedule`` is
    None, and its text components for a text student); ``timesteps``: its sampling chain (default
    ``dmd.student_timesteps``); ``extra``: ``stepdistill.json`` provenance (default ``{"teacher": base}``).
    A tuned distilled model (PSO) passes all three (:func:`stepdistill.trainers.pso.export_tuned`). ``parts``: a
    method's extra networks, index entries, metadata and card edit (:class:`ExportParts`).

    A custom ``nn.Module`` student (no ``save_pretrained``) is written as
    ``unet/model.safetensors`` + ``unet/config.json`` naming its class; rebuild the module
    yourself and ``load_state_dict`` (we never unpickle or import code from a model folder).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    tuned = base is not None  # a tuned distilled model keeps its own chain and provenance
    base = base if tuned else cfg.dmd.teacher
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
    if sched_cls is DDPMScheduler:  # a stock loop's set_timesteps(K) lands on 999, ... (as LCM / TCD / Turbo students),
        # and its step() must not clip x0 mid-chain: the student chain never does
        scheduler.register_to_config(timestep_spacing="trailing", clip_sample=False)
    ts = cfg.dmd.student_timesteps if timesteps is None else timesteps
    extra = {"teacher": base} if extra is None else extra
    smeta = ModelMeta(prediction_type=meta.prediction_type, conditioning=meta.conditioning,
                      class_names=list(meta.class_names), null_class=meta.null_class,
                      student_timesteps=[float(t) for t in ts], method=cfg.method,
                      extra={**extra, "config": json.loads(json.dumps(_cfg_dict(cfg)))})
    parts = parts or ExportParts()
    smeta.extra.update(parts.meta)
    card_edit = parts.card
    start = _student_init_extra(cfg)
    pruned = start.get("pruned")
    if pruned is not None:  # a smaller student from stepdistill prune: its metadata and card say what went
        from ..pruning.folder import describe

        smeta.extra["pruned"] = pruned
        card_edit = _then(parts.card, lambda text: text.rstrip() + "\n\n## Pruned network\n\n" + describe(pruned)
                          + "\n")
    grown = start.get("grown")
    if grown is not None:  # a deeper student from stepdistill grow: its metadata and card say so
        from ..pruning.growth import describe as describe_grown

        smeta.extra["grown"] = grown
        card_edit = _then(card_edit, lambda text: text.rstrip() + "\n\n## Grown network\n\n" + describe_grown(grown)
                          + "\n")
    lora_view = backbone if getattr(backbone, "is_lora_view", False) is True else None
    if lora_view is not None:  # LoRA student: a plain merged model, plus the adapter in lora/ (three formats)
        from ..lora import lora_file_names

        backbone = lora_view.merged()
        component = component_name(backbone)
        smeta.extra["lora"] = {"rank": cfg.dmd.lora_rank, "alpha": cfg.dmd.lora_alpha or cfg.dmd.lora_rank,
                               "targets": list(cfg.dmd.lora_targets), "adapter": "lora/",
                               "files": lora_file_names(component)}
    index = {"student_timesteps": smeta.student_timesteps, "class_names": smeta.class_names,
             "prediction_type": smeta.prediction_type, **parts.index}
    if smeta.conditioning == "text" and not tuned and "text" in (meta.extra or {}):  # teacher from a text folder:
        save_text_student(out, backbone, scheduler, smeta, base, meta, parts, index)  # + encoder, tokenizer, VAE
    else:
        save_model_folder(out, backbone, scheduler, smeta, parts.pipeline or STUDENT_PIPELINE, parts=parts.networks,
                          index_extra=index)
    if lora_view is not None:  # peft's format, diffusers' (load_lora_weights) and kohya's (ComfyUI / A1111)
        from ..lora import write_lora_files

        lora_view.save_adapter(out / "lora")
        write_lora_files(lora_view.shared.adapter_state_dict(lora_view.adapter), out / "lora", cfg.dmd.lora_rank,
                         cfg.dmd.lora_alpha, component)
    from ..modelcard import write_model_card

    write_model_card(out, method=cfg.method, teacher=base, steps=smeta.student_timesteps,
                     config=_cfg_dict(cfg), metrics=None, class_names=smeta.class_names, edit=card_edit)
    return out


def _student_init_extra(cfg) -> dict:
    """The ``stepdistill.json`` ``extra`` of ``dmd.student_init`` ({} without one): its ``pruned`` record
    (``stepdistill prune``) or ``grown`` record (``stepdistill grow``) says what network the student started as."""
    init = getattr(cfg.dmd, "student_init", "")
    if not init:
        return {}
    from ..models import meta_extra

    return meta_extra(init, cfg.dmd.allow_pickle)


def _then(first, second):
    """Two card edits in turn (``first`` may be None)."""
    return second if first is None else (lambda text: second(first(text)))


def save_text_student(out: Path, backbone, scheduler, smeta, teacher_src: str, teacher_meta,
                      parts: ExportParts | None = None, index_extra: dict | None = None) -> Path:
    """The student folder with the teacher's text encoder / tokenizer (and VAE) and an ``LCMScheduler`` whose
    boundary condition is off (``timestep_scaling`` 1e3: c_skip < 1e-9 at t >= 1), so its step with explicit
    ``timesteps`` is the student chain. SD-family components give a stock ``StableDiffusionPipeline`` folder."""
    import inspect

    from diffusers import LCMScheduler

    from ..text_models import (SD_PIPELINE, TEXT_PIPELINE, is_sd_family, load_text_components, save_text_folder,
                               text_meta)

    encoder, vae = load_text_components(teacher_src, teacher_meta)
    smeta.extra = {**(smeta.extra or {}), "text": text_meta(teacher_meta)}
    cls = SD_PIPELINE if is_sd_family(encoder.text_encoder, vae) else TEXT_PIPELINE
    flow_cls = TEXT_PIPELINE
    if backbone_kind(backbone) == "wan":  # a video student: its clip shape (not in Wan's config) and video pipeline
        from ..video_models import VIDEO_PIPELINE

        smeta.extra["sample_shape"] = list(sample_shape(backbone))
        flow_cls = VIDEO_PIPELINE
    if "FlowMatch" in type(scheduler).__name__:  # flow teachers keep the stochastic flow scheduler (see above)
        return save_text_folder(out, backbone, scheduler, smeta, (parts and parts.pipeline) or flow_cls, encoder,
                                vae=vae, parts=parts and parts.networks, index_extra=index_extra)
    T = scheduler.config.num_train_timesteps
    keep = set(inspect.signature(LCMScheduler.__init__).parameters)  # DDPM-only keys (variance_type) dropped
    lcm = LCMScheduler.from_config({k: v for k, v in scheduler.config.items() if k in keep},
                                   timestep_scaling=1000.0, original_inference_steps=T,
                                   clip_sample=False, thresholding=False, steps_offset=1)
    if cls == SD_PIPELINE:  # the stock pipeline pads prompts to tokenizer.model_max_length: make it ours
        encoder.tokenizer.model_max_length = encoder.max_length
    return save_text_folder(out, backbone, lcm, smeta, (parts and parts.pipeline) or cls, encoder, vae=vae,
                            parts=parts and parts.networks, index_extra=index_extra)


def _cfg_dict(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)
