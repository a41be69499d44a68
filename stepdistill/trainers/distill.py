"""``stepdistill distill``: build teacher / student / critic from a config, train, export."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import DistillConfig
from ..denoiser import Denoiser
from ..methods import get_method
from ..models import ModelMeta
from ..utils import atomic_folder, atomic_write_text
from .checkpoint import restores_checkpoint
from .core import Trainer, raise_if_interrupted
from .setup import restoring_checkpoint


def build_method(cfg: DistillConfig, teacher: Denoiser | None = None, meta: ModelMeta | None = None,
                 data=None, text_bank=None):
    """``(objective, data, meta)`` of ``cfg.method`` (stepdistill/methods.py), e.g. DMD2's teacher, student and
    critic (:func:`stepdistill.trainers.dmd_method.build_dmd_family`). ``teacher`` / ``meta`` bring any ``nn.Module``
    denoiser instead of ``dmd.teacher`` (PSO: the distilled model to tune); ``data`` / ``text_bank``: see
    :func:`stepdistill.trainers.setup.prepare`."""
    return get_method(cfg.method).build(cfg, teacher=teacher, meta=meta, data=data, text_bank=text_bank)


def distill(cfg: DistillConfig, resume: bool | str = False, accelerator=None, teacher: Denoiser | None = None,
            meta: ModelMeta | None = None, data=None, text_bank=None, overwrite: bool = False,
            fork: str | Path | None = None) -> Path:
    """Train and export. ``teacher``/``meta`` let Python users bring any ``nn.Module`` denoiser
    (see :mod:`stepdistill.denoiser` for the call signature) instead of ``cfg.dmd.teacher``;
    ``data`` / ``text_bank`` as in :func:`build_method` (text-conditional teachers). ``resume`` /
    ``overwrite`` / ``fork`` as in :meth:`~stepdistill.trainers.core.Trainer.train`; an interrupted run raises
    :class:`~stepdistill.errors.TrainingInterrupted` after saving its checkpoint."""
    if cfg.train.threads > 0:  # before the build: teacher ODE pairs are sampled there
        torch.set_num_threads(cfg.train.threads)
    t_build = time.time()
    method = get_method(cfg.method)  # the one lookup: its builder now, its exporter at the end
    # a resumed run takes every player's weights from its own checkpoint: the build skips dmd.critic_init
    with restoring_checkpoint(restores_checkpoint(cfg.output_dir, resume) and not fork):
        obj, data, meta = method.build(cfg, teacher=teacher, meta=meta, data=data, text_bank=text_bank)
    trainer = Trainer(obj, cfg, accelerator=accelerator, data=data)
    trainer.setup_seconds = time.time() - t_build  # teacher ODE pairs etc.: counted in the run's wall time
    result = trainer.train(resume=resume, overwrite=overwrite, fork=fork)
    raise_if_interrupted(trainer, result)
    out = Path(cfg.output_dir) / "student"
    ema = trainer.plain_ema()  # FSDP: gathered copies (collective)
    if trainer.acc.is_main_process:
        with atomic_folder(out, own=True) as tmp:  # the run's own student (inside our run folder): replaced whole
            method.export(ema, obj, cfg, meta, tmp)  # merges LoRA networks
        atomic_write_text(Path(cfg.output_dir) / "training_result.json", json.dumps(result, indent=2, default=str))
        print(f"student exported to {out}")
    return out
