"""stepdistill command line: teacher | distill | export | sample | eval | bench | curve | report | onnx | plan | prune | grow | demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: the shipped configs: package data (the repo's configs/ is a link to this folder), so a wheel has them too
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _config_arg(p: argparse.ArgumentParser, default: str | None, train: bool = True):
    p.add_argument("--config", default=default,
                   help="YAML config (default: " + ("the shipped one)" if train else "the run's own "
                                                     "<output_dir>/config.yaml, output_dir from the overrides)"))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    if train:
        p.add_argument("--resume", nargs="?", const="latest", default=False, metavar="CHECKPOINT",
                       help="continue the run in output_dir: from the newest checkpoint that passes its hash check "
                            "(default), last_good (after a NaN stop) or a named checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help=("export: replace an existing --out folder that an earlier export wrote" if not train else
                         "start afresh in an output_dir that holds a run: delete that run's own files (checkpoints, "
                         "logs, samples, model); only in a folder stepdistill created, never other files"))


def _resume_value(a) -> None:
    """``--resume key=value``: argparse gives the override to the optional CHECKPOINT; hand it back."""
    if isinstance(a.resume, str) and "=" in a.resume and not Path(a.resume).exists():
        a.overrides = [a.resume] + list(a.overrides)
        a.resume = "latest"


def _default_config(name: str) -> str:
    """The shipped config ``name`` (checked when the command runs: :func:`_check_default_config`)."""
    return str(CONFIG_DIR / name)


def _check_default_config(path: str | None) -> None:
    """A shipped default config that is missing (a broken install) is said in one line, never replaced by the
    dataclass defaults in silence; ``--config ''`` asks for those explicitly."""
    from ..config import ConfigError

    if path and Path(path).parent == CONFIG_DIR and not Path(path).exists():
        raise ConfigError(f"the shipped config {path} is missing from this install (reinstall stepdistill); pass "
                          f"--config FILE, or --config '' for the built-in defaults")


def cmd_teacher(a):
    from ..config import TeacherConfig, load_config
    from ..trainers.teacher import train_teacher

    _resume_value(a)
    _check_default_config(a.config)
    cfg = load_config(TeacherConfig, a.config, a.overrides)
    train_teacher(cfg, resume=a.resume, overwrite=a.overwrite)


def cmd_distill(a):
    from ..config import ConfigError, DistillConfig, load_config
    from ..trainers.distill import distill

    _resume_value(a)
    _check_default_config(a.config)
    cfg = load_config(DistillConfig, a.config, a.overrides)
    if a.fork and a.resume:
        raise ConfigError("--fork starts a new run from another run's checkpoint; it cannot be combined with --resume")
    if cfg.train.memory_budget_gib:  # the planner acts: the cheapest setting that fits, before anything is built
        from ..profiling.budget import fit_to_budget

        fit_to_budget(cfg)
    distill(cfg, resume=a.resume, overwrite=a.overwrite, fork=a.fork)


def cmd_export(a):
    """Export the EMA student of a run (latest or given checkpoint, hash-checked) as a diffusers folder,
    written to a temporary folder and renamed into place; a non-empty --out needs --overwrite."""
    from ..methods import get_method
    from ..outputs import check_replace_folder
    from ..trainers.loading import load_trained
    from ..utils import atomic_folder

    cfg = export_config(a)
    out = Path(a.out or Path(cfg.output_dir) / "student")
    inputs = [cfg.output_dir + "/checkpoints", a.checkpoint, a.config]  # never replaced by the export
    check_replace_folder(out, a.overwrite, "export", inputs)  # before any loading
    modules, obj, meta = load_trained(cfg, a.checkpoint, a.weights)
    with atomic_folder(out, overwrite=a.overwrite, inputs=inputs) as tmp:
        get_method(cfg.method).export(modules, obj, cfg, meta, tmp)
    print(json.dumps({"exported": str(out)}))


def export_config(a):
    """The config ``export`` uses: ``--config`` when given; else the run's own ``<output_dir>/config.yaml`` (the
    output_dir from the overrides, or the shipped config's), so ``export output_dir=run1`` exports run1 as it was
    trained. A teacher run is refused with what to do instead."""
    import yaml

    from ..config import ConfigError, DistillConfig, load_config

    path = a.config
    if path is None:
        base = load_config(DistillConfig, _default_config("dmd2_animal_mnist.yaml"), a.overrides)
        own = Path(base.output_dir) / "config.yaml"
        if not own.exists():
            raise ConfigError(f"{base.output_dir} holds no run (no config.yaml); give the run folder with "
                              f"output_dir=RUN or its config with --config RUN/config.yaml")
        path = str(own)
    _check_default_config(path)
    if Path(path).is_file():
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(raw, dict) and "cfg_dropout" in raw and "model" in raw:
            run = Path(path).parent
            raise ConfigError(f"{path} is a teacher run (stepdistill teacher): its model is already a diffusers folder, "
                              f"{run / 'model'}; sample or eval it directly, or distill it with dmd.teacher={run / 'model'}")
    return load_config(DistillConfig, path, a.overrides)


def sample_text(a) -> None:
    """Write a grid: ``--num`` images split evenly over the prompts (one column per prompt with --nrow)."""
    import torch

    from ..config import ConfigError
    from ..text_models import default_prompts
    from ..pipelines.loading import load_text_pipeline
    from ..pipelines.text import StepDistillTextPipeline
    from ..utils import save_labeled_grid

    pipe = load_text_pipeline(a.model, allow_pickle=a.allow_pickle)
    if getattr(a, "compile", False):
        pipe.unet.compile()
    prompts = [s for p in (a.prompt or []) for s in p.split("|")] or default_prompts(pipe.meta)
    if a.classes:
        raise ConfigError("--classes is for class-conditional models; give text models --prompt")
    reps = max(1, a.num // len(prompts))
    if reps * len(prompts) != a.num:
        print(f"note: --num {a.num} over {len(prompts)} prompt(s) gives {reps * len(prompts)} images "
              f"({reps} per prompt); each prompt gets the same number", file=sys.stderr)
    g = torch.Generator().manual_seed(a.seed)
    if isinstance(pipe, StepDistillTextPipeline):
        if a.negative_prompt:
            raise ConfigError("--negative-prompt: a distilled student has its guidance built in (the teacher's "
                              "negative prompt was the empty prompt); sample the teacher to use one")
        if a.steps is not None and not 1 <= a.steps <= len(pipe.config.student_timesteps):
            raise ConfigError(f"--steps must be in 1..{len(pipe.config.student_timesteps)} for this student")
        ignored = [f for f, v in (("--sampler", a.sampler), ("--guidance-scale", a.guidance_scale)) if v is not None]
        if ignored:
            print(f"warning: {' and '.join(ignored)} ignored: a distilled student samples with its own chain, "
                  f"guidance built in", file=sys.stderr)
        x = pipe(prompts, num_images_per_prompt=reps, num_inference_steps=a.steps, generator=g, output_type="pt").images
    else:
        x = pipe(prompts, negative_prompt=a.negative_prompt, num_images_per_prompt=reps,
                 num_inference_steps=a.steps or 50, guidance_scale=2.0 if a.guidance_scale is None else a.guidance_scale, sampler=a.sampler or "ddim",
                 generator=g, output_type="pt", progress=True).images
    # prompt-major batch -> grid with one column per prompt: reorder to (rep, prompt)
    x = x.reshape(len(prompts), reps, *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
    captions = [p for _ in range(reps) for p in prompts]
    path = save_labeled_grid(x.clamp(-1, 1), a.out, nrow=a.nrow or len(prompts), scale=a.scale, captions=captions)
    print(json.dumps({"grid": str(path), "n": int(x.shape[0]), "prompts": prompts}))


def cmd_sample(a):
    from ..config import ConfigError
    from ..models import read_folder

    check_sample_args(a)
    from .cli_tools import _set_threads

    _set_threads(a)
    info = read_folder(a.model)
    if info.is_text:  # text-to-image teachers and students: --prompt / --negative-prompt
        return sample_text(a)
    if a.prompt or a.negative_prompt:
        raise ConfigError(f"--prompt / --negative-prompt need a text-conditioned model; {a.model} is not one")
    import torch

    from ..models import load_denoiser, load_scheduler_config
    from ..pipelines.sampling import make_scheduler, scheduler_sample
    from ..utils import quantize, save_labeled_grid

    g = torch.Generator().manual_seed(a.seed)
    n = a.num
    if info.kind == "student":  # loaded once, as its folder's own pipeline (experts, routed students)
        from ..eval.generate import load_any

        student = load_any(a.model, allow_pickle=a.allow_pickle)
        pipe, meta, shape = student.pipe, student.meta, student.image_shape
        labels = _parse_labels(a.classes, meta, n)
        check_grid_size(n, shape, a.scale)
        ignored = [f for f, v in (("--sampler", a.sampler), ("--guidance-scale", a.guidance_scale)) if v is not None]
        if ignored:
            print(f"warning: {' and '.join(ignored)} ignored: a distilled student samples with its own "
                  f"{len(meta.student_timesteps)}-step chain, guidance built in", file=sys.stderr)
        steps = len(_student_timesteps(meta.student_timesteps, a.steps or len(meta.student_timesteps)))
        try:
            pipe.timesteps_for(steps)
        except ValueError as e:
            raise ConfigError(f"--steps: {e}") from None
        if a.compile:  # opt-in: pays off for large --num (the first batch compiles; see BENCHMARKS.md "Inference")
            pipe.compile()
        run = lambda y, noise: pipe.sample(noise, y, steps, generator=g)  # noqa: E731  the one sampling route
    else:
        den, meta = load_denoiser(a.model, allow_pickle=a.allow_pickle)
        den.eval()
        labels = _parse_labels(a.classes, meta, n)
        shape = den.sample_shape  # (C, H, W): the adapter knows the model family
        check_grid_size(n, shape, a.scale)
        if a.compile:
            den.backbone.compile()
        sched_cfg = load_scheduler_config(a.model, None)
        make_scheduler(a.sampler or "ddim", sched_cfg)  # an unknown --sampler fails before any sampling
        w = TEACHER_GUIDANCE if a.guidance_scale is None else a.guidance_scale
        if labels is None:
            w = 1.0  # unconditional: nothing to guide
            if a.guidance_scale not in (None, 1.0):
                print("warning: --guidance-scale ignored: the model is unconditional", file=sys.stderr)
        run = lambda y, noise: scheduler_sample(  # noqa: E731
            den, make_scheduler(a.sampler or "ddim", sched_cfg), y, a.steps or 50, w, noise,
            progress=n <= SAMPLE_BATCH)
    # batches of SAMPLE_BATCH (one batch draws its noise exactly as before), converted to uint8 as they come
    chunks = []
    for i in range(0, n, SAMPLE_BATCH):
        y = labels[i:i + SAMPLE_BATCH] if labels is not None else None
        chunks.append(quantize(run(y, torch.randn(min(SAMPLE_BATCH, n - i), *shape, generator=g))))
    names = meta.class_names
    k = len(set(labels.tolist())) if labels is not None else 1
    nrow = a.nrow or (k if names and k > 1 else 10)
    captions = [names[int(i)] for i in labels] if names and labels is not None else None
    path = save_labeled_grid(torch.cat(chunks), a.out, nrow=nrow, scale=a.scale, captions=captions)
    print(json.dumps({"grid": str(path), "n": n, "columns": nrow}))


SAMPLE_BATCH = 256
MAX_ERROR_CHARS = 1000
TEACHER_GUIDANCE = 2.0
MAX_GRID_BYTES = 512 * 2**20


def check_sample_args(a) -> None:
    """Refuse what would silently give a wrong grid: see the README's "Failure behaviour"."""
    import math

    from ..config import ConfigError

    if a.num < 1:
        raise ConfigError(f"--num must be >= 1, got {a.num}")
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {a.steps}")
    if a.guidance_scale is not None and (not math.isfinite(a.guidance_scale) or a.guidance_scale < 0):
        raise ConfigError(f"--guidance-scale must be a finite number >= 0, got {a.guidance_scale}")
    from ..config import MAX_SEED

    if not 0 <= a.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {a.seed}")
    if a.scale < 1 or (a.nrow is not None and a.nrow < 1):
        raise ConfigError(f"--scale and --nrow must be >= 1, got {a.scale} and {a.nrow}")
    if Path(a.out).suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {a.out}")
    from ..outputs import check_replace_file

    check_replace_file(Path(a.out), a.overwrite)  # a file stepdistill did not write needs --overwrite


def check_grid_size(n: int, shape: tuple[int, int, int], scale: int) -> None:
    """A PNG grid holds every image in memory: refuse one over MAX_GRID_BYTES, warn from 1,000 images."""
    from ..config import ConfigError

    c, h, w = shape
    nbytes = n * 3 * (h * scale + 1) * (w * scale + 1)
    from ..denoiser import check_sample_shape

    check_sample_shape(shape)
    if nbytes > MAX_GRID_BYTES:
        raise ConfigError(f"a grid of {n} images at --scale {scale} needs {nbytes / 2**30:.1f} GiB; lower --num "
                          f"(at most {MAX_GRID_BYTES * n // nbytes} here) or --scale")
    if n > 1000:
        print(f"warning: a grid of {n} images is large ({nbytes / 2**20:.0f} MiB in memory)", file=sys.stderr)


def _student_timesteps(trained: list[float], steps: int) -> list[float]:
    """``--steps`` of a student's timesteps: all, or an evenly spaced subset keeping the first (pure-noise) one."""
    from ..config import ConfigError
    from ..pipelines.sampling import subset_timesteps

    try:
        return subset_timesteps(trained, steps)
    except ValueError:
        raise ConfigError(f"--steps must be in 1..{len(trained)} for this student") from None


def _parse_labels(classes: str | None, meta, n: int):
    """(B,) labels for ``sample``: the chosen classes (default: all) in turn, ``i % k``, so that ``--num`` images come
    out class-balanced and a grid with ``k`` columns shows one class per column, with or without ``--classes``."""
    import torch

    from ..config import ConfigError

    names = meta.class_names
    if not names:  # an unconditional model takes no labels at all (None: no class embedding, no CFG)
        if classes:
            raise ConfigError("--classes: this model is unconditional (it has no classes)")
        return None
    if not classes:
        chosen = list(range(len(names)))
    else:
        from ..conditioning import class_index

        chosen = []
        for c in classes.split(","):
            try:
                chosen.append(class_index(c.strip(), names))
            except ValueError as e:
                raise ConfigError(f"--classes: {e}") from None
        if n < len(chosen):
            raise ConfigError(f"--num {n} is fewer than the {len(chosen)} classes given to --classes; "
                              f"raise --num to at least {len(chosen)}")
    return torch.tensor(chosen, dtype=torch.long)[torch.arange(n) % len(chosen)]


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    ap = argparse.ArgumentParser(prog="stepdistill", description=__doc__)
    ap.add_argument("--version", action="version", version=f"stepdistill {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("teacher", help="train a class-conditional UNet2DModel teacher")
    _config_arg(p, _default_config("teacher_animal_mnist.yaml"))
    p.set_defaults(fn=cmd_teacher)

    p = sub.add_parser("distill", help="DMD / DMD2 distillation of a teacher into a one-/few-step student")
    _config_arg(p, _default_config("dmd2_animal_mnist.yaml"))
    p.add_argument("--fork", default=None, metavar="CHECKPOINT",
                   help="a new run starting from another run's checkpoint folder (weights, optimizer, step) under this "
                        "config, which may differ: an ablation branching off a shared warm-up")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("export", help="export a run's EMA student as a diffusers folder")
    _config_arg(p, None, train=False)  # default: the run's own config.yaml (cli.export_config)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/student)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="the EMA weights (default) or the raw, un-averaged ones (to measure the EMA's effect)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("sample", help="sample a PNG grid from a teacher or student folder")
    p.add_argument("--model", default="builtin:animal_mnist",
                   help="model folder, hub id or shipped name (builtin:animal_mnist teacher, builtin:animal_mnist_dmd2 "
                        "1-step and builtin:animal_mnist_dmd2_4step students; default %(default)s)")
    p.add_argument("--sampler", "--scheduler", dest="sampler", default=None,  # --scheduler: the old spelling
                   help="teachers: ddim | euler | dpm++ | ddpm (default ddim); a student ignores it (its own chain)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps: teachers default 50; students default all their trained steps (fewer: a subset)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"teachers: classifier-free guidance scale (default {TEACHER_GUIDANCE:g}; 1 = no CFG); "
                        "a student ignores it (guidance is distilled in)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names or indices, sampled in turn (default: every class); "
                        "the grid has one labelled column per class")
    p.add_argument("--prompt", action="append", default=None,
                   help="text models: a prompt (repeat the flag or separate with |); default: the caption set")
    p.add_argument("--negative-prompt", default=None, help="text teachers: replaces the empty prompt in CFG")
    p.add_argument("--num", type=int, default=40, help="number of images (default %(default)s)")
    p.add_argument("--nrow", type=int, default=None,
                   help="images per grid row (default: one column per class or prompt; 10 for unconditional models)")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid (default %(default)s)")
    from .cli_tools import threads_arg

    p.add_argument("--seed", type=int, default=0, help="random seed, 0..2**31-1 (default 0)")  # checked: one line
    threads_arg(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; only for folders you trust (default: safetensors only)")
    p.add_argument("--out", default="samples.png", help="output PNG grid (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that stepdistill did not write (its own grids are replaced anyway)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network first (opt-in: compiling takes minutes on a CPU)")
    p.set_defaults(fn=cmd_sample)

    from . import cli_tools

    cli_tools.add_commands(sub)
    from .demo_ui import add_demo_command

    add_demo_command(sub)
    a = ap.parse_args(argv)
    from ..errors import TrainingInterrupted

    try:
        rc = a.fn(a)
    except TrainingInterrupted as e:  # the checkpoint is saved; the message says how to resume
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (eval, sample, export): nothing half-written is kept
        if a.debug:
            raise
        print("\ninterrupted (Ctrl-C); outputs are written atomically, so nothing half-written was left", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with --debug (or for a real bug)
        line = user_error(e)
        if line is None or a.debug:
            raise
        line = " ".join(line.split("\n"))
        if len(line) > MAX_ERROR_CHARS:  # a YAML alias bomb or a huge value must not print megabytes
            line = line[:MAX_ERROR_CHARS] + f" ... ({len(line) - MAX_ERROR_CHARS} more characters)"
        print(f"error: {line}", file=sys.stderr)
        return 2
    close_process_group()
    return rc if isinstance(rc, int) else 0


def close_process_group() -> None:
    """Destroy this process's torch.distributed process group, if a multi-process run (``accelerate launch``)
    started one. PyTorch asks every process to do so before it exits: otherwise gloo's worker threads can abort the
    interpreter's shutdown (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489), and a
    run that finished and saved everything is reported as failed by the launcher. Called after a command succeeded
    only: after an error another process may still be inside a collective, and destroying the group then can hang
    it (the lesson of pytorch/torchtitan#1342)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for commands that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def user_error(e: BaseException) -> str | None:
    """One line naming the problem (and the fix) for errors a user can cause; None for a bug."""
    from ..errors import StepDistillError

    if isinstance(e, StepDistillError):
        return str(e)
    try:
        import yaml

        if isinstance(e, yaml.YAMLError):
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            return f"the YAML config is not valid{where}: {getattr(e, 'problem', None) or e}"
    except ImportError:  # pragma: no cover
        pass
    if type(e).__name__ == "SafetensorError" or "safetensors" in type(e).__module__:
        return f"a safetensors file is truncated or corrupt ({e}); re-export or re-download it"
    if isinstance(e, IsADirectoryError):
        return f"{e.filename} is a folder; pass a file"
    if isinstance(e, FileNotFoundError):
        return f"{e.filename or e}: no such file or folder"
    if isinstance(e, PermissionError):
        return f"cannot write {e.filename or e}: permission denied; choose another path"
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    if isinstance(e, (ValueError, OverflowError)):
        return str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
