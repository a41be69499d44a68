"""Real-size architectures without weights: the configs of the SD 1.5 and SDXL UNets, the SD3-medium and
Flux-dev transformers and the Wan 2.1 text-to-video transformers (1.3B, 14B) (shipped in ``assets/architectures/``, a few KB each; no hub access needed), built with
random initialisation on the meta device (parameter counts, the memory planner) or on the CPU (measurements).

    den = architecture_denoiser("sd15")                   # meta device: shapes and counts, no memory
    den = architecture_denoiser("sd15", device="cpu")     # random weights, runs
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError

ARCH_DIR = Path(__file__).parent / "assets" / "architectures"
ARCHITECTURES = {
    "sd15": ("sd15_unet.json", {"kind": "vp", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}),
    "sdxl": ("sdxl_unet.json", {"kind": "vp", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}),
    "sd3": ("sd3_medium_transformer.json", {"kind": "flow", "num_train_timesteps": 1000, "shift": 3.0}),
    "flux": ("flux_dev_transformer.json", {"kind": "flow", "num_train_timesteps": 1000, "shift": 3.0}),
    # Wan 2.1 text-to-video (Wan Team 2025): 480p sampling uses shift 3, 720p shift 5
    "wan-1.3b": ("wan21_t2v_1_3b_transformer.json", {"kind": "flow", "num_train_timesteps": 1000, "shift": 3.0}),
    "wan-14b": ("wan21_t2v_14b_transformer.json", {"kind": "flow", "num_train_timesteps": 1000, "shift": 5.0}),
}


def architecture_config(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return json.loads((ARCH_DIR / ARCHITECTURES[name][0]).read_text())


def build_architecture(name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """The diffusers network of ``name`` with random weights (``meta``: no memory, shapes only)."""
    import diffusers

    cfg = architecture_config(name)
    cls = getattr(diffusers, cfg["_class_name"])
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}  # _class_name, _source: not arguments
    with torch.device(device):
        net = cls.from_config(kwargs)
    if dtype is None:
        return net
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # diffusers warns about modules it would keep in float32: a plan holds no values
    try:
        return net.to(dtype)
    finally:
        dlog.set_verbosity(level)


def architecture_denoiser(name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None):
    """``name`` as a :class:`~stepdistill.denoiser.Denoiser` with its family's noise schedule and prediction type."""
    from .denoiser import Denoiser
    from .schedules import schedule_from_config

    sched_cfg = dict(ARCHITECTURES[name][1]) if name in ARCHITECTURES else architecture_config(name)
    prediction = sched_cfg.pop("prediction_type", "flow_prediction")
    return Denoiser(build_architecture(name, device, dtype), schedule_from_config(sched_cfg), prediction)


def param_count(name: str) -> int:
    return sum(p.numel() for p in build_architecture(name).parameters())
