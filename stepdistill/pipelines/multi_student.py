"""``MultiStudentPipeline``: a multi-student distilled model (one one-step student per class group).

Multi-student distillation (MSD; Song et al. 2024, "Multi-student Diffusion Distillation for Better
One-step Generators") partitions the conditioning space (here: the classes) into K disjoint groups
and distills one student per group. At inference every request is *routed* to the student that
owns its class; the routing table is stored with the model, so routing is total (every class maps
to exactly one student) and deterministic (it depends on the class only)::

    which = [route(c) for c in labels]                 # (B,) student per request
    noise = randn(B, C, H, W, generator)               # drawn for the whole batch, in request order
    for k in 0..K-1:                                   # one batched call per student that has requests
        rows = which == k
        out[rows] = student_chain(student_k, noise[rows], labels[rows])   # as StepDistillPipeline
    return out                                         # request order restored; last_students = names

so an image equals what its own student gives for the same starting noise, whatever else is in the batch.

Folder layout (all stock diffusers parts)::

    model_index.json      _class_name MultiStudentPipeline, unet, student_1..student_{K-1}, scheduler,
                          student_classes (the partition: class indices per student)
    unet/                 student 0 (UNet2DModel; kept as ``unet`` so tools that read unet/ still work);
                          ``transformer/`` instead for transformer students (e.g. class-conditional DiT)
    student_1/ ...        students 1..K-1 (each a UNet2DModel folder; may be smaller than the teacher)
    scheduler/            stock DDPMScheduler config
    stepdistill.json      student_timesteps, extra.students = [{name, subfolder, classes}, ...], extra.partition

Imports only diffusers, torch and the lightweight denoiser / schedules modules (no training code).
"""
from __future__ import annotations

import time

import torch

from ..partitions import routing_table  # noqa: F401 (re-exported)
from .base import StepDistillPipelineBase, image_output

from ..denoiser import Denoiser, sample_shape
from ..schedules import schedule_from_config
from .sampling import student_sample

MAX_STUDENTS = 8  # student_0 (= unet) plus the optional components student_1..student_7
PIPELINE_CLASS = "MultiStudentPipeline"


def student_subfolder(k: int) -> str:
    """Component / subfolder name of student k (student 0 lives in ``unet/``)."""
    return "unet" if k == 0 else f"student_{k}"


def student_rows(labels: torch.Tensor, table: list[int], num_students: int) -> list[tuple[int, torch.Tensor]]:
    """``[(k, rows), ...]`` in student order, for every student that owns some of ``labels`` (B,) long."""
    which = torch.as_tensor(table, device=labels.device)[labels]
    out = []
    for k in range(num_students):
        rows = (which == k).nonzero().flatten()
        if len(rows):
            out.append((k, rows))
    return out


@torch.no_grad()
def multi_student_sample(students: list[Denoiser], table: list[int], timesteps: list[float], labels: torch.Tensor,
                         noise: torch.Tensor, generator: torch.Generator | None = None,
                         first_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed sampling (module docstring): ``(x0 (B, C, H, W) in [-1, 1], which (B,) long)``.

    ``first_step(x, t) -> x0`` (hybrid sampling: a teacher takes the first step) is called once on
    the whole batch, then each student continues from its rows of that prediction. Multi-step
    students re-noise with fresh noise from ``generator`` (as :func:`student_sample`), drawn per
    student in student order.
    """
    given = None
    if first_step is not None:
        given = first_step(noise, torch.full((noise.shape[0],), float(timesteps[0]), device=noise.device))
    out = torch.empty(noise.shape, dtype=torch.float32, device=noise.device)
    which = torch.empty_like(labels)
    for k, rows in student_rows(labels, table, len(students)):
        which[rows] = k
        fs = None if given is None else (lambda x, t, g=given[rows]: g)
        out[rows] = student_sample(students[k], timesteps, labels[rows], noise[rows], generator=generator,
                                   first_step=fs).float()
    return out, which


class MultiStudentPipeline(StepDistillPipelineBase):
    """One-step (or few-step) sampling of a multi-student model: each request runs on the student that
    owns its class (:meth:`route`). Loads with ``MultiStudentPipeline.from_pretrained(folder)``;
    ``__call__`` has the signature of :class:`~stepdistill.pipelines.student.StepDistillPipeline`
    (class-conditional only: ``class_labels`` are required). After a call ``last_students`` holds the
    student name of each image (request order) and ``last_latency_s`` the sampling time.
    """

    _optional_components = ["unet", "transformer"] + [student_subfolder(k) for k in range(1, MAX_STUDENTS)]

    #: first steps a teacher may take (pipelines/hybrid.py): the first step only (re-noised hand-off)
    max_hybrid_steps: int | None = 1

    def __init__(self, unet, scheduler, student_1=None, student_2=None, student_3=None, student_4=None,
                 student_5=None, student_6=None, student_7=None, student_timesteps: list[float] | None = None,
                 class_names: list[str] | None = None, prediction_type: str | None = None,
                 student_classes: list[list[int]] | None = None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("MultiStudentPipeline needs exactly one student-0 network: unet or transformer")
        rest = [student_1, student_2, student_3, student_4, student_5, student_6, student_7]
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler,
                              **{student_subfolder(k + 1): m for k, m in enumerate(rest)})
        n = 1 + sum(1 for m in rest if m is not None)
        if any(m is None for m in rest[:n - 1]):
            raise ValueError("students must be unet, student_1, student_2, ... without gaps")
        groups = [[int(c) for c in g] for g in (student_classes or [])]
        if len(groups) != n:
            raise ValueError(f"{n} student(s) but student_classes has {len(groups)} group(s)")
        num_classes = len(class_names) if class_names else 1 + max(c for g in groups for c in g)
        self._table = routing_table(groups, num_classes)
        self.register_to_config(student_timesteps=[float(t) for t in (student_timesteps or [999.0])],
                                class_names=list(class_names or []),
                                prediction_type=prediction_type or scheduler.config.prediction_type,
                                student_classes=groups)
        self.last_latency_s: float | None = None
        self.last_students: list[str] = []

    # -- students and routing ---------------------------------------------------------------------
    @property
    def network(self):
        """Student 0: the ``unet`` component, or ``transformer`` for transformer students."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def num_students(self) -> int:
        return len(self.config.student_classes)

    @property
    def student_names(self) -> list[str]:
        return [f"student_{k}" for k in range(self.num_students)]

    def students(self) -> list:
        """The student networks in order (student 0 is ``self.network``)."""
        return [self.network] + [getattr(self, student_subfolder(k)) for k in range(1, self.num_students)]

    def denoisers(self) -> list[Denoiser]:
        sched = schedule_from_config(dict(self.scheduler.config))
        return [Denoiser(m, sched, self.config.prediction_type) for m in self.students()]

    def denoiser(self) -> Denoiser:
        """Student 0 alone (one network evaluation, e.g. for the bench's bare-forward timing)."""
        return self.denoisers()[0]

    def route(self, label) -> int:
        """The student owning ``label`` (class name or index); total over the classes, deterministic."""
        c = self.class_index(label)
        if not 0 <= c < len(self._table):
            raise ValueError(f"class index {c} out of range 0..{len(self._table) - 1}")
        return self._table[c]

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, first_step=None, hybrid_steps: int = 1) -> torch.Tensor:
        """x0 in [-1, 1] from the starting noise (B, C, H, W) and class indices ``labels`` (B,) long.
        Sets ``last_students``."""
        if hybrid_steps != 1:
            raise ValueError(f"hybrid_steps must be 1 for {type(self).__name__}: a teacher may take the first step "
                             "only (re-noised hand-off)")
        if labels is None:
            raise ValueError("MultiStudentPipeline is class-conditional: give class labels (they pick the student)")
        labels = torch.as_tensor(labels, dtype=torch.long, device=noise.device)
        for c in labels.unique().tolist():
            self.route(c)  # range check with a clear message
        x, which = multi_student_sample(self.denoisers(), self._table, self.timesteps_for(num_inference_steps),
                                        labels, noise, generator=generator, first_step=first_step)
        self.last_students = [f"student_{k}" for k in which.tolist()]
        return x

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil", return_dict: bool = True, first_step=None):
        """Sample one image per entry of ``class_labels`` (names or indices; a single one is repeated
        ``batch_size`` times), each on the student owning its class, in request order."""
        dev = self.network.device
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        if class_labels is None:
            raise ValueError("MultiStudentPipeline is class-conditional: give class_labels (they pick the student)")
        labels = self.label_tensor(class_labels, batch_size, dev)
        steps = self.timesteps_for(num_inference_steps)  # validate before drawing noise
        noise = torch.randn(len(labels), *sample_shape(self.network), generator=generator).to(dev)
        t0 = time.perf_counter()
        x = self.sample(noise, labels, len(steps), generator=generator, first_step=first_step)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)
