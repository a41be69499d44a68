"""The models shipped inside the package, by ``builtin:`` name (no torch or diffusers import here).

``resolve_shipped(name)`` turns a ``builtin:`` name into its folder; every loader (the CLI, the
pipelines' ``from_pretrained``, eval, the demo) goes through it, so a builtin name works wherever a
model folder is accepted.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError

ASSETS = Path(__file__).parent / "assets"
BUILTIN_TEACHERS = {"builtin:animal_mnist": ASSETS / "animal_mnist_teacher",
                    # text-to-image (UNet2DConditionModel on MiniLM captions; references the MiniLM package)
                    "builtin:animal_mnist_text": ASSETS / "animal_mnist_text_teacher",
                    # text-to-video (WanTransformer3DModel, flow matching, 8 x 16 x 16 clips; references MiniLM)
                    "builtin:moving_animal_mnist": ASSETS / "moving_animal_mnist_teacher"}
BUILTIN_STUDENTS = {"builtin:animal_mnist_dmd2": ASSETS / "animal_mnist_dmd2_student",
                    "builtin:animal_mnist_dmd2_4step": ASSETS / "animal_mnist_dmd2_4step_student"}


def shipped_names() -> list[str]:
    return sorted({**BUILTIN_TEACHERS, **BUILTIN_STUDENTS})


def resolve_shipped(name: str | os.PathLike) -> str | os.PathLike | Path:
    """``builtin:NAME`` -> its folder (checked); anything else is returned unchanged."""
    if not isinstance(name, str) or not name.startswith("builtin:"):
        return name
    builtins = {**BUILTIN_TEACHERS, **BUILTIN_STUDENTS}
    if name not in builtins:
        raise ModelLoadError(f"unknown shipped model {name!r}; shipped: {', '.join(shipped_names())}")
    p = builtins[name]
    if not p.exists():
        raise ModelLoadError(f"{name}: shipped model missing at {p}; see configs/ for the command that makes it")
    return p


def missing_folder_hint(path: str) -> str:
    """What to say when a model folder does not exist: a run's folder appears after training."""
    hint = f"shipped models need no training: {', '.join(shipped_names())}"
    if "runs/" in str(path).replace(os.sep, "/"):
        hint = f"a run's student appears after `make run` (or `stepdistill distill` + `export`); {hint}"
    return hint
