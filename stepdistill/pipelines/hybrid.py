"""Hybrid sampling: the teacher takes the first (high-noise) step(s) of a student's chain.

"Diversity distillation" (Gandikota & Bau 2025, *Distilling Diversity and Control in Diffusion
Models*): distilled students lose sample diversity mostly in their first, high-noise step, where the
composition is decided. Letting the base (teacher) model, with its own classifier-free guidance, take
that step and the distilled student the rest brings back the teacher's variety at a small extra cost.
Training-free.

Chain over the student's timesteps ``t_0 > ... > t_{K-1}`` with ``n = hybrid_steps`` (1 <= n <= K)::

    x = noise                                                  # x_{t_0} (B, C, H, W)
    for k in range(K):
        x0 = T(x, t_k) if k < n else G(x, t_k)                 # teacher for the first n steps
        x  = add_noise(x0, fresh eps_k, t_{k+1})               # if k < K - 1 (as the plain chain)

``T(x, t_k)`` is the teacher's CFG x0 prediction ``uncond + w (cond - uncond)`` (one batched call:
2 NFE per sample, 1 without CFG). With ``substeps = m > 1`` the teacher instead walks its own
deterministic DDIM path (eta = 0; Song et al. 2021, Eq. 12) across the student's interval on the grid
``s_j = t_k - j (t_k - t_{k+1}) / m`` (``t_K = 0``) and returns its *last* x0 prediction (at
``s_{m-1}``): a sharper estimate than the single high-noise prediction, which the chain then re-noises
to ``t_{k+1}`` with fresh noise exactly as it does the student's. ``m = 1`` is the single prediction.
The re-noising noise is the same whoever took the step, so a hybrid and a plain chain from the same
seed differ only in the steps the teacher took.

Hand-off (``handoff``): ``renoise`` (above) hands over the teacher's x0, re-noised with fresh noise
like the student's own steps. ``ode`` hands over the teacher's DDIM state at ``t_{k+1}`` instead
(the last sub-step lands on ``t_{k+1}``, ``x_{t_{k+1}} = alpha x0 + sigma eps_hat``): the layout
that the starting noise set survives the hand-off, as in a sampler that switches models mid-way
(Gandikota & Bau run the base model's own step, then the distilled model). With ``ode`` the eps
draw of that re-noising is still made and discarded, so later draws stay aligned with the plain chain.

NFE per sample = ``n m (2 with CFG, else 1) + (K - n)`` (:func:`hybrid_nfe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..denoiser import Denoiser


HANDOFFS = ("renoise", "ode")


def uses_cfg(cond, guidance_scale: float) -> bool:
    """CFG runs when the scale is not 1 and the teacher is conditioned (Denoiser.raw's rule)."""
    return cond is not None and float(guidance_scale) != 1.0


def hybrid_nfe(student_steps: int, hybrid_steps: int, substeps: int = 1, cfg: bool = True) -> int:
    """Network evaluations per sample of a hybrid chain (module docstring)."""
    check_hybrid(student_steps, hybrid_steps, substeps)
    return hybrid_steps * substeps * (2 if cfg else 1) + (student_steps - hybrid_steps)


def check_hybrid(student_steps: int, hybrid_steps: int, substeps: int = 1, handoff: str = "renoise") -> None:
    """The one rule set of a hybrid chain (pipelines, ``stepdistill eval/bench --hybrid-*``, the demo): the
    teacher takes 1..K of the student's K steps, each with >= 1 DDIM sub-steps, handing over by ``renoise``
    or ``ode``. ValueError otherwise; the front ends re-raise it in their own error type."""
    if not 1 <= int(hybrid_steps) <= int(student_steps):
        raise ValueError(f"hybrid steps must be in 1..{student_steps} (the student's steps), got {hybrid_steps}")
    if int(substeps) < 1:
        raise ValueError(f"hybrid teacher sub-steps must be >= 1, got {substeps}")
    if handoff not in HANDOFFS:
        raise ValueError(f"hybrid hand-off must be {' or '.join(sorted(HANDOFFS))}, got {handoff!r}")


@dataclass
class HybridSide:
    """What the one hybrid check needs of a teacher or a student, readable from a folder without weights:
    image shape (C, H, W), conditioning (class | text | none), class names, scheduler config."""
    shape: tuple
    conditioning: str = "class"
    class_names: list = field(default_factory=list)
    scheduler_config: dict = field(default_factory=dict)


def hybrid_problem(teacher: HybridSide, student: HybridSide, student_pipeline, student_timesteps: list[float],
                   hybrid_steps: int = 1, substeps: int = 1, handoff: str = "renoise") -> str | None:
    """The one answer to "can this teacher take these first steps of this student" (``stepdistill eval`` /
    ``bench --hybrid-*`` and the demo): None, or why not. The step counts (:func:`check_hybrid`); what the
    student pipeline class allows (``max_hybrid_steps``: None any number with either hand-off, 1 the first step
    with the re-noised hand-off, 0 none); then the pair: image shape, conditioning, class names (when both name
    them) and the noise schedule at the student's timesteps."""
    try:
        check_hybrid(len(student_timesteps), hybrid_steps, substeps, handoff)
    except ValueError as e:
        return str(e)
    limit = getattr(student_pipeline, "max_hybrid_steps", 0)
    name = getattr(student_pipeline, "__name__", str(student_pipeline))
    if limit == 0:
        return f"{name} does not support hybrid sampling"
    if limit is not None and (hybrid_steps > limit or handoff != "renoise"):
        return (f"{name} lets the teacher take the first step only (hand-off renoise); more teacher steps and the "
                "ode hand-off need a plain student (StepDistillPipeline)")
    if tuple(teacher.shape) != tuple(student.shape):
        return f"teacher images are {list(teacher.shape)}, student images {list(student.shape)}"
    if teacher.conditioning != student.conditioning:
        return f"teacher is {teacher.conditioning}-conditioned, student is {student.conditioning}-conditioned"
    if teacher.class_names and student.class_names and list(teacher.class_names) != list(student.class_names):
        return "teacher and student class names differ"
    if teacher.scheduler_config and student.scheduler_config:
        from ..schedules import schedule_from_config

        ts = torch.tensor([float(t) for t in student_timesteps])
        a_t, s_t = schedule_from_config(dict(teacher.scheduler_config)).alpha_sigma(ts)
        a_s, s_s = schedule_from_config(dict(student.scheduler_config)).alpha_sigma(ts)
        if not (torch.allclose(a_t.float(), a_s.float(), atol=1e-4) and torch.allclose(s_t.float(), s_s.float(),
                                                                                       atol=1e-4)):
            return "their noise schedules differ at the student's timesteps"
    return None


class TeacherSteps:
    """``first_step(x, t) -> x0`` callable for the student pipelines: the teacher's guided x0 (see the
    module docstring for ``substeps``).

    Args:
        teacher: the teacher :class:`Denoiser` (must share the student's noise schedule).
        cond: conditioning of the whole batch (``(B,)`` labels, text embeddings or None), on the teacher's device.
        guidance_scale: the teacher's CFG scale w.
        timesteps: the student chain's timesteps (needed for ``substeps > 1``: the next one ends the interval).
        substeps: DDIM sub-steps the teacher takes across one student interval.
        handoff: ``renoise`` (return x0) | ``ode`` (return ``(x0, x_{t_{k+1}})``, the teacher's DDIM state).

    ``calls`` counts network calls (one batched CFG call counts once) and ``nfe`` per-sample evaluations.
    """

    def __init__(self, teacher: Denoiser, cond, guidance_scale: float = 1.0, timesteps=None, substeps: int = 1,
                 handoff: str = "renoise"):
        check_hybrid(max(1, len(timesteps or [])), 1, substeps, handoff)
        if (substeps > 1 or handoff == "ode") and not timesteps:
            raise ValueError("hybrid teacher sub-steps > 1 and hand-off 'ode' need the student's timesteps")
        self.handoff = handoff
        self.teacher, self.cond, self.w = teacher, cond, float(guidance_scale)
        self.timesteps = [float(t) for t in (timesteps or [])]
        self.substeps = int(substeps)
        self.calls = 0
        self.nfe = 0

    def _x0(self, x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device)
        self.calls += 1
        self.nfe += 2 if uses_cfg(self.cond, self.w) else 1
        return self.teacher(x, tt, self.cond, guidance_scale=self.w)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor):   # (B, C, H, W), (B,) -> x0 or (x0, x_next)
        dev = next(self.teacher.parameters()).device
        xin, t0 = x.to(dev), float(t.flatten()[0])
        if self.substeps == 1 and self.handoff == "renoise":
            return self._x0(xin, t0).to(x.device)
        k = min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - t0))
        t_end = self.timesteps[k + 1] if k + 1 < len(self.timesteps) else 0.0
        grid = [t0 - j * (t0 - t_end) / self.substeps for j in range(self.substeps)] + [t_end]
        sched = self.teacher.schedule
        x0 = None
        for j, s in enumerate(grid[:-1]):
            x0 = self._x0(xin, s)
            # DDIM (eta = 0): keep the implied eps, move to the next grid time
            eps = sched.eps_from_x0(x0.float(), xin.float(), torch.full((xin.shape[0],), s, device=dev))
            t_next = torch.full((xin.shape[0],), grid[j + 1], device=dev)
            xin = sched.add_noise(x0, eps, t_next) if grid[j + 1] > 0 else x0
        if self.handoff == "ode":
            return x0.to(x.device), xin.to(x.device)
        return x0.to(x.device)


def teacher_steps_for(teacher: Denoiser, cond, guidance_scale: float, timesteps, substeps: int = 1,
                      handoff: str = "renoise") -> TeacherSteps:
    """Convenience constructor (moves class labels to the teacher's device)."""
    dev = next(teacher.parameters()).device
    if torch.is_tensor(cond):
        cond = cond.to(dev)
    return TeacherSteps(teacher, cond, guidance_scale, timesteps, substeps, handoff)
