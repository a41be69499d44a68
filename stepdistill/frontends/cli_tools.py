"""The tool sub-commands beyond training and sampling: eval, bench, curve, report, onnx, plan."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _clean(o):
    """NaN / inf -> None so the printed JSON is strict."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _emit(result: dict, out: str | None) -> None:
    """Print the JSON first (nothing is lost when --out cannot be written), then write --out atomically."""
    text = json.dumps(_clean(result), indent=2, default=str)
    print(text, flush=True)
    if out:
        from ..utils import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")


def cmd_eval(a):
    from ..eval.generate import evaluate_model

    _set_threads(a)
    res = evaluate_model(a.model, steps=a.steps, num=a.num, ref=a.ref, ref_split=a.ref_split, ref_num=a.ref_num,
                         guidance_scale=a.guidance_scale, seed=a.seed, batch_size=a.batch_size, prompts=a.prompts,
                         sampler=a.sampler, diversity_extractor=a.diversity_extractor, device=a.device,
                         allow_pickle=a.allow_pickle, progress=not a.no_progress, hybrid_teacher=a.hybrid_teacher,
                         hybrid_steps=a.hybrid_steps, hybrid_substeps=a.hybrid_substeps,
                         hybrid_handoff=a.hybrid_handoff, clip_model=a.clip_model)
    _emit(res, a.out)


def cmd_bench(a):
    from ..config import ConfigError
    from ..eval.bench import benchmark, summary_lines

    _set_threads(a)
    if a.train:  # where a training step's time goes (profiling/train_profile.py)
        from ..profiling.train_profile import profile_training

        over = list(a.overrides) + ([f"train.threads={a.threads}"] if a.threads else [])
        _emit(profile_training(a.config, over, steps=a.repeats, warmup=a.warmup, tiny=a.tiny), a.out)
        return
    if a.overrides:
        raise ConfigError(f"stepdistill bench: config overrides {a.overrides} need --train")
    if not a.student:
        raise ConfigError("stepdistill bench: --student is required (or --train to profile a training step)")
    res = benchmark(a.teacher, a.student, batch_sizes=a.batch_sizes, teacher_steps=a.teacher_steps,
                    student_steps=a.student_steps, repeats=a.repeats, warmup=a.warmup,
                    guidance_scale=a.guidance_scale, sampler=a.sampler, device=a.device, seed=a.seed,
                    allow_pickle=a.allow_pickle, progress=not a.no_progress, hybrid_steps=a.hybrid_steps,
                    hybrid_substeps=a.hybrid_substeps, hybrid_handoff=a.hybrid_handoff,
                    variants=a.variants, onnx=a.onnx, attention=a.attention)
    if a.table:
        print("\n".join(summary_lines(res)), file=sys.stderr)
    _emit(res, a.out)


def cmd_report(a):
    from ..eval.report import make_report
    from ..outputs import check_report_dir, write_marker

    _set_threads(a)
    check_report_dir(Path(a.out), a.overwrite)
    res = make_report(a.student, a.out, teacher=a.teacher, num=a.num, teacher_steps=a.teacher_steps,
                      guidance_scale=a.guidance_scale, fid=a.fid, fid_num=a.fid_num, ref=a.ref, ref_split=a.ref_split,
                      ref_num=a.ref_num, seed=a.seed, batch_size=a.batch_size, grid_rows=a.grid_rows,
                      diversity_extractor=a.diversity_extractor, device=a.device, allow_pickle=a.allow_pickle,
                      progress=not a.no_progress, teacher_metrics=a.teacher_metrics)
    out = Path(a.out)
    write_marker(out, "report")
    keys = ("steps", "nfe_per_sample", "fid", "precision", "recall", "min_class_recall", "class_accuracy", "diversity")
    print(json.dumps({"report": str(out / "report.md"), "json": str(out / "report.json"),
                      "files": {k: str(out / v) for k, v in res["files"].items()},
                      "summary": {name: {k: r[k] for k in keys if r.get(k) is not None} for name, r in res["runs"].items()}},
                     indent=1))


def cmd_curve(a):
    from ..eval.curve import quality_curve

    _set_threads(a)
    res = quality_curve(a.run, num=a.num, seed=a.seed, steps=a.steps, teacher_eval=a.teacher_eval, every=a.every,
                        out=a.out, progress=not a.no_progress, ref=a.ref, ref_split=a.ref_split, ref_num=a.ref_num,
                        diversity_extractor=a.diversity_extractor, min_step=a.min_step, acc_num=a.acc_num,
                        pick_acc=a.pick_acc, pick_with=a.pick_with)
    keys = ("step", "wall_seconds", "fid", "precision", "recall", "min_class_recall", "class_accuracy", "diversity")
    points = [{k: p.get(k) for k in keys} | ({"class_accuracy_more": p["class_accuracy_more"]["accuracy"]}
                                             if p.get("class_accuracy_more") else {}) for p in res["points"]]
    print(json.dumps({"curve": str(Path(a.out or Path(a.run) / "curve") / "curve.json"), "points": points,
                      **({"pick": res["pick"]} if "pick" in res else {})}, indent=1))


def seed_arg(text: str) -> int:
    """argparse type for --seed: an integer in the one seed range (config.MAX_SEED); anything else exits 2 with a
    line."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    from ..config import MAX_SEED

    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {v}")
    return v


def threads_arg(p) -> None:
    """The one ``--threads`` flag of every command that runs a network (and ``train.threads`` in configs)."""
    p.add_argument("--threads", type=threads_type, default=None,
                   help="torch CPU threads, >= 1 (default: torch's choice)")


def threads_type(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _set_threads(a):
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)


def _common(p, device=True):
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed, 0..2**31-1 (default 0)")
    if device:
        p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    threads_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _ref_args(p):
    p.add_argument("--ref", default=None,
                   help="FID reference: animal_mnist | digits | an image folder (default: the model's training dataset)")
    p.add_argument("--ref-split", default="test", choices=["all", "train", "fit", "val", "test"],
                   help="split of animal_mnist / digits used as the reference (default: test). Pick checkpoints and "
                        "settings on val (held out of train: data.split=fit trains without it), report test once")
    p.add_argument("--ref-num", type=int, default=None,
                   help="use a class-balanced subset of this many reference images (default: the whole split)")
    p.add_argument("--diversity-extractor", default="auto", choices=["auto", "classifier", "inception", "pixel"],
                   help="features for the diversity metric (auto: domain classifier at 32x32x1, else Inception)")


def _hybrid_args(p, bench: bool = False):
    p.add_argument("--hybrid-steps", type=int, default=0 if bench else 1,
                   help=("also time hybrid sampling: the teacher takes the first N steps of the student's K-step chain "
                         "(0 = off)") if bench else "steps the hybrid teacher takes (1..K, default 1)")
    p.add_argument("--hybrid-substeps", type=int, default=1,
                   help="DDIM sub-steps of the hybrid teacher per student step (default 1: one x0 prediction)")
    p.add_argument("--hybrid-handoff", default="renoise", choices=["renoise", "ode"],
                   help="renoise: the student gets the teacher's x0 re-noised with fresh noise (default); "
                        "ode: the teacher's DDIM state at the next student timestep")


def cmd_onnx(a):
    from ..onnx_export import check_onnx, export_onnx

    _set_threads(a)
    info = export_onnx(a.model, a.out, steps=a.steps, opset=a.opset, allow_pickle=a.allow_pickle,
                       overwrite=a.overwrite)
    if a.check:
        info["max_abs_diff_vs_pytorch"] = check_onnx(a.model, a.out, allow_pickle=a.allow_pickle)
    _emit(info, None)


def cmd_plan(a):
    import sys

    from ..config import ConfigError
    from ..profiling.plan import PlanRequest, fit_grid, format_table, plan

    if not (math.isfinite(a.gpu_gib) and a.gpu_gib > 0):
        raise ConfigError(f"--gpu-gib must be a finite number of GiB > 0, got {a.gpu_gib}")
    for flag, v in (("--batch", a.batch), ("--resolution", a.resolution), ("--gpus", getattr(a, "gpus", 1)),
                    ("--frames", a.frames)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if a.fit_grid:
        gpus = tuple(int(g) for g in a.fit_grid.split(","))
        res = {"teacher": a.teacher, "resolution": a.resolution, "batch": a.batch, "gpu_gib": a.gpu_gib,
               "rows": fit_grid(a.teacher, gpus, a.resolution, a.batch, a.gpu_gib)}
        for r in res["rows"]:
            cfg = r.get("config")
            print(f"{r['gpus']:>3} GPUs: " + (f"{r['total_gib']:.1f} GiB/GPU with {cfg}" if cfg else "nothing fits"),
                  file=sys.stderr)
    else:
        res = plan(PlanRequest(teacher=a.teacher, mode=a.mode, gpus=a.gpus, fsdp=a.fsdp,
                               shard_teacher=a.shard_teacher, dtype=a.dtype, batch=a.batch,
                               resolution=a.resolution, frames=a.frames, lora_rank=a.lora_rank,
                               gradient_checkpointing=a.gradient_checkpointing, gpu_gib=a.gpu_gib))
        print(format_table(res), file=sys.stderr)
    _emit(res, a.out)


def cmd_prune(a):
    from ..prune import prune_model

    _set_threads(a)
    timesteps = tuple(int(t) for t in a.timesteps.split(",")) if a.timesteps else None
    rec = prune_model(a.model, a.out, ratio=a.ratio, by=a.by, num=a.num, timesteps=timesteps, seed=a.seed,
                      data=a.data, latency_batch=a.latency_batch, allow_pickle=a.allow_pickle, overwrite=a.overwrite,
                      progress=not a.no_progress)
    _emit(rec, a.report)


def cmd_grow(a):
    from ..errors import ConfigError
    from ..grow import grow_model

    _set_threads(a)
    try:
        after = [int(k) for k in a.after.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--after must be block indices separated by commas, e.g. 1,3; got {a.after!r}") from None
    rec = grow_model(a.model, a.out, after, num=a.num, seed=a.seed, data=a.data, allow_pickle=a.allow_pickle,
                     overwrite=a.overwrite, progress=not a.no_progress)
    _emit(rec, a.report)


def _folder_tool_args(p, fn) -> None:
    """The options every model-folder tool shares (``prune``, ``grow``): calibration data and seed, the JSON report,
    --overwrite, --allow-pickle, --no-progress, --threads."""
    p.add_argument("--data", default=None, help="calibration data set (default: the teacher's own, stepdistill.json)")
    p.add_argument("--seed", type=seed_arg, default=0, help="calibration draw, 0..2**31-1 (default 0)")
    p.add_argument("--report", default=None, help="also write the JSON report here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a folder we wrote")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stdout")
    threads_arg(p)
    p.set_defaults(fn=fn)


def add_commands(sub) -> None:
    p = sub.add_parser("prune", help="LAPTOP-Diff one-shot layer pruning of a teacher: score every removable layer "
                                     "by its output loss, drop the cheapest set meeting --ratio, write a smaller "
                                     "diffusers folder (JSON report on stdout)")
    p.add_argument("--model", default="builtin:animal_mnist", help="teacher folder, hub id or builtin: name "
                   "(default %(default)s)")
    p.add_argument("--out", required=True, help="the pruned model folder to write")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of --by to remove, in (0, 1) (default 0.5)")
    p.add_argument("--by", default="params", choices=["params", "latency"],
                   help="what --ratio counts: parameters, or measured latency at --latency-batch (default params)")
    p.add_argument("--num", type=int, default=64, help="calibration images (default %(default)s)")
    p.add_argument("--timesteps", default=None,
                   help="calibration noise levels, model timesteps of T=1000 (default: 50,250,500,750,950 for a "
                        "teacher; a distilled student's own timesteps, e.g. 999)")
    p.add_argument("--latency-batch", type=int, default=32, help="--by latency: the batch timed (default 32)")
    _folder_tool_args(p, cmd_prune)

    p = sub.add_parser("grow", help="a deeper transformer with the same function: a zero-output copy of each block "
                                    "in --after inserted after it, written as a diffusers folder to start a deeper "
                                    "student from (dmd.student_init; JSON record on stdout)")
    p.add_argument("--model", default="builtin:moving_animal_mnist", help="teacher folder, hub id or builtin: name "
                   "of a Wan / DiT / PixArt transformer (default %(default)s)")
    p.add_argument("--out", required=True, help="the grown model folder to write")
    p.add_argument("--after", required=True, help="blocks to copy, comma-separated indices, e.g. 1,3")
    p.add_argument("--num", type=int, default=16, help="calibration samples for the equality check (default 16)")
    _folder_tool_args(p, cmd_grow)

    p = sub.add_parser("plan", help="per-GPU memory of DMD2 training on a real-size teacher (weights, gradients, "
                                    "optimizer, EMA, critic, activations); JSON on stdout, a table on stderr")
    p.add_argument("--teacher", default="sd15", help="sd15 | sdxl | sd3 | flux | wan-1.3b | wan-14b | a diffusers "
                   "folder (default sd15)")
    p.add_argument("--mode", default="full", choices=["full", "lora"], help="full fine-tuning or LoRA student+critic")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (default 1)")
    p.add_argument("--fsdp", action="store_true", help="shard student, critic, optimizer and EMA over the GPUs (FSDP2)")
    p.add_argument("--shard-teacher", action="store_true", help="with --fsdp: shard the frozen teacher too")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                   help="frozen teacher weights and activations (trainable master weights stay fp32)")
    p.add_argument("--batch", type=int, default=1, help="per-GPU micro-batch (default 1)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--frames", type=int, default=81, help="video teachers: frames per clip (default 81)")
    p.add_argument("--lora-rank", type=int, default=64, help="--mode lora: adapter rank (default 64)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing of the players")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU to fit in (default 80)")
    p.add_argument("--fit-grid", default="", help="e.g. 1,8,64: the first configuration that fits each GPU count "
                   "(full before LoRA; sharding and checkpointing added as needed)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("onnx", help="write a distilled student as one ONNX graph (noise + label in, image out) "
                                    "for onnxruntime")
    p.add_argument("--model", required=True, help="student folder, hub id or shipped name (e.g. builtin:animal_mnist_dmd2)")
    p.add_argument("--out", default="student.onnx", help="output .onnx file, plus a .json beside it (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="student steps baked into the graph (default: all)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="run the graph under onnxruntime and print its max abs difference from the PyTorch pipeline")
    threads_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(fn=cmd_onnx)

    p = sub.add_parser("eval", help="FID / KID, class accuracy and diversity of a teacher or student")
    p.add_argument("--model", required=True, help="teacher or student folder (or builtin:animal_mnist)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (student: 1..K, default K; teacher: default 50)")
    p.add_argument("--num", type=int, default=1000, help="number of class-balanced samples (>= 2)")
    _ref_args(p)
    p.add_argument("--guidance-scale", type=float, default=2.0, help="teacher CFG scale (students ignore it)")
    p.add_argument("--sampler", default="ddim", help="teacher sampler: ddim | euler | dpm++ | ddpm")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default %(default)s)")
    p.add_argument("--prompts", default=None,
                   help="text models: prompt file, one prompt per line (default: the model's caption set)")
    p.add_argument("--clip-model", default=None, help="text models: local CLIP folder for the CLIP score")
    p.add_argument("--hybrid-teacher", default=None,
                   help="hybrid sampling: this teacher (folder or builtin:animal_mnist) takes the student's first "
                        "--hybrid-steps steps with CFG --guidance-scale (Gandikota & Bau 2025)")
    _hybrid_args(p)
    p.add_argument("--out", default=None, help="also write the JSON here")
    _common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="latency / throughput / memory of teacher vs student")
    p.add_argument("--teacher", default=None,
                   help="teacher folder or builtin:animal_mnist (default: the one recorded in the student)")
    p.add_argument("--student", default=None, help="distilled student folder (required unless --train)")
    p.add_argument("--train", action="store_true",
                   help="profile training steps instead: per-network forward and backward time vs the whole step")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "dmd2_animal_mnist.yaml"),
                   help="--train: the distill config to profile (default: the main job's)")
    p.add_argument("--tiny", action="store_true", help="--train: a tiny custom nn.Module teacher on 16x16 digits")
    p.add_argument("overrides", nargs="*", help="--train: config overrides key=value, e.g. train.batch_size=16")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher sampling steps (default %(default)s)")
    p.add_argument("--student-steps", default=None, help="e.g. 1,2,4 or 1..4 (default: 1..K)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per configuration (median reported); --train: timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration (--train: steps)")
    p.add_argument("--guidance-scale", type=float, default=2.0,
                   help="teacher classifier-free guidance scale (default %(default)s; 1 = no CFG)")
    p.add_argument("--sampler", default="ddim", help="teacher sampler: ddim | euler | dpm++ | ddpm (default ddim)")
    p.add_argument("--table", action="store_true", help="also print a human-readable table to stderr")
    p.add_argument("--variants", default=None,
                   help="opt-in speed-ups to measure against eager fp32 (speed-up, max image difference): comma-"
                        "separated channels_last, bf16, fp16 (CUDA), math_attention (vs the default SDPA), compile")
    p.add_argument("--onnx", action="store_true",
                   help="also time the student exported as one ONNX graph under onnxruntime")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "math", "xformers"],
                   help="attention backend of both pipelines' networks (default sdpa; xformers needs the package; "
                        "--train: use the train.attention override)")
    _hybrid_args(p, bench=True)
    p.add_argument("--out", default=None, help="also write the JSON here")
    _common(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("curve", help="quality against training budget: eval every checkpoint of a distill run")
    p.add_argument("--run", required=True, help="output_dir of a stepdistill distill run (dmd / dmd2)")
    p.add_argument("--num", type=int, default=500, help="class-balanced samples per checkpoint (default 500)")
    p.add_argument("--steps", type=int, default=None, help="student sampling steps (default: all of its steps)")
    p.add_argument("--every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
    p.add_argument("--min-step", type=int, default=0, help="only checkpoints from this step on (e.g. after a warm-up)")
    p.add_argument("--teacher-eval", default=None, help="a teacher's `stepdistill eval` JSON, drawn as dashed lines")
    p.add_argument("--acc-num", type=int, default=0,
                   help="also score class accuracy on this many more samples (noise seed + 1; no reference images)")
    p.add_argument("--pick-acc", type=float, default=None,
                   help="record the pick: lowest FID with class accuracy >= this (the --acc-num one if measured), "
                        "else the lowest FID. Use with --ref-split val")
    p.add_argument("--pick-with", nargs="+", default=(), metavar="CURVE_JSON",
                   help="with --pick-acc: curve.json files of this run at other --seed values (--out keeps them "
                        "apart); the pick reads each step's mean over the seeds")
    p.add_argument("--out", default=None, help="output folder (default RUN/curve): curve.json, curve.png")
    _ref_args(p)
    _common(p, device=False)
    p.set_defaults(fn=cmd_curve)

    p = sub.add_parser("report", help="Markdown/JSON/PNG comparison report of a student and its teacher")
    p.add_argument("--student", required=True, help="distilled student folder")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one recorded in the student)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing folder that an earlier report did not create (files of the same "
                        "names are replaced; nothing else is touched)")
    p.add_argument("--num", type=int, default=100, help="class-balanced samples per model (>= 2)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher sampling steps (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=2.0,
                   help="teacher classifier-free guidance scale (default %(default)s; 1 = no CFG)")
    p.add_argument("--fid", action="store_true", help="also compute FID (student 1..K steps and teacher)")
    p.add_argument("--fid-num", type=int, default=None, help="samples per FID (default: --num)")
    p.add_argument("--teacher-metrics", default=None,
                   help="with --fid: the teacher's `stepdistill eval` JSON on the same protocol (--fid-num, --seed, "
                        "reference), used instead of sampling the teacher again")
    _ref_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default %(default)s)")
    p.add_argument("--grid-rows", type=int, default=4, help="rows (samples per class) per model in the grid")
    _common(p)
    p.set_defaults(fn=cmd_report)
