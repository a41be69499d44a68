"""Pipelines (``DiffusionPipeline`` subclasses): students, teachers, Phased DMD, multi-student, text.

:func:`student_pipeline_class` is the one lookup from ``model_index.json``'s ``_class_name`` to the class
that loads a distilled folder (the demo and ``stepdistill eval`` use it)."""
from __future__ import annotations

STUDENT_PIPELINES = {
    "StepDistillPipeline": "stepdistill.pipelines.student",
    "PhasedDMDPipeline": "stepdistill.pipelines.phased",
    "MultiStudentPipeline": "stepdistill.pipelines.multi_student",
}


def student_pipeline_class(name: str | None):
    """The student pipeline class called ``name``, or None for any other name (teachers, text pipelines)."""
    if name not in STUDENT_PIPELINES:
        return None
    import importlib

    return getattr(importlib.import_module(STUDENT_PIPELINES[name]), name)
