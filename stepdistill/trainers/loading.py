"""A run's trained networks back from its checkpoint, for ``stepdistill export`` and ``curve``: the method's
objective is rebuilt from the config (stepdistill/methods.py) and its EMA networks loaded (hash-checked)."""
from __future__ import annotations

from pathlib import Path

from ..config import DistillConfig
from ..methods import get_method
from .core import load_ema_weights


def load_trained(cfg: DistillConfig, checkpoint: str | Path | None = None, weights: str = "ema"):
    """``(ema modules {player: network}, objective, meta)`` of a run's checkpoint (latest by default);
    ``weights="raw"``: the players' own weights instead of their EMA."""
    method = get_method(cfg.method)
    obj, _, meta = method.build(cfg)
    modules = method.ema_modules(obj)
    load_ema_weights(cfg.output_dir, modules, checkpoint, weights)
    return modules, obj, meta
