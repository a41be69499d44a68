"""A trained student -> a diffusers folder: weights (safetensors), the stock scheduler, ``model_index.json``,
``stepdistill.json`` metadata and the model card (stepdistill/modelcard.py). Every method's exporter builds on
:func:`export_student` (Phased DMD and MSD add their extra networks next to it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import DistillConfig
from ..models import ModelMeta, load_scheduler_config, save_model_folder

STUDENT_PIPELINE = "StepDistillPipeline"


def export_student(backbone, cfg: DistillConfig, meta: ModelMeta, out: Path, schedule=None) -> Path:
    """EMA student -> diffusers folder (safetensors unet + stock DDPMScheduler config + pipeline index).

    A custom ``nn.Module`` student (no ``save_pretrained``) is written as
    ``unet/model.safetensors`` + ``unet/config.json`` naming its class; rebuild the module
    yourself and ``load_state_dict`` (we never unpickle or import code from a model folder).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    pso = cfg.method in ("pso", "pso_naive")  # a tuned distilled model (trainers/pso.py) keeps meta's timesteps
    base = cfg.pso.model if pso else cfg.dmd.teacher
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
    ts = meta.student_timesteps if pso else cfg.dmd.student_timesteps
    extra = {"teacher": (meta.extra or {}).get("teacher", base), "base_model": base} if pso else {"teacher": base}
    smeta = ModelMeta(prediction_type=meta.prediction_type, conditioning=meta.conditioning,
                      class_names=list(meta.class_names), null_class=meta.null_class,
                      student_timesteps=[float(t) for t in ts], method=cfg.method,
                      extra={**extra, "config": json.loads(json.dumps(_cfg_dict(cfg)))})
    lora_view = backbone if getattr(backbone, "is_lora_view", False) is True else None
    if lora_view is not None:  # LoRA student: a plain merged model, plus the adapter alone in lora/ (peft format)
        backbone = lora_view.merged()
        smeta.extra["lora"] = {"rank": cfg.dmd.lora_rank, "alpha": cfg.dmd.lora_alpha or cfg.dmd.lora_rank,
                               "targets": list(cfg.dmd.lora_targets), "adapter": "lora/"}
    if smeta.conditioning == "text" and not pso and "text" in (meta.extra or {}):  # teacher from a text folder:
        # + text encoder, tokenizer, VAE, LCMScheduler (text_distill.py)
        from .text_distill import save_text_student

        save_text_student(out, backbone, scheduler, smeta, base, meta)
    else:
        save_model_folder(out, backbone, scheduler, smeta, STUDENT_PIPELINE)
    if lora_view is not None:
        lora_view.save_adapter(out / "lora")
    index = json.loads((out / "model_index.json").read_text())
    index.update({"student_timesteps": smeta.student_timesteps, "class_names": smeta.class_names,
                  "prediction_type": smeta.prediction_type})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    from ..modelcard import write_model_card

    write_model_card(out, method=cfg.method, teacher=base, steps=smeta.student_timesteps,
                     config=_cfg_dict(cfg), metrics=None, class_names=smeta.class_names)
    return out


def _cfg_dict(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)
