"""Shared fixtures: tiny models and a tiny teacher trained on sklearn digits (seconds on CPU)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# one thread per process, subprocesses included: `make test` runs two workers on two cores, and a 2-thread torch job
# beside another busy process slows several-fold
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest
import torch

torch.set_num_threads(1)

TINY_TEACHER_OVERRIDES = [
    "data.name=digits", "data.resolution=16",
    "model.block_out_channels=[16,32]", "model.attention_levels=[false,true]", "model.norm_num_groups=8",
    "model.attention_head_dim=8", "optim.lr=0.002", "optim.warmup_steps=5",
    "train.batch_size=32", "train.max_steps=40", "train.sample_every=40", "train.checkpoint_every=40",
    "train.log_every=5", "train.threads=1", "sample_steps=4", "train.cpu=true",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["STEPDISTILL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A class-conditional UNet2DModel teacher on 16x16 digits, saved as a diffusers folder."""
    from stepdistill.config import TeacherConfig, load_config
    from stepdistill.trainers.teacher import train_teacher

    out = tmp_path_factory.mktemp("tiny_teacher")
    cfg = load_config(TeacherConfig, None, TINY_TEACHER_OVERRIDES + [f"output_dir={out}"])
    return train_teacher(cfg)


def tiny_distill_overrides(teacher, out, **extra) -> list[str]:
    base = {
        "output_dir": str(out), "data.name": "digits", "data.resolution": 16, "dmd.teacher": str(teacher),
        "train.batch_size": 8, "train.max_steps": 4, "train.sample_every": 4, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.threads": 1, "train.cpu": "true", "dmd.critic_updates": 2,
        "dmd.optim.lr": 1e-4, "dmd.critic_optim.lr": 1e-4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_cfg(teacher, out, **extra):
    """A tiny distill config (``tiny_distill_overrides``) loaded as a DistillConfig."""
    from stepdistill.config import DistillConfig, load_config

    return load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, **extra))


def tiny_objective(teacher, out, **extra):
    """``(objective, data)`` of a tiny distill config with DMD2's GAN head (``tiny_distill_overrides``)."""
    from stepdistill.trainers.distill import build_method

    obj, data, _ = build_method(tiny_cfg(teacher, out, **{"dmd.gan": "true", **extra}))
    return obj, data


def generator_grads(obj, data, seed: int = 0):
    """The generator's parameter gradients (clones) and logs of one generator loss at step 5 (critic frozen)."""
    import torch

    from stepdistill.trainers.objective import Ctx

    gen = obj.players["generator"].module
    obj.players["critic"].module.requires_grad_(False)
    gen.requires_grad_(True)
    ctx = Ctx(torch.Generator().manual_seed(seed), 0, 1, 8, torch.device("cpu"), 5, data)
    loss, logs = obj.generator_loss(ctx)
    loss.backward()
    return [p.grad.clone() for p in gen.parameters()], logs


def distill_argv(teacher, out, **extra) -> list:
    """``stepdistill distill`` arguments of a tiny run (no config file: dataclass defaults + overrides)."""
    return ["distill", "--config", "", *tiny_distill_overrides(teacher, out, **extra)]


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``stepdistill ARGV`` run in-process."""
    from stepdistill.frontends.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def snapshot(folder) -> dict:
    """Every file below ``folder`` -> its bytes (to check that nothing was touched)."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
