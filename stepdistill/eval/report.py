"""``stepdistill report``: a Markdown + JSON comparison of a distilled student with its teacher.

Writes into ``out_dir``:

* ``samples_grid.png``: blocks stacked top to bottom, teacher (``teacher_steps`` with CFG) |
  student 1 step | student K steps (if K > 1); every column is one class (class-balanced labels
  0..C-1) and all blocks start from the same noise (same seed), so a column compares the models
  on identical inputs;
* ``loss.png``: the distillation run's loss plot, copied when the student folder sits in a run
  folder (``student/../loss.png``);
* ``fid_vs_steps.png`` (with ``fid=True``): FID against network evaluations per sample for the
  student at 1..K steps and the teacher;
* ``report.json`` (every number) and ``report.md`` (a table plus the PNGs, linked relatively).

Latency here is the wall time of generating the report's samples divided by their number (at
``batch_size``); ``stepdistill bench`` measures latency properly (warm-up, repeats, batch sizes).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..utils import atomic_write_text, make_grid, save_figure

GRID_NAME = "samples_grid.png"
LOSS_NAME = "loss.png"
FID_PLOT_NAME = "fid_vs_steps.png"


def grid_columns(num_classes: int) -> int:
    return num_classes if num_classes else 10


def stacked_grid(blocks: list[torch.Tensor], ncol: int, scale: int = 2, sep: int = 4) -> np.ndarray:
    """Stack per-model grids (``utils.make_grid`` with ``ncol`` columns) vertically.

    Blocks are separated by ``sep * scale`` rows of white. Each block of n images of size HxW is
    ``(ceil(n / ncol) * (H + 1) + 1) * scale`` pixels tall and ``(ncol * (W + 1) + 1) * scale`` wide.
    """
    parts = []
    for i, x in enumerate(blocks):
        g = make_grid(x, ncol, scale)
        if i:
            parts.append(np.full((sep * scale, g.shape[1], 3), 255, np.uint8))
        parts.append(g)
    return np.concatenate(parts, 0)


def _save_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)
    return path


def _fid_plot(points: list[dict], teacher: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [p["nfe_per_sample"] for p in points]
    ax.plot(xs, [p["fid"] for p in points], "o-", label="student")
    for p in points:
        ax.annotate(f"{p['steps']} step{'s' if p['steps'] > 1 else ''}", (p["nfe_per_sample"], p["fid"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    if teacher is not None:
        ax.plot([teacher["nfe_per_sample"]], [teacher["fid"]], "s", color="C3",
                label=f"teacher ({teacher['steps']} steps)")
        ax.axhline(teacher["fid"], color="C3", lw=0.8, ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted(set(xs + ([teacher["nfe_per_sample"]] if teacher is not None else [])))
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network evaluations per sample (log)")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


def resolve_teacher(student_folder: Path, recorded: str | None, given: str | None) -> str:
    """``given`` if set, else the teacher recorded in the student's ``stepdistill.json`` (``extra.teacher``)."""
    from ..shipped import BUILTIN_TEACHERS

    if given:
        return given
    if not recorded:
        raise ConfigError(f"{student_folder}/stepdistill.json records no teacher (extra.teacher); pass --teacher")
    if recorded in BUILTIN_TEACHERS or Path(recorded).exists():
        return recorded
    rel = (student_folder / recorded)
    if rel.exists():
        return str(rel)
    raise ConfigError(f"the teacher recorded in {student_folder}/stepdistill.json ({recorded}) does not exist here; "
                      "pass --teacher PATH")


def load_student_and_teacher(student: str, teacher: str | None, device=None, allow_pickle: bool = False,
                             sampler: str = "ddim"):
    """The (student, teacher) wrappers for report and bench; the teacher defaults to the one recorded
    in the student's metadata. Raises ConfigError when the roles or image shapes do not fit."""
    from .generate import load_any

    s = load_any(student, device=device, allow_pickle=allow_pickle)
    if s.kind != "student":
        raise ConfigError(f"--student {student} is not a distilled student folder (no student_timesteps)")
    teacher = resolve_teacher(Path(student), (s.meta.extra or {}).get("teacher"), teacher)
    t = load_any(teacher, device=device, allow_pickle=allow_pickle, sampler=sampler)
    if t.kind != "teacher":
        raise ConfigError(f"--teacher {teacher} is a distilled student folder, not a teacher")
    if t.image_shape != s.image_shape:
        raise ConfigError(f"teacher images {t.image_shape} and student images {s.image_shape} differ")
    return s, t


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def make_report(student: str, out_dir: str | Path, teacher: str | None = None, num: int = 100,
                teacher_steps: int = 25, guidance_scale: float = 2.0, fid: bool = False, fid_num: int | None = None,
                ref: str | None = None, ref_split: str = "test", ref_num: int | None = None, seed: int = 0,
                batch_size: int = 64, grid_rows: int = 4, scale: int = 2, diversity_extractor: str = "auto",
                device: str | None = None, allow_pickle: bool = False, progress: bool = True,
                teacher_metrics: str | Path | None = None) -> dict:
    """Write the report (see the module docstring); returns the ``report.json`` content. ``teacher_metrics``:
    with ``fid``, take the teacher's FID / recall / ... from its ``stepdistill eval`` JSON (same sample count,
    seed and reference, checked) instead of sampling it again."""
    from .metrics import (
        classifier_accuracy,
        diversity_metric,
        fid_metrics,
        is_animal_mnist_domain,
        load_reference,
        training_dataset,
    )

    if num < 2:
        raise ConfigError(f"--num must be >= 2, got {num}")
    if teacher_steps < 1:
        raise ConfigError(f"--teacher-steps must be >= 1, got {teacher_steps}")
    if grid_rows < 1:
        raise ConfigError(f"--grid-rows must be >= 1, got {grid_rows}")
    s, t = load_student_and_teacher(student, teacher, device=device, allow_pickle=allow_pickle)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = s.max_steps
    labels = s.default_labels(num)
    gen_kw = dict(n=None if labels is not None else num, seed=seed, batch_size=batch_size, progress=progress)

    runs: dict[str, dict] = {}
    images: dict[str, torch.Tensor] = {}

    def run(name: str, model, steps: int):
        x = model.generate(labels, steps=steps, guidance_scale=guidance_scale, **gen_kw)
        images[name] = x
        r = {"model": model.kind, "steps": steps, "nfe_per_sample": model.nfe_per_sample(steps, guidance_scale),
             "latency_per_image_s": model.last_generate_s / len(x), "num_samples": len(x)}
        if model.kind == "teacher":
            r.update(guidance_scale=guidance_scale if model.uses_cfg(guidance_scale) else 1.0, sampler=model.sampler)
        r.update(classifier_accuracy(x, labels, model.class_names))
        r.update(diversity_metric(x, labels, diversity_extractor))
        runs[name] = r
        return r

    run("teacher", t, teacher_steps)
    run(f"student_{s.min_steps}", s, s.min_steps)
    if k > s.min_steps:
        run(f"student_{k}", s, k)
    t_lat = runs["teacher"]["latency_per_image_s"]
    for name, r in runs.items():
        r["speedup_vs_teacher"] = t_lat / r["latency_per_image_s"] if r["latency_per_image_s"] > 0 else None

    # -- sample grid ---------------------------------------------------------------------------------
    ncol = grid_columns(s.num_classes)
    n_grid = min(num, grid_rows * ncol)
    order = list(runs)
    grid = stacked_grid([images[n][:n_grid] for n in order], ncol, scale)
    _save_png(grid, out / GRID_NAME)
    files = {"grid": GRID_NAME}

    loss_src = Path(student).resolve().parent / LOSS_NAME
    if loss_src.is_file():
        shutil.copyfile(loss_src, out / LOSS_NAME)
        files["loss_plot"] = LOSS_NAME

    # -- FID vs steps --------------------------------------------------------------------------------
    fid_info = None
    if fid:
        ds_name, _ = training_dataset(s)
        ref_name = ref or ds_name or training_dataset(t)[0] or "animal_mnist"
        ref_images, ref_labels, cache_key = load_reference(ref_name, s.resolution, s.channels, ref_split, ref_num)
        fid_n = fid_num or num
        if fid_n < 2:
            raise ConfigError(f"--fid-num must be >= 2, got {fid_n}")
        fid_labels = s.default_labels(fid_n)
        fkw = dict(n=None if fid_labels is not None else fid_n, seed=seed, batch_size=batch_size, progress=progress)
        per_class = fid_labels is not None and ref_name in ("animal_mnist", "digits")
        mkw = dict(labels=fid_labels if per_class else None, ref_labels=ref_labels if per_class else None,
                   class_names=s.class_names)
        keep = ("fid", "kid", "precision", "recall", "coverage", "min_class_recall")
        points = []
        for steps in range(s.min_steps, k + 1):
            name = f"student_{steps}"
            x = images[name] if name in images and len(images[name]) == fid_n else s.generate(fid_labels, steps=steps, **fkw)
            m = fid_metrics(x, ref_images, cache_key, **mkw)
            points.append({"steps": steps, "nfe_per_sample": s.nfe_per_sample(steps), **m})
            if name in runs:
                runs[name].update({key: m[key] for key in keep if key in m})
        if teacher_metrics:  # the teacher's numbers from its own `stepdistill eval` on the same protocol
            tm = _teacher_metrics(teacher_metrics, fid_n, seed, len(ref_images), cache_key)
            runs["teacher"].update({key: tm[key] for key in keep + ("class_accuracy", "diversity") if key in tm},
                                   metrics_from=str(teacher_metrics), metrics_steps=tm["steps"])
            teacher_point = {"steps": tm["steps"], "nfe_per_sample": tm["nfe_per_sample"], **tm}
        else:
            x = images["teacher"] if len(images["teacher"]) == fid_n else t.generate(
                fid_labels, steps=teacher_steps, guidance_scale=guidance_scale, **fkw)
            tm = fid_metrics(x, ref_images, cache_key, **mkw)
            runs["teacher"].update({key: tm[key] for key in keep if key in tm})
            teacher_point = {"steps": teacher_steps, "nfe_per_sample": runs["teacher"]["nfe_per_sample"], **tm}
        _fid_plot(points, teacher_point, out / FID_PLOT_NAME)
        files["fid_plot"] = FID_PLOT_NAME
        fid_info = {"reference": ref_name, "reference_split": ref_split if ref_name in ("animal_mnist", "digits") else None,
                    "n_ref": len(ref_images), "num_samples": fid_n, "cache_key": cache_key,
                    "feature_extractor": tm["feature_extractor"], "student": points, "teacher": teacher_point}

    report = {
        "student": s.describe(), "teacher": t.describe(),
        "settings": {"num": num, "seed": seed, "batch_size": batch_size, "teacher_steps": teacher_steps,
                     "guidance_scale": guidance_scale, "device": str(s.device), "torch_threads": torch.get_num_threads(),
                     "grid_rows": n_grid // ncol + (1 if n_grid % ncol else 0), "grid_columns": ncol,
                     "grid_order": order, "animal_mnist_domain": is_animal_mnist_domain(s.class_names, s.image_shape)},
        "runs": runs, "fid": fid_info, "files": files,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    if (Path(student) / "README.md").exists():  # keep the model card's metrics in step with the report
        from ..modelcard import update_model_card_metrics

        update_model_card_metrics(student, {f"{name} {key}": r[key] for name, r in runs.items()
                                            for key in ("class_accuracy", "fid", "recall", "latency_per_image_s", "nfe_per_sample")
                                            if isinstance(r.get(key), (int, float))})
    return report


def _teacher_metrics(path, num: int, seed: int, n_ref: int, cache_key: str) -> dict:
    """A teacher's ``stepdistill eval`` JSON, refused unless it used this report's protocol."""
    r = json.loads(Path(path).read_text())
    ref = r.get("reference") or {}
    want = {"kind": "teacher", "num": num, "seed": seed, "reference n": n_ref, "reference cache_key": cache_key}
    got = {"kind": r.get("kind"), "num": r.get("num"), "seed": r.get("seed"), "reference n": ref.get("n"),
           "reference cache_key": ref.get("cache_key")}
    bad = [f"{k} {got[k]!r} (report: {v!r})" for k, v in want.items() if got[k] != v]
    if bad:
        raise ConfigError(f"--teacher-metrics {path} was measured on another protocol: {', '.join(bad)}")
    return r


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _run_title(name: str, r: dict) -> str:
    if r["model"] == "teacher":
        cfg = f", CFG {r['guidance_scale']:g}" if r.get("guidance_scale", 1.0) != 1.0 else ""
        return f"teacher, {r['steps']} steps ({r.get('sampler', 'ddim')}{cfg})"
    return f"student, {r['steps']} step{'s' if r['steps'] > 1 else ''}"


def render_markdown(report: dict) -> str:
    runs, files, st = report["runs"], report["files"], report["settings"]
    s, t = report["student"], report["teacher"]
    L = ["# stepdistill report", ""]
    L += [f"- **student**: `{s['path']}` ({s.get('method') or 'distilled'}, timesteps {s.get('student_timesteps')}, "
          f"{s['params']:,} parameters)",
          f"- **teacher**: `{t['path']}` ({t['params']:,} parameters)",
          f"- images: {'x'.join(str(v) for v in s['image_shape'])} (C x H x W); {st['num']} class-balanced samples per "
          f"model, seed {st['seed']}, batch size {st['batch_size']}, device {st['device']}", ""]
    L += ["## Numbers", ""]
    has_fid = report.get("fid") is not None
    head = ["model", "NFE / sample", "latency / image (ms)", "speed-up", "class accuracy", "diversity"]
    if has_fid:
        head += ["FID", "KID", "precision", "recall", "worst-class recall"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in runs.items():
        row = [_run_title(name, r), str(r["nfe_per_sample"]), _fmt(r["latency_per_image_s"] * 1e3),
               (_fmt(r["speedup_vs_teacher"], 3) + "x") if r.get("speedup_vs_teacher") else "-",
               _fmt(r.get("class_accuracy")), _fmt(r.get("diversity"))]
        if has_fid:
            row += [_fmt(r.get(key)) for key in ("fid", "kid", "precision", "recall", "min_class_recall")]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    notes = []
    if any(r.get("class_accuracy") is None for r in runs.values()):
        notes.append("class accuracy uses the shipped Animal-MNIST classifier and is only reported for "
                     "Animal-MNIST models (32x32, 1 channel)")
    ext = {r.get("diversity_extractor") for r in runs.values()} - {None}
    notes.append(f"diversity: mean within-class pairwise cosine feature distance ({', '.join(sorted(ext))} features; "
                 "0 = mode collapse)")
    notes.append("latency: wall time of generating these samples / number of samples (see `stepdistill bench` "
                 "for warmed-up, repeated timings)")
    if has_fid:
        f = report["fid"]
        split = f" ({f['reference_split']} split)" if f.get("reference_split") else ""
        notes.append(f"FID / KID: {f['num_samples']} generated samples per model against {f['n_ref']} reference "
                     f"images of `{f['reference']}`{split}, feature extractor `{f['feature_extractor']}`; "
                     "FID from few samples is biased upwards: compare only at equal sample counts")
        src = runs.get("teacher", {}).get("metrics_from")
        if src:
            notes.append(f"the teacher's FID / KID / precision / recall / class accuracy / diversity come from `{src}` "
                         f"(its own `stepdistill eval`, "
                         f"{runs['teacher']['metrics_steps']} steps, same sample count, seed and reference)")
        notes.append("precision / recall: Kynkaanniemi et al. 2019 (k = 3) on the same features; worst-class recall: "
                     "the lowest recall of one class's samples against that class's real images (mode coverage)")
    L += [f"- {n}" for n in notes] + [""]
    L += ["## Samples", "",
          "Blocks from top to bottom: " + " | ".join(_run_title(n, runs[n]) for n in st["grid_order"]) +
          f". Each column is one class ({_class_header(s['class_names'], st['grid_columns'])}); all models start "
          "from the same noise.", "", f"![samples]({files['grid']})", ""]
    if "fid_plot" in files:
        L += ["## FID vs. steps", "", f"![FID vs steps]({files['fid_plot']})", ""]
    if "loss_plot" in files:
        L += ["## Training losses", "", f"![losses]({files['loss_plot']})", ""]
    return "\n".join(L)


def _class_header(names: list[str], ncol: int) -> str:
    if not names:
        return "unconditional model: columns are just samples"
    return "columns: " + ", ".join(names[:ncol])
