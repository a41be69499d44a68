"""stepdistill: distill many-step diffusion models into one-step and few-step generators.

    from stepdistill import StepDistillPipeline
    pipe = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")
    images = pipe(class_labels=["cat", "dog"], seed=0).images

The pipelines are imported on first use, so ``import stepdistill`` stays light (no torch import).
"""
from __future__ import annotations

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("stepdistill")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "StepDistillPipeline": "stepdistill.pipelines.student",
    "StepDistillTeacherPipeline": "stepdistill.pipelines.teacher",
    "PhasedDMDPipeline": "stepdistill.pipelines.phased",
    "MultiStudentPipeline": "stepdistill.pipelines.multi_student",
    "load_text_pipeline": "stepdistill.pipelines.text",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stepdistill' has no attribute {name!r}")
