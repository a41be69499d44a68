"""Experiment trackers (``train.report_to: tensorboard | wandb | none``) through accelerate's tracker classes.

What a run reports, beside ``log.jsonl`` and ``loss.png``: every logged scalar (losses, each player's learning
rate ``<player>_lr``, gradient norms, ``sec_per_step``) at its step, the sample grid at every ``sample_every``
(``samples``), and, from ``stepdistill curve``, the evaluation metrics of every scored checkpoint (``eval/fid``,
``eval/recall``, ...). TensorBoard writes to ``<output_dir>/tensorboard/<run name>`` (works offline: ``tensorboard
--logdir runs/``); wandb runs in offline mode unless ``WANDB_MODE`` says otherwise, under ``<output_dir>/wandb``
(``wandb sync`` uploads it later). Only the main process reports.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import REPORT_TO
from ..errors import ConfigError
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar} with str / int / float / bool values (lists as strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = "" if v is None else v
        else:
            out[key] = str(v)
    return out


class RunTracker:
    """One accelerate tracker for a run: ``scalars(values, step)``, ``images(name, x, step)``, ``finish()``."""

    def __init__(self, kind: str, out: str | Path, run_name: str, config: dict | None = None):
        if kind not in REPORT_TO or kind == "none":
            raise ConfigError(f"train.report_to: must be one of {' | '.join(REPORT_TO)}, got {kind!r}")
        try:
            __import__(_PACKAGES[kind])
        except ImportError as e:
            raise ConfigError(f"train.report_to={kind} needs the {_PACKAGES[kind]} package: "
                              f"pip install 'stepdistill[track]' (or {_PACKAGES[kind]})") from e
        out = Path(out)
        self.kind = kind
        if kind == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker(run_name, out / "tensorboard")
        else:
            from accelerate.tracking import WandBTracker

            (out / "wandb").mkdir(parents=True, exist_ok=True)
            self.tracker = WandBTracker(run_name, dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"),
                                        name=run_name)
        self.tracker.start()
        if config:
            self.tracker.store_init_configuration(_flat(config))

    def scalars(self, values: dict, step: int) -> None:
        vals = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if vals:
            self.tracker.log(vals, step=step)

    def images(self, name: str, x: torch.Tensor, step: int) -> None:
        """``x`` (N, C, H, W) in [-1, 1] as one grid image."""
        from torchvision.utils import make_grid

        grid = make_grid((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=10)  # (C, H, W) in [0, 1]
        if self.kind == "tensorboard":
            self.tracker.log_images({name: grid[None]}, step=step)
        else:
            import wandb

            self.tracker.log({name: wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

    def finish(self) -> None:
        self.tracker.finish()


def open_tracker(report_to: str, out: str | Path, run_name: str, config: dict | None = None) -> RunTracker | None:
    """A :class:`RunTracker`, or None for ``report_to: none``."""
    if report_to == "none":
        return None
    return RunTracker(report_to, out, run_name, config)
