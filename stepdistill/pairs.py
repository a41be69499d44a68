"""Teacher ODE pairs (noise z, teacher output y) for DMD's regression loss (Yin et al. 2023, Sec. 3.3).

Pairs come from a deterministic sampler (DDIM, eta = 0) with the teacher's CFG and are cached as
safetensors under ``$STEPDISTILL_CACHE/pairs/`` keyed by the teacher's weights and the settings.
Each pair stores the *index* of its condition: a class label for class-conditional teachers, a prompt index
into the :class:`~stepdistill.conditioning.TextEmbeddingBank` for text teachers (the key then also holds a
digest of the bank, so another prompt set gets other pairs); ``conds.index(i)`` turns it back into the condition.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .conditioning import TextEmbeddingBank
from .denoiser import Denoiser
from .pipelines.sampling import make_scheduler, scheduler_sample
from .tensor_cache import cached_tensors


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
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


@torch.no_grad()
def teacher_ode_pairs(teacher: Denoiser, dmd_cfg, num_classes: int, shape: tuple, seed: int = 0,
                      batch: int = 64, cache: Path | None = None,
                      conds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise (N, C, H, W), condition indices (N,), teacher x0 (N, C, H, W)); cached, deterministic.

    ``conds``: the condition sampler (``conditioning.ClassLabels`` / ``TextEmbeddingBank``); None = class labels
    over ``num_classes`` (0: unconditional). A prompt bank draws prompt indices uniformly, as training does."""
    n, steps, w = dmd_cfg.regression_pairs, dmd_cfg.regression_steps, dmd_cfg.real_guidance_scale
    key = {"w": weights_digest(teacher.backbone), "n": n, "steps": steps, "g": w, "seed": seed,
           "shape": list(shape), "k": num_classes}
    text = isinstance(conds, TextEmbeddingBank)
    if text:  # the prompt set is part of what the pairs are
        key.update(k=len(conds), bank=bank_digest(conds))
    k = len(conds) if text else max(num_classes, 1)

    def build():
        sched_cfg = dict(teacher.schedule.config) if hasattr(teacher.schedule, "config") else {}
        sched_cfg.setdefault("prediction_type", teacher.prediction_type)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *shape, generator=g)
        labels = torch.randint(0, k, (n,), generator=g)
        dev = next(teacher.parameters()).device
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
