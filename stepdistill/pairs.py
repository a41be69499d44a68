"""Teacher ODE pairs (noise z, teacher output y) for DMD's regression loss (Yin et al. 2023, Sec. 3.3).

Pairs come from a deterministic sampler (DDIM, eta = 0) with the teacher's CFG and are cached as
safetensors under ``$STEPDISTILL_CACHE/pairs/`` keyed by the teacher's weights and the settings.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .pipelines.sampling import make_scheduler, scheduler_sample
from .tensor_cache import cached_tensors


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_ode_pairs(teacher: Denoiser, dmd_cfg, num_classes: int, shape: tuple, seed: int = 0,
                      batch: int = 64, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise (N, C, H, W), labels (N,), teacher x0 (N, C, H, W)); cached, deterministic."""
    n, steps, w = dmd_cfg.regression_pairs, dmd_cfg.regression_steps, dmd_cfg.real_guidance_scale
    key = {"w": weights_digest(teacher.backbone), "n": n, "steps": steps, "g": w, "seed": seed,
           "shape": list(shape), "k": num_classes}

    def build():
        sched_cfg = dict(teacher.schedule.config) if hasattr(teacher.schedule, "config") else {}
        sched_cfg.setdefault("prediction_type", teacher.prediction_type)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *shape, generator=g)
        labels = torch.randint(0, max(num_classes, 1), (n,), generator=g)
        dev = next(teacher.parameters()).device
        outs = []
        for i in tqdm(range(0, n, batch), desc="teacher ODE pairs", leave=False):
            sched = make_scheduler("ddim", sched_cfg)
            cond = labels[i:i + batch].to(dev) if num_classes else None
            outs.append(scheduler_sample(teacher, sched, cond, steps, w, noise[i:i + batch].to(dev)).cpu())
        return {"noise": noise, "labels": labels, "x0": torch.cat(outs)}

    d, _, _ = cached_tensors("pairs", key, build, prefix="pairs_", cache=cache)
    return d["noise"], d["labels"], d["x0"]
