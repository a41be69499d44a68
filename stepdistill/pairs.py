"""Teacher ODE pairs (noise z, teacher output y) for DMD's regression loss (Yin et al. 2023, Sec. 3.3).

Pairs come from a deterministic sampler (DDIM, eta = 0) with the teacher's CFG and are cached as
safetensors under ``$STEPDISTILL_CACHE/pairs/`` keyed by the teacher's weights and the settings.
Each pair stores the *index* of its condition: a class label for class-conditional teachers, a prompt index
into the :class:`~stepdistill.conditioning.TextEmbeddingBank` for text teachers (the key then also holds a
digest of the bank, so another prompt set gets other pairs); ``conds.index(i)`` turns it back into the condition.

The shipped teacher's pairs for the main job (``builtin:animal_mnist``, 1,024 pairs, 25 DDIM steps, CFG 2,
seed 0) ship with the package in ``assets/teacher_pairs/`` (teacher outputs and labels, float32, under the same
key digest), as the FID reference statistics do: they are a deterministic function of the shipped weights, and
computing them costs the main job about 4.7 minutes on 2 CPU cores. The noise is redrawn from the seed, and the
shipped file is used only when its labels equal the redrawn ones (the same generator stream), so a run that finds
them trains on exactly the tensors a run that computes them would (tested).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .conditioning import TextEmbeddingBank
from .denoiser import Denoiser
from .pipelines.sampling import make_scheduler, scheduler_sample
from .tensor_cache import cache_key_digest, cached_tensors

#: teacher ODE pairs shipped with the package: ``pairs_<key digest>.safetensors`` holding ``labels`` and ``x0``
SHIPPED_PAIRS_DIR = Path(__file__).resolve().parent / "assets" / "teacher_pairs"


def _frozen_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a module computes with when no adapter is active. A LoRA view (``stepdistill.lora``) holds only
    its adapter, so for the adapters-disabled teacher view this is its base without the injected LoRA tensors and
    with peft's ``.base_layer`` renamed back: the same dict (and digest) as the plain teacher."""
    if getattr(module, "is_lora_view", False) is True:
        base = module.base.state_dict()
        return {k.replace(".base_layer.", "."): v for k, v in base.items() if "lora_" not in k}
    return module.state_dict()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on (a LoRA teacher view owns no parameter: its base's)."""
    for t in module.parameters():
        return t.device
    for m in module.modules():
        if getattr(m, "is_lora_view", False) is True:
            return next(m.base.parameters()).device
    raise ValueError("the module has no parameters to place it on a device")


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(_frozen_weights(module).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def bank_digest(bank) -> str:
    """A short digest of a prompt bank's embeddings (and its CFG null embedding): the pairs' cache key."""
    h = hashlib.sha256()
    for t in (bank.emb, bank.pooled, bank.null_emb, bank.null_pooled):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def pairs_key(teacher: Denoiser, dmd_cfg, num_classes: int, shape: tuple, seed: int = 0, conds=None) -> dict:
    """What the pairs depend on: the teacher's weights, their number, sampler steps, CFG scale, seed, shape and
    conditions (a prompt bank adds its digest, so another prompt set gets other pairs)."""
    key = {"w": weights_digest(teacher.backbone), "n": dmd_cfg.regression_pairs, "steps": dmd_cfg.regression_steps,
           "g": dmd_cfg.real_guidance_scale, "seed": seed, "shape": list(shape), "k": num_classes}
    if isinstance(conds, TextEmbeddingBank):
        key.update(k=len(conds), bank=bank_digest(conds))
    return key


@torch.no_grad()
def teacher_ode_pairs(teacher: Denoiser, dmd_cfg, num_classes: int, shape: tuple, seed: int = 0,
                      batch: int = 64, cache: Path | None = None,
                      conds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise (N, C, H, W), condition indices (N,), teacher x0 (N, C, H, W)); cached, deterministic.

    ``conds``: the condition sampler (``conditioning.ClassLabels`` / ``TextEmbeddingBank``); None = class labels
    over ``num_classes`` (0: unconditional). A prompt bank draws prompt indices uniformly, as training does."""
    n, steps, w = dmd_cfg.regression_pairs, dmd_cfg.regression_steps, dmd_cfg.real_guidance_scale
    key = pairs_key(teacher, dmd_cfg, num_classes, shape, seed, conds)
    text = isinstance(conds, TextEmbeddingBank)
    k = len(conds) if text else max(num_classes, 1)

    def build():
        if teacher.schedule.kind == "flow":  # flow teachers: their Euler ODE sampler (make_scheduler)
            sched_cfg = {k: v for k, v in teacher.schedule.to_config().items() if k != "kind"}
            sched_cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
        else:
            sched_cfg = dict(teacher.schedule.config) if hasattr(teacher.schedule, "config") else {}
            sched_cfg.setdefault("prediction_type", teacher.prediction_type)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *shape, generator=g)
        labels = torch.randint(0, k, (n,), generator=g)
        shipped = shipped_pairs(key)
        if shipped is not None and torch.equal(shipped["labels"], labels):
            return {"noise": noise, "labels": labels, "x0": shipped["x0"]}
        dev = module_device(teacher)
        outs = []
        for i in tqdm(range(0, n, batch), desc="teacher ODE pairs", leave=False):
            sched = make_scheduler("ddim", sched_cfg)
            if text:
                cond = conds.index(labels[i:i + batch], dev)
            else:
                cond = labels[i:i + batch].to(dev) if num_classes else None
            outs.append(scheduler_sample(teacher, sched, cond, steps, w, noise[i:i + batch].to(dev)).cpu())
        return {"noise": noise, "labels": labels, "x0": torch.cat(outs)}

    d, _, _ = cached_tensors("pairs", key, build, prefix="pairs_", cache=cache)
    return d["noise"], d["labels"], d["x0"]


def pairs_key_file(key: dict) -> str:
    """The file name of a pairs cache entry (the same in the cache and in ``assets/teacher_pairs``)."""
    return f"pairs_{cache_key_digest(key)}.safetensors"


def shipped_pairs(key: dict, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
    """The shipped ``{"labels", "x0"}`` for ``key``, or None when the package ships none for it."""
    from safetensors.torch import load_file

    path = Path(folder or SHIPPED_PAIRS_DIR) / pairs_key_file(key)
    return load_file(str(path)) if path.is_file() else None
