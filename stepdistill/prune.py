"""``stepdistill prune``: score every unit of a teacher, choose the cheapest set that meets the ratio in one shot
(LAPTOP-Diff; :mod:`~stepdistill.pruning.criterion`), and write the pruned teacher as a diffusers folder with a
smaller stock config (:mod:`~stepdistill.pruning.structure`, :mod:`~stepdistill.pruning.folder`).

The folder is the teacher's folder (scheduler, text encoder, ...) with the smaller backbone, and
``stepdistill.json`` ``extra.pruned``: the removed units, their scores, the parameters before and after, the
additivity check and the block map that normalised feature distillation (``method: kd``) reads. It samples as a
many-step model (``stepdistill eval --model <folder>``) and starts ``method: kd`` (``kd.student``), then a
distillation (``dmd.student_init``).

A distilled student prunes the same way (``--model`` a one- or few-step student folder): it is calibrated at its
own timesteps (pure noise at t = 999 for a one-step student; the inputs it is ever given), and the pruned folder is
a smaller student of the same timesteps, retrained by ``method: kd`` with the student as ``dmd.teacher``
(``kd.timesteps``; docs/methods/pruning.md).

A tool on top of the trainers' set-up (it calibrates on the data a distill run would see), beside
:mod:`stepdistill.onnx_export`; the pieces live below the trainers in :mod:`stepdistill.pruning`.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .models import _resolve, load_denoiser, load_meta
from .pruning.criterion import (CALIBRATION_TIMESTEPS, additivity, latency_ms, make_calibration, param_count,
                                score_units, select_units)
from .pruning.folder import PRUNED_KEY, block_map, card, fill_like
from .pruning.structure import candidate_units, prune_network, stock_network
from .utils import atomic_folder


def dataset_of(meta, allow_pickle: bool) -> str | None:
    """The data set a model was trained on: its ``stepdistill.json`` ``extra.dataset``, or, for a distilled student,
    its teacher's (``extra.teacher``)."""
    extra = (meta.extra or {}) if meta is not None else {}
    if extra.get("dataset"):
        return extra["dataset"]
    if meta is not None and meta.student_timesteps and extra.get("teacher"):
        tmeta = load_meta(extra["teacher"], allow_pickle)   # None when unreachable: the caller asks for --data
        return ((tmeta.extra or {}) if tmeta else {}).get("dataset")
    return None


def teacher_inputs(source: str, allow_pickle: bool, data_name: str | None, seed: int):
    """(teacher Denoiser, meta, images, labels, conds) for calibration: the teacher's own data set (its
    ``stepdistill.json`` ``extra.dataset``, or ``data_name``), train split; text teachers through their caption bank
    (the distill set-up: :func:`stepdistill.trainers.setup.prepare`)."""
    from .config import DistillConfig
    from .trainers.setup import prepare, text_distill_setup

    den, meta = load_denoiser(source, allow_pickle=allow_pickle)
    name = data_name or dataset_of(meta, allow_pickle)
    if not name:
        raise ConfigError(f"prune: {source} does not name its data set (stepdistill.json extra.dataset); pass --data")
    cfg = DistillConfig()
    cfg.dmd.teacher, cfg.dmd.allow_pickle, cfg.data.name, cfg.train.seed = source, allow_pickle, name, seed
    cfg.dmd.allow_student_teacher = True   # a distilled student prunes too, calibrated at its own timesteps
    shape = den.sample_shape                      # (C, H, W), or (C, F, H, W) for a video model
    cfg.data.resolution, cfg.data.channels = shape[-2], shape[0]
    if len(shape) == 4:
        cfg.data.frames = shape[1]
    bank = data = None
    if meta.conditioning == "text":  # the caption bank and bank-aligned data, for the teacher already loaded
        bank, data = text_distill_setup(cfg, meta)
    s = prepare(cfg, den, meta, data, bank)
    labels = s.data.labels if meta.conditioning in ("class", "text") else None
    return s.teacher, s.meta, s.data.images, labels, s.conds


def prune_model(source: str, out: str, ratio: float = 0.5, by: str = "params", num: int = 64,
                timesteps=None, seed: int = 0, data: str | None = None, latency_batch: int = 32,
                allow_pickle: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Prune ``source`` by ``ratio`` of its parameters (``by="params"``) or of its measured latency at batch
    ``latency_batch`` (``by="latency"``) and write the folder ``out``. Returns the report (also in
    ``out/stepdistill.json`` ``extra.pruned``)."""
    if not 0 < ratio < 1:
        raise ConfigError(f"--ratio must lie in (0, 1), got {ratio}")
    if by not in ("params", "latency"):
        raise ConfigError(f"--by must be params | latency, got {by!r}")
    root = Path(_resolve(str(source), allow_pickle))
    den, meta, images, labels, conds = teacher_inputs(source, allow_pickle, data, seed)
    if timesteps is None:   # a teacher: noise levels across the range; a distilled student: the inputs it sees
        timesteps = tuple(meta.student_timesteps) if meta.student_timesteps else CALIBRATION_TIMESTEPS
    net = den.backbone.eval()
    cal = make_calibration(den, images, labels, conds, num=num, timesteps=timesteps, seed=seed)
    say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
    units = candidate_units(net)
    say(f"prune: scoring {len(units)} units on {len(cal.x_t)} calibration inputs ({num} images x {len(timesteps)} "
        f"noise levels)")
    scores, rejected = score_units(net, units, cal, progress=lambda n: say(f"  scored {n}"))
    full = param_count(net)
    total = float(full)
    if by == "latency":
        base = latency_ms(net, cal, latency_batch)
        for s in scores:
            s.latency_ms = max(0.0, base - latency_ms(prune_network(net, [s.unit]), cal, latency_batch))
        total = base
    chosen = select_units(net, scores, ratio * total, cost=by)
    if chosen is None:
        reach = sum(s.params if by == "params" else s.latency_ms for s in scores) / total
        raise ConfigError(f"prune: no set of prunable units removes {ratio:.0%} of the {by} "
                          f"(all {len(scores)} units together: {reach:.0%}, and they must fit a stock config)")
    stock = stock_network(net, chosen, probe=cal)
    add = additivity(net, scores, cal)
    joint = cal.error(stock)
    record = {
        "source": str(source), "student_timesteps": list(meta.student_timesteps or []) or None,
        "ratio": ratio, "by": by, "removed": sorted(u.name for u in chosen),
        "params_before": full, "params_after": param_count(stock),
        "class_before": type(net).__name__, "class_after": type(stock).__name__,
        "calibration": {"images": num, "timesteps": list(timesteps), "seed": seed, "inputs": len(cal.x_t)},
        "scores": [{"unit": s.unit.name, "error": s.error, "relative": s.relative, "params": s.params,
                    **({"latency_ms": s.latency_ms} if by == "latency" else {})} for s in scores],
        "rejected": rejected,
        "set_error": joint, "set_error_sum": sum(s.error for s in scores if s.unit in chosen),
        "additivity": {k: v for k, v in add.items() if k != "pairs"} | {"num_pairs": len(add["pairs"])},
        "block_map": block_map(net, chosen),
    }
    if by == "latency":
        record["latency_ms_before"], record["latency_ms_after"] = total, latency_ms(stock, cal, latency_batch)
    with atomic_folder(out, overwrite=overwrite, kind="pruned", inputs=(root,)) as tmp:
        fill_like(tmp, root, stock, {PRUNED_KEY: record}, meta)
        (tmp / "README.md").write_text(card(str(out), record))
    say(f"prune: removed {', '.join(record['removed'])}: {full:,} -> {record['params_after']:,} parameters "
        f"({1 - record['params_after'] / full:.1%}); saved to {out}")
    return record


