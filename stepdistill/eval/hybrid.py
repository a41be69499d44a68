"""Hybrid sampling in ``stepdistill eval`` / ``bench``: a teacher takes the first steps of a student.

The chain and its NFE are defined in :mod:`stepdistill.pipelines.hybrid` (Gandikota & Bau 2025).
:class:`Hybrid` binds a loaded :class:`~stepdistill.eval.generate.TeacherModel` to a student wrapper:
``StudentModel.hybrid = Hybrid(...)`` makes its ``generate`` run the hybrid chain on the same noise
(and the same re-noising draws) as the plain student, so the two compare sample for sample.

Plain students (:class:`~stepdistill.pipelines.student.StepDistillPipeline`) accept any
``1 <= hybrid_steps <= steps``; Phased DMD and multi-student pipelines take a teacher first step only
(``hybrid_steps = 1``, hand-off ``renoise``; the Phased DMD chain itself continues from the DDIM state
implied by the given x0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..pipelines.hybrid import HybridSide, TeacherSteps, hybrid_nfe, hybrid_problem


@dataclass
class Hybrid:
    """The teacher (a ``TeacherModel``) takes the first ``steps`` student steps, ``substeps`` DDIM
    sub-steps each, with CFG scale ``guidance_scale``; ``handoff``: renoise | ode
    (:mod:`stepdistill.pipelines.hybrid`)."""
    teacher: object
    steps: int = 1
    substeps: int = 1
    guidance_scale: float = 2.0
    handoff: str = "renoise"

    @property
    def cfg(self) -> bool:
        return bool(self.teacher.uses_cfg(self.guidance_scale))

    @property
    def effective_scale(self) -> float:
        return float(self.guidance_scale) if self.cfg else 1.0

    def check(self, student, student_steps: int) -> None:
        """The one hybrid check (:func:`stepdistill.pipelines.hybrid.hybrid_problem`): step counts, what the student
        pipeline allows, and that teacher and student share images, classes and schedule."""
        ts = [float(t) for t in student.pipe.timesteps_for(student_steps)]
        why = hybrid_problem(side(self.teacher), side(student), type(student.pipe), ts, self.steps, self.substeps,
                             self.handoff)
        if why:
            raise ConfigError(f"--hybrid-teacher {self.teacher.path} / --hybrid-steps / --hybrid-substeps / "
                              f"--hybrid-handoff: cannot take {student.path}'s steps: {why}")

    def nfe(self, student_steps: int) -> int:
        return hybrid_nfe(student_steps, self.steps, self.substeps, self.cfg)

    def first_step(self, labels, timesteps) -> TeacherSteps:
        t = self.teacher
        cond = labels.to(t.device) if labels is not None else None
        return TeacherSteps(t.pipe.denoiser(), cond, self.effective_scale, timesteps, self.substeps, self.handoff)

    def sample(self, student, noise, labels, steps: int, generator) -> torch.Tensor:
        """One batch of the hybrid chain for a ``StudentModel`` (x0 (B, C, H, W) in [-1, 1])."""
        ts = [float(v) for v in student.pipe.timesteps_for(steps)]
        fs = self.first_step(labels, ts)
        return student.pipe.sample(noise, labels, steps, generator=generator, first_step=fs, hybrid_steps=self.steps)

    def pipe_kwargs(self, student, labels, steps: int) -> dict:
        """Keyword arguments for the student pipeline's ``__call__`` (bench)."""
        ts = [float(v) for v in student.pipe.timesteps_for(steps)]
        kw = {"first_step": self.first_step(labels, ts)}
        if self.steps != 1:
            kw["hybrid_steps"] = self.steps
        return kw

    def describe(self, student_steps: int) -> dict:
        return {"teacher": self.teacher.path, "steps": self.steps, "substeps": self.substeps, "handoff": self.handoff,
                "guidance_scale": self.effective_scale, "cfg": self.cfg,
                "teacher_nfe_per_sample": self.steps * self.substeps * (2 if self.cfg else 1),
                "student_nfe_per_sample": student_steps - self.steps}


def side(model) -> HybridSide:
    """A loaded eval model (``TeacherModel`` / ``StudentModel``) as one side of the hybrid check."""
    return HybridSide(tuple(model.image_shape), model.meta.conditioning, list(model.class_names),
                      dict(model.pipe.scheduler.config))
