"""``train.memory_budget_gib``: the planner acts. Before a distill run builds anything, the memory model of
``stepdistill plan`` (:mod:`stepdistill.profiling.plan`) is asked about a ladder of settings, cheapest first, and the
first that fits the budget is applied to the config; what was chosen and why is printed. If nothing fits, one
line says so and nothing starts.

The ladder (each rung keeps the ones before it; "cheapest" = least change to what is trained):

1. as configured;
2. ``dmd.teacher_dtype=bfloat16`` (the frozen teacher in bf16; its outputs are cast back to float32);
3. ``train.gradient_checkpointing=true`` (recompute the players' activations: slower, same numbers);
4. ``dmd.offload_teacher=true`` (the teacher's weights live on the CPU between its forwards);
5. with several processes: ``train.fsdp=true``, then ``train.fsdp_shard_teacher=true``;
6. LoRA (``dmd.lora_rank`` 64, 32, 16, 8 on the bf16, checkpointed base): a different student (adapters on the
   frozen teacher), so only when no full fine-tuning setting fits.

``memory_budget_gib: auto`` takes 90 % of the GPU's memory (a GPU is needed). From Python::

    from stepdistill.profiling.budget import fit_to_budget
    choice = fit_to_budget(cfg)      # edits cfg in place; the CLI calls it before distill(cfg)
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import ConfigError
from .plan import GIB, PlanRequest, load_calibration, plan

LORA_RANKS = (64, 32, 16, 8)


def budget_gib(value: str) -> float | None:
    """``train.memory_budget_gib`` as GiB: None when unset, 90 % of the GPU's memory for ``auto``."""
    v = str(value).strip().lower()
    if v in ("", "0", "none", "off"):
        return None
    if v == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.memory_budget_gib: auto reads the GPU's memory and there is no GPU here; "
                              "give a number of GiB (e.g. 0.5)")
        return 0.9 * torch.cuda.mem_get_info()[1] / GIB
    try:
        gib = float(v)
    except ValueError:
        raise ConfigError(f"train.memory_budget_gib: expected a number of GiB or auto, got {value!r}") from None
    if not gib > 0:
        raise ConfigError(f"train.memory_budget_gib: must be > 0 GiB, got {value!r}")
    return gib


def ladder(cfg, world: int) -> list[tuple[str, dict]]:
    """(description, settings) in order of preference (module docstring)."""
    rungs = [("as configured", {})]
    if cfg.dmd.lora_rank == 0:
        full = {}
        for name, change in (("bf16 teacher", {"dmd.teacher_dtype": "bfloat16"}),
                             ("+ gradient checkpointing", {"train.gradient_checkpointing": True}),
                             ("+ teacher offloaded to the CPU", {"dmd.offload_teacher": True})):
            full = {**full, **change}
            rungs.append((name, dict(full)))
        if world > 1:
            rungs.append(("+ FSDP", {**full, "train.fsdp": True}))
            rungs.append(("+ FSDP with the teacher sharded", {**full, "train.fsdp": True,
                                                               "train.fsdp_shard_teacher": True,
                                                               "dmd.offload_teacher": False}))
    base = {"dmd.teacher_dtype": "bfloat16", "train.gradient_checkpointing": True, "dmd.offload_teacher": False}
    ranks = [r for r in LORA_RANKS if cfg.dmd.lora_rank == 0 or r < cfg.dmd.lora_rank]
    rungs += [(f"LoRA rank {r} on a bf16 teacher, checkpointed", {**base, "dmd.lora_rank": r}) for r in ranks]
    return rungs


def planned_gib(cfg, settings: dict, world: int, calibration: dict) -> float:
    """The plan's per-GPU GiB for ``cfg`` with ``settings`` applied (teacher offload: its weights leave the GPU)."""
    get = lambda key, default: settings.get(key, default)  # noqa: E731
    rank = get("dmd.lora_rank", cfg.dmd.lora_rank)
    fsdp = get("train.fsdp", cfg.train.fsdp)
    req = PlanRequest(teacher=_teacher_path(cfg.dmd.teacher), mode="lora" if rank > 0 else "full", gpus=world,
                      fsdp=fsdp and world > 1, shard_teacher=get("train.fsdp_shard_teacher",
                                                                 cfg.train.fsdp_shard_teacher) and fsdp and world > 1,
                      dtype="bf16" if get("dmd.teacher_dtype", cfg.dmd.teacher_dtype) == "bfloat16" else "fp32",
                      batch=max(1, cfg.train.batch_size // world), resolution=_resolution(cfg),
                      lora_rank=max(rank, 1), lora_targets=list(cfg.dmd.lora_targets),
                      gradient_checkpointing=get("train.gradient_checkpointing", cfg.train.gradient_checkpointing),
                      ema=cfg.train.ema_decay > 0, gpu_gib=1e9)
    res = plan(req, calibration)
    total = res["total_gib"]
    if get("dmd.offload_teacher", cfg.dmd.offload_teacher):
        total -= res["per_gpu_gib"]["teacher_weights"]
    return total


def fit_to_budget(cfg, world: int | None = None, calibration: dict | None = None, say=print) -> dict | None:
    """Apply the cheapest rung of :func:`ladder` that fits ``cfg.train.memory_budget_gib`` to ``cfg`` (in place) and
    return ``{"budget_gib", "chose", "settings", "planned_gib", "tried"}``; None when no budget is set. A budget
    that nothing fits raises a one-line :class:`ConfigError` before anything is built."""
    budget = budget_gib(cfg.train.memory_budget_gib)
    if budget is None:
        return None
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    cal = calibration if calibration is not None else load_calibration()
    tried = []
    for name, settings in ladder(cfg, world):
        gib = planned_gib(cfg, settings, world, cal)
        tried.append({"rung": name, "settings": settings, "planned_gib": round(gib, 4)})
        if gib <= budget:
            for key, value in settings.items():
                _set(cfg, key, value)
            say(f"memory budget {_fmt(budget)} per GPU: chose {name} "
                f"({', '.join(f'{k}={v}' for k, v in settings.items()) or 'no change'}), planned {_fmt(gib)}"
                + "".join(f"; {t['rung']}: {_fmt(t['planned_gib'])}, over" for t in tried[:-1]))
            return {"budget_gib": budget, "chose": name, "settings": settings, "planned_gib": gib, "tried": tried}
    smallest = min(tried, key=lambda t: t["planned_gib"])
    raise ConfigError(f"train.memory_budget_gib: nothing fits in {_fmt(budget)} per GPU; the smallest plan is "
                      f"{_fmt(smallest['planned_gib'])} ({smallest['rung']}): raise the budget, lower train.batch_size "
                      f"or use more GPUs")


def _fmt(gib: float) -> str:
    return f"{gib * 1024:.1f} MiB" if gib < 1 else f"{gib:.2f} GiB"


def _set(cfg, dotted: str, value) -> None:
    section, key = dotted.split(".")
    obj = getattr(cfg, section)
    if not any(f.name == key for f in dataclasses.fields(obj)):
        raise ConfigError(f"train.memory_budget_gib: {dotted} is not a setting of this config")
    setattr(obj, key, value)


def _teacher_path(teacher: str) -> str:
    from ..models import _resolve

    return str(_resolve(teacher))


def _resolution(cfg) -> int:
    """Pixels the plan's latent side comes from: the data resolution (a VAE teacher's factor applies in plan)."""
    return int(cfg.data.resolution)
