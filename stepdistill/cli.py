"""``stepdistill`` command line: teacher | distill | export | sample | eval | bench | report | demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_arg(p: argparse.ArgumentParser, default: str | None):
    p.add_argument("--config", default=default, help="YAML config (defaults to the shipped one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of output_dir")


def _default_config(name: str) -> str | None:
    p = CONFIG_DIR / name
    return str(p) if p.exists() else None


def cmd_teacher(a):
    from .config import TeacherConfig, load_config
    from .trainers.teacher import train_teacher

    cfg = load_config(TeacherConfig, a.config, a.overrides)
    train_teacher(cfg, resume=a.resume)


def cmd_distill(a):
    from .config import DistillConfig, load_config
    from .trainers.distill import distill

    cfg = load_config(DistillConfig, a.config, a.overrides)
    distill(cfg, resume=a.resume)


def cmd_export(a):
    """Export the EMA student of a run (latest or given checkpoint) as a diffusers folder."""
    from .config import DistillConfig, load_config
    from .trainers.distill import build_dmd, export_student, load_trained_generator

    cfg = load_config(DistillConfig, a.config, a.overrides)
    out = Path(a.out or Path(cfg.output_dir) / "student")
    if cfg.method == "phased_dmd":
        from .trainers.phased_dmd import export_phased, load_trained_experts

        experts, obj, meta = load_trained_experts(cfg, a.checkpoint)
        out = export_phased(experts, cfg, meta, out, schedule=obj.experts[0].schedule)
    elif cfg.method == "msd":
        from .trainers.multi_student import export_multi_student, load_trained_students

        students, obj, meta = load_trained_students(cfg, a.checkpoint)
        out = export_multi_student(students, cfg, meta, out, obj.groups, schedule=obj.students[0].schedule)
    else:
        g = load_trained_generator(cfg, a.checkpoint)
        _, _, meta = build_dmd(cfg)
        out = export_student(g, cfg, meta, out)
    print(json.dumps({"exported": str(out)}))


def cmd_sample(a):
    from .text_cli import is_text_model, sample_text

    if is_text_model(a.model):  # text-to-image teachers and students: --prompt / --negative-prompt
        return sample_text(a)
    if a.prompt or a.negative_prompt:
        from .config import ConfigError

        raise ConfigError(f"--prompt / --negative-prompt need a text-conditioned model; {a.model} is not one")
    import torch

    from .models import load_denoiser
    from .pipelines.sampling import make_scheduler, scheduler_sample, student_sample
    from .models import load_scheduler_config
    from .utils import save_grid

    den, meta = load_denoiser(a.model, allow_pickle=a.allow_pickle)
    den.eval()
    labels = _parse_labels(a.classes, meta, a.num)
    g = torch.Generator().manual_seed(a.seed)
    c = den.backbone.config
    noise = torch.randn(len(labels), c.in_channels, c.sample_size, c.sample_size, generator=g)
    if meta.student_timesteps and not a.scheduler:
        steps = a.steps or len(meta.student_timesteps)
        ts = _student_timesteps(meta.student_timesteps, steps)
        x = student_sample(den, ts, labels, noise, generator=g)
    else:
        sched = make_scheduler(a.scheduler or "ddim", load_scheduler_config(a.model, None))
        x = scheduler_sample(den, sched, labels, a.steps or 50, a.guidance_scale, noise, progress=True)
    path = save_grid(x, a.out, nrow=a.nrow, scale=a.scale)
    print(json.dumps({"grid": str(path), "n": len(labels)}))


def _student_timesteps(trained: list[float], steps: int) -> list[float]:
    if steps < 1 or steps > len(trained):
        from .config import ConfigError

        raise ConfigError(f"--steps must be in 1..{len(trained)} for this student")
    if steps == len(trained):
        return list(trained)
    # fewer steps than trained: an evenly spaced subset that keeps the first (pure-noise) step
    import numpy as np

    idx = np.round(np.linspace(0, len(trained) - 1, steps)).astype(int)
    return [trained[i] for i in idx]


def _parse_labels(classes: str | None, meta, n: int):
    import torch

    from .utils import class_balanced_labels

    names = meta.class_names
    if not names:
        return torch.zeros(n, dtype=torch.long)
    if not classes:
        return class_balanced_labels(n, len(names))
    out = []
    for c in classes.split(","):
        c = c.strip()
        if c.isdigit() and int(c) < len(names):
            out.append(int(c))
        elif c in names:
            out.append(names.index(c))
        else:
            from .config import ConfigError

            raise ConfigError(f"unknown class {c!r}; known: {', '.join(names)}")
    reps = max(1, n // len(out))
    return torch.tensor(out, dtype=torch.long).repeat_interleave(reps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepdistill", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("teacher", help="train a class-conditional UNet2DModel teacher")
    _config_arg(p, _default_config("teacher_animal_mnist.yaml"))
    p.set_defaults(fn=cmd_teacher)

    p = sub.add_parser("distill", help="DMD / DMD2 distillation of a teacher into a one-/few-step student")
    _config_arg(p, _default_config("dmd2_animal_mnist.yaml"))
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("export", help="export a run's EMA student as a diffusers folder")
    _config_arg(p, _default_config("dmd2_animal_mnist.yaml"))
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <output_dir>/student)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("sample", help="sample a PNG grid from a teacher or student folder")
    p.add_argument("--model", default="builtin:animal_mnist")
    p.add_argument("--scheduler", default=None, help="ddim | euler | dpm++ | ddpm (teacher sampling)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--classes", default=None, help="comma-separated class names or indices")
    p.add_argument("--prompt", action="append", default=None,
                   help="text models: a prompt (repeat the flag or separate with |); default: the caption set")
    p.add_argument("--negative-prompt", default=None, help="text teachers: replaces the empty prompt in CFG")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--nrow", type=int, default=10)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(fn=cmd_sample)

    from . import cli_more

    cli_more.add_commands(sub)
    from .demo import add_demo_command

    add_demo_command(sub)
    a = ap.parse_args(argv)
    from .config import ConfigError
    from .data import DataError
    from .models import ModelLoadError

    try:
        a.fn(a)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
