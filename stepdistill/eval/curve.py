"""``stepdistill curve``: quality against training budget, one point per checkpoint of a run.

For every ``checkpoints/step_NNNNNN`` of a ``stepdistill distill`` run (DMD / DMD2 students), the EMA
generator is exported to a scratch folder and scored with ``stepdistill eval``'s protocol (same sample
count, seed and metrics: FID, KID, precision, recall, coverage, worst-class recall, class accuracy,
diversity). Points are appended to ``curve.json`` as they are computed, so the command can run beside
a training job and be rerun later: checkpoints already in the file are skipped. ``curve.png`` plots
FID, recall and class accuracy against generator steps and network passes, with the teacher's values
as dashed lines when ``--teacher-eval`` names a teacher's ``stepdistill eval`` JSON.

Picking a checkpoint (``--pick-acc A``, on a validation reference: ``--ref-split val``): the lowest FID among the
points whose class accuracy is at least ``A``, else the lowest FID (:func:`pick_checkpoint`). Every checkpoint is
scored on the same ``num`` noises, so a bar on class accuracy read from 500 samples picks the checkpoint that
happened to pass it on that draw (measured: 0.972 on the validation noise, 0.957 over 4,000 fresh samples;
BENCHMARKS.md "The full recipe at 1,600 steps"). ``--acc-num N`` also scores class accuracy on ``N`` more
class-balanced samples at noise seed ``seed + 1`` (class accuracy needs no reference images: nothing held out is
touched), and the pick then reads that. ``--pick-with OTHER/curve.json ...`` picks on the mean over several curves
of the same run at other noise seeds (:func:`mean_points`): one noise draw's luck is then averaged out of the pick.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..config import ConfigError
from ..utils import atomic_write_text, save_figure

PLOTTED = (("fid", "FID (lower is better)"), ("recall", "recall (higher is better)"),
           ("class_accuracy", "class accuracy"), ("min_class_recall", "worst-class recall"))


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete step checkpoints, in step order."""
    out = []
    for p in (run / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / "meta.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def passes_per_step(cfg) -> int:
    """Network forward passes of one sample per generator step (for budgets in passes): the method's own count
    (``Method.passes``: SiD / Uni-Instruct, BOOT), else DMD2's
    (:func:`stepdistill.trainers.dmd_method.dmd_passes_per_step`)."""
    from ..methods import get_method
    from ..trainers.dmd_method import dmd_passes_per_step

    own = get_method(cfg.method).passes
    return int(own(cfg)) if own is not None else dmd_passes_per_step(cfg)


#: the metrics of each scored checkpoint that ``curve`` sends to the run's tracker (``train.report_to``)
TRACKED = ("fid", "kid", "precision", "recall", "coverage", "min_class_recall", "class_accuracy", "diversity",
           "sample_passes", "wall_seconds")


def _is_dmd(cfg) -> bool:
    from ..trainers.dmd import DMDConfig

    return isinstance(cfg.dmd, DMDConfig)


def warmup_steps(cfg) -> int:
    """The run's regression warm-up steps (0 for methods without DMD's regression options, e.g. BOOT)."""
    return cfg.dmd.regression_warmup_steps if _is_dmd(cfg) else 0


def sample_passes(cfg, step: int) -> int:
    """Training budget after ``step`` generator steps in forward passes of one sample (backward passes not
    counted): DMD2 steps x batch x :func:`passes_per_step`, plus the regression warm-up (one student pass
    per sample) and the teacher ODE pairs it needs (pairs x sampler steps x 2 for CFG), when used. With a
    ``schedule`` (stepdistill/recipe.py) each step is counted with the batch size, critic ratio and weights in
    force then."""
    import copy

    from ..recipe import Schedule

    d, B = cfg.dmd, cfg.train.batch_size
    warm = min(step, warmup_steps(cfg))
    if not _is_dmd(cfg):  # no ODE pairs (BOOT)
        pairs = 0
    else:
        uses_pairs = d.regression_warmup_steps or d.regression_weight or any(
            float(e.set.get("dmd.regression_weight", 0)) > 0 for e in cfg.schedule)
        cfg_passes = 2 if d.real_guidance_scale != 1.0 else 1
        pairs = d.regression_pairs * d.regression_steps * cfg_passes if uses_pairs else 0
    if not cfg.schedule:
        return (step - warm) * B * passes_per_step(cfg) + warm * B + pairs
    trial = copy.deepcopy(cfg)
    sched = Schedule(trial)
    total = 0
    for s in range(step):
        sched.apply(s)
        b = trial.train.batch_size
        total += b if s < warm else b * passes_per_step(trial)
    return total + pairs


def quality_curve(run: str | Path, num: int = 500, seed: int = 0, steps: int | None = None,
                  teacher_eval: str | None = None, every: int = 1, out: str | Path | None = None,
                  progress: bool = False, min_step: int = 0, acc_num: int = 0, pick_acc: float | None = None,
                  pick_with: list | tuple = (), **eval_kwargs) -> dict:
    """Score every ``every``-th checkpoint of ``run`` (see module docstring); returns the curve dict.
    ``eval_kwargs`` go to :func:`~stepdistill.eval.generate.evaluate_model` (``ref``, ``ref_num``, ...).
    ``acc_num``: class accuracy on that many more samples per checkpoint; ``pick_acc``: record the pick;
    ``pick_with``: ``curve.json`` files of the same run at other noise seeds, the pick then reads the mean."""
    from ..config import DistillConfig, load_config
    from ..methods import get_method
    from ..trainers.loading import load_trained
    from .generate import class_accuracy_of, evaluate_model

    others = _other_curves(pick_with, pick_acc, Path(run), num, seed)  # refused before any scoring, not after
    if acc_num < 0 or acc_num == 1:
        raise ConfigError(f"--acc-num must be 0 (off) or >= 2, got {acc_num}")
    if pick_acc is not None and not 0 <= pick_acc <= 1:
        raise ConfigError(f"--pick-acc must be a class accuracy in [0, 1], got {pick_acc}")

    run = Path(run)
    if not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a stepdistill distill run (no config.yaml)")
    cfg = load_config(DistillConfig, str(run / "config.yaml"), [])
    method = get_method(cfg.method)
    if not method.scores_curve(cfg):
        raise ConfigError(f"stepdistill curve scores one-student runs (dmd, dmd2, rcm, sid, uni_instruct, boot; kd "
                          f"from a distilled dmd.teacher), not this method {cfg.method} run")
    out = Path(out) if out else run / "curve"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    curve = json.loads(path.read_text()) if path.exists() else {"run": str(run), "points": []}
    had = (curve.get("num", num), curve.get("seed", seed), curve.get("acc_num", 0 if curve["points"] else acc_num))
    if had != (num, seed, acc_num):
        raise ConfigError(f"{path} was computed with num={had[0]} seed={had[1]} acc_num={had[2]}; use those or a "
                          "new --out")
    warm = warmup_steps(cfg)
    curve.update(num=num, seed=seed, acc_num=acc_num, method=cfg.method, student_timesteps=cfg.dmd.student_timesteps,
                 regression_warmup_steps=warm, passes_per_generator_step=passes_per_step(cfg),
                 batch_size=cfg.train.batch_size)
    done = {p["step"] for p in curve["points"]}
    ckpts = [(s, p) for s, p in checkpoints(run)
             if s not in done and s >= min_step and (s // max(every, 1)) * max(every, 1) == s]
    tracker = None
    if ckpts and cfg.train.report_to != "none":  # the run's tracker gets eval/<metric> at each scored step
        from ..trainers.tracking import open_tracker

        tracker = open_tracker(cfg.train.report_to, run, run.name)
    for step, ckpt in ckpts:
        modules, obj, meta = load_trained(cfg, ckpt)
        with tempfile.TemporaryDirectory() as tmp:
            folder = method.export(modules, obj, cfg, meta, Path(tmp) / "student")
            r = evaluate_model(str(folder), steps=steps, num=num, seed=seed, progress=progress, **eval_kwargs)
            if acc_num:
                r["class_accuracy_more"] = class_accuracy_of(str(folder), acc_num, seed + 1, steps=steps)
        r.update(step=step, dmd_steps=max(step - warm, 0), sample_passes=sample_passes(cfg, step),
                 wall_seconds=json.loads((ckpt / "meta.json").read_text()).get("wall_seconds"))
        r.pop("model", None)
        r.update(video_aliases(r))
        curve["points"] = sorted(curve["points"] + [r], key=lambda p: p["step"])
        atomic_write_text(path, json.dumps(curve, indent=2) + "\n")   # nothing lost if stopped mid-way
        if tracker is not None:
            tracker.scalars({f"eval/{k}": v for k, v in r.items() if k in TRACKED}, step)
    if tracker is not None:
        tracker.finish()
    if teacher_eval:
        t = json.loads(Path(teacher_eval).read_text())
        curve["teacher"] = {k: t.get(k) for k in ("fid", "recall", "precision", "class_accuracy", "min_class_recall",
                                                  "diversity", "steps", "nfe_per_sample")}
    if pick_acc is not None and curve["points"]:
        if others:
            seeds = [seed] + [o.get("seed") for o in others]
            pick = pick_checkpoint(mean_points([curve] + others), pick_acc)
            curve["pick"] = {**pick, "seeds": seeds, "rule": f"{pick['rule']}; each point the mean over noise seeds "
                             f"{', '.join(map(str, seeds))}"}
        else:
            curve["pick"] = pick_checkpoint(curve["points"], pick_acc)
    atomic_write_text(path, json.dumps(curve, indent=2) + "\n")
    if curve["points"]:
        plot_curve(curve, out / "curve.png")
    return curve


#: a video run's per-frame metrics (stepdistill/eval/video.py) under the names the curve plots and picks by
VIDEO_ALIASES = {"fid": "frame_fid", "precision": "frame_precision", "recall": "frame_recall",
                 "class_accuracy": "frame_class_accuracy"}


def video_aliases(r: dict) -> dict:
    """``{fid: frame_fid, ...}`` for a video evaluation (per-frame FID against the real clips' frames), {} else."""
    if r.get("frame_fid") is None or r.get("fid") is not None:
        return {}
    return {k: r.get(v) for k, v in VIDEO_ALIASES.items()}


def point_accuracy(p: dict) -> float | None:
    """A point's class accuracy for picking: the one on more samples (``--acc-num``) when it was measured."""
    more = p.get("class_accuracy_more") or {}
    return more.get("accuracy") if more.get("accuracy") is not None else p.get("class_accuracy")


def _other_curves(paths, pick_acc, run: Path, num: int, seed: int) -> list[dict]:
    """The ``--pick-with`` curves: each of ``run`` at ``num`` samples and at a noise seed of its own."""
    if paths and pick_acc is None:
        raise ConfigError("--pick-with needs --pick-acc (it changes how the pick is made)")
    out, seeds = [], {seed}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--pick-with {path}: no such curve.json")
        o = json.loads(path.read_text())
        same_run = o.get("run") is not None and Path(o["run"]).resolve() == run.resolve()
        if not same_run or o.get("num") != num or o.get("seed") in seeds:
            raise ConfigError(f"--pick-with {path}: a curve of {o.get('run')} at num={o.get('num')} seed="
                              f"{o.get('seed')} is not this run ({run}, num={num}) at another seed")
        seeds.add(o.get("seed"))
        out.append(o)
    return out


def mean_points(curves: list[dict]) -> list[dict]:
    """One point per step scored in every curve (the same run at different noise seeds): FID and class accuracy
    (:func:`point_accuracy`) averaged, ``collapsed_frac`` the largest (a collapsed clip on any seed counts), and
    ``per_seed`` FIDs for the record. Steps missing from any curve are left out."""
    by_step = [{p["step"]: p for p in c["points"] if p.get("fid") is not None} for c in curves]
    steps = sorted(set.intersection(*(set(b) for b in by_step)))
    out = []
    for s in steps:
        ps = [b[s] for b in by_step]
        accs = [point_accuracy(p) for p in ps]
        point = {"step": s, "fid": sum(p["fid"] for p in ps) / len(ps), "per_seed": [p["fid"] for p in ps],
                 "class_accuracy": None if None in accs else sum(accs) / len(accs)}
        if any("collapsed_frac" in p for p in ps):
            point["collapsed_frac"] = max(p.get("collapsed_frac") or 0.0 for p in ps)
        out.append(point)
    return out


def pick_checkpoint(points: list[dict], acc_bar: float) -> dict:
    """The selection rule: the lowest FID among points with class accuracy >= ``acc_bar`` (:func:`point_accuracy`)
    and, for video runs, no collapsed clip (``collapsed_frac`` 0: static or solid-colour clips,
    :mod:`stepdistill.video_stats`), else the lowest FID. Returns ``{"step", "fid", "class_accuracy", "rule",
    "met_bar"}``."""
    scored = [p for p in points if p.get("fid") is not None]
    if not scored:
        raise ConfigError("no scored checkpoint to pick from")
    ok = [p for p in scored if (point_accuracy(p) or 0.0) >= acc_bar and not p.get("collapsed_frac")]
    best = min(ok or scored, key=lambda p: p["fid"])
    n = (best.get("class_accuracy_more") or {}).get("num")
    on = f" (on {n} more samples)" if n else ""
    video = " and no collapsed clip" if any("collapsed_frac" in p for p in scored) else ""
    return {"step": best["step"], "fid": best["fid"], "class_accuracy": point_accuracy(best), "met_bar": bool(ok),
            "rule": f"lowest FID among checkpoints with class accuracy >= {acc_bar}{on}{video}, else the lowest FID"}


def plot_curve(curve: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, teacher = curve["points"], curve.get("teacher") or {}
    keys = [(k, label) for k, label in PLOTTED if any(p.get(k) is not None for p in pts)]
    timed = [p for p in pts if p.get("wall_seconds") is not None and p.get("fid") is not None]
    ncol = len(keys) + (1 if timed else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(3.4 * ncol, 3.0), squeeze=False)
    for ax, (k, label) in zip(axes[0], keys):
        xs = [p["step"] for p in pts if p.get(k) is not None]
        ax.plot(xs, [p[k] for p in pts if p.get(k) is not None], "o-", ms=3, label="student")
        if teacher.get(k) is not None:
            ax.axhline(teacher[k], color="C3", ls="--", lw=0.9, label="teacher")
        if curve.get("regression_warmup_steps"):
            ax.axvline(curve["regression_warmup_steps"], color="grey", ls=":", lw=0.8, label="end of warm-up")
        ax.set_xlabel("generator steps")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    if timed:  # FID against wall-clock minutes of training (setup included, summed over resumes)
        ax = axes[0][-1]
        ax.plot([p["wall_seconds"] / 60 for p in timed], [p["fid"] for p in timed], "o-", ms=3, label="student")
        if teacher.get("fid") is not None:
            ax.axhline(teacher["fid"], color="C3", ls="--", lw=0.9, label="teacher")
        ax.set_xlabel("wall-clock minutes of training")
        ax.set_title("FID against wall time", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path, dpi=90)
