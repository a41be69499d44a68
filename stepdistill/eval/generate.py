"""Load any stepdistill model folder (teacher or distilled student) and generate image batches.

:func:`load_any` returns a :class:`TeacherModel` or a :class:`StudentModel` with one common
``generate(labels, n, steps, guidance_scale, seed, batch_size)`` method returning float
(N, C, H, W) images in [-1, 1] on the CPU. It also holds the shared evaluation helpers used by
``stepdistill eval`` and ``stepdistill report``: :func:`load_reference` (the FID reference set)
and :func:`evaluate_images` (FID / KID, domain-classifier accuracy and diversity).

Which kind a folder is: ``stepdistill.json`` with ``student_timesteps`` -> student; otherwise
``model_index.json``'s ``_class_name`` (``StepDistillPipeline`` -> student); anything else that
:func:`stepdistill.models.load_denoiser` can load (our teacher folders, ``builtin:animal_mnist``,
a bare diffusers model folder, a hub id) -> teacher.

Determinism: the starting noise x_T of sample ``i`` depends only on ``seed`` and ``i`` (all N
noise tensors are drawn up front from ``torch.Generator().manual_seed(seed)``), not on the batch
size, and teacher and student draw the *same* starting noise for the same seed and shape, so
side-by-side grids compare the two on identical noise. Multi-step students re-noise with fresh
noise from a second generator (``seed + 1``) that runs on across batches, so their images are
reproducible for a fixed ``(seed, batch_size)``. Teacher samplers (DDIM by default) are
deterministic given the starting noise.

Text-to-image teachers and students load through :func:`stepdistill.eval.text_eval.load_text_model`
(``conditioning == "text"``): an object with the same ``generate`` contract that also takes ``prompts``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError
from ..models import ModelLoadError, ModelMeta, _resolve, load_denoiser, load_scheduler_config, read_folder
from ..text import read_prompts  # noqa: F401 (re-exported: eval reads prompt files)
from ..utils import class_balanced_labels
from .model import EvalModel
from .metrics import (TextModelsNotSupported, classifier_accuracy, diversity_metric, fid_metrics, load_reference,
                      reference_info, training_dataset)

TEACHER_CLASS = "StepDistillTeacherPipeline"
DEFAULT_TEACHER_STEPS = 50
DEFAULT_GUIDANCE = 2.0



def _text_loader(path, meta, device):
    """Text-to-image teachers and students (eval/text_eval.py)."""
    from .text_eval import load_text_model

    return load_text_model(path, meta, device)


# kind ("teacher" | "student") -> loader for text-conditioned models
TEXT_LOADERS: dict[str, Callable] = {kind: _text_loader for kind in ("teacher", "student")}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _scheduler_from_config(cfg: dict):
    import diffusers

    name = cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None) or diffusers.DDPMScheduler
    return cls.from_config(cfg)


@dataclass
class _Loaded:
    folder: Path | None
    meta: ModelMeta
    den: object
    sched_cfg: dict
    allow_pickle: bool = False  # pipelines built from the folder read .bin weights only when True


class _ClassModel(EvalModel):
    """Shared parts of the teacher / student wrappers (class-conditional or unconditional networks)."""

    def __init__(self, path: str, loaded: _Loaded, device: torch.device):
        self.path = str(path)
        self.folder = loaded.folder
        self.meta = loaded.meta
        self.device = device
        self.pipe = self._build_pipeline(loaded)
        self.pipe.to(device)
        self.network.eval()
        self.last_generate_s: float | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names) if self.meta.conditioning == "class" else []

    # -- labels / noise ---------------------------------------------------------------------------
    def default_labels(self, n: int) -> torch.Tensor | None:
        """Class-balanced labels 0, 1, ..., C-1, 0, 1, ... (None for unconditional models)."""
        return class_balanced_labels(n, self.num_classes) if self.num_classes else None

    def _check_labels(self, labels, n: int | None) -> tuple[torch.Tensor | None, int]:
        if labels is None:
            if n is None or n < 1:
                raise ConfigError(f"number of samples must be >= 1, got {n}")
            return self.default_labels(n), n
        labels = torch.as_tensor(labels).long().flatten().cpu()
        if n is not None and n != len(labels):
            raise ConfigError(f"got {len(labels)} labels but n={n}")
        if not self.num_classes:
            raise ConfigError(f"{self.path} is unconditional; it takes no class labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConfigError(f"class labels must lie in 0..{self.num_classes - 1}, got {labels.min()}..{labels.max()}")
        return labels, len(labels)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """The starting noise x_T of samples 0..n-1 (CPU), identical for teacher and student."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, *self.image_shape, generator=g)

    # -- generation -------------------------------------------------------------------------------
    def _sample(self, noise, labels, steps, guidance_scale, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, labels=None, n: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, batch_size: int = 64,
                 prompts: list[str] | None = None, progress: bool = True) -> torch.Tensor:
        """``n`` samples (class-balanced by default) or one per entry of ``labels``.

        Returns float (N, C, H, W) images in [-1, 1] on the CPU; ``self.last_generate_s`` holds
        the wall time of the sampling loop (excluding label/noise preparation).
        """
        from tqdm.auto import tqdm

        if prompts is not None:
            raise TextModelsNotSupported(
                f"{self.path} is a {'class-conditional' if self.num_classes else 'unconditional'} model; "
                "prompt files need a text-conditioned model")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        steps = self.resolve_steps(steps)
        labels, n = self._check_labels(labels, n)
        noise = self.noise(n, seed)
        renoise = torch.Generator().manual_seed(int(seed) + 1)
        out = []
        t0 = time.perf_counter()
        starts = range(0, n, batch_size)
        desc = f"{self.kind} {steps} step{'s' if steps != 1 else ''}"
        for i in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
            x = noise[i:i + batch_size].to(self.device)
            y = labels[i:i + batch_size].to(self.device) if labels is not None else None
            out.append(self._sample(x, y, steps, guidance_scale, renoise).float().cpu())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.last_generate_s = time.perf_counter() - t0
        return torch.cat(out).clamp(-1, 1)

class TeacherModel(_ClassModel):
    """A many-step teacher sampled with a stock diffusers scheduler and classifier-free guidance."""

    kind = "teacher"

    def __init__(self, path, loaded, device, sampler: str = "ddim"):
        self.sampler = sampler
        super().__init__(path, loaded, device)

    def _build_pipeline(self, loaded: _Loaded):
        from ..pipelines.teacher import StepDistillTeacherPipeline

        m = loaded.meta
        return StepDistillTeacherPipeline(**_network_kwargs(loaded.den.backbone),
                                          scheduler=_scheduler_from_config(loaded.sched_cfg),
                                          class_names=m.class_names, null_class=m.null_class,
                                          prediction_type=m.prediction_type)

    def resolve_steps(self, steps):
        steps = DEFAULT_TEACHER_STEPS if steps is None else int(steps)
        if steps < 1:
            raise ConfigError(f"teacher steps must be >= 1, got {steps}")
        return steps

    def uses_cfg(self, guidance_scale: float | None) -> bool:
        gs = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        return bool(self.num_classes) and self.meta.null_class is not None and gs != 1.0

    def _sample(self, noise, labels, steps, guidance_scale, generator):
        from ..pipelines.sampling import make_scheduler, scheduler_sample

        gs = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        if not self.uses_cfg(gs):
            gs = 1.0
        sched = make_scheduler(self.sampler, dict(self.pipe.scheduler.config))
        return scheduler_sample(self.pipe.denoiser(), sched, labels, steps, gs, noise)


class StudentModel(_ClassModel):
    """A distilled one-/few-step student (guidance is distilled in; ``guidance_scale`` is ignored)."""

    kind = "student"

    def _build_pipeline(self, loaded: _Loaded):
        from ..pipelines import student_pipeline_class
        from ..pipelines.student import StepDistillPipeline

        m = loaded.meta
        name = _pipeline_class(loaded.folder) if loaded.folder is not None else None
        if name not in (None, "StepDistillPipeline") and student_pipeline_class(name) is not None:
            # several networks (Phased DMD experts, MSD students): the folder's own pipeline
            return student_pipeline_class(name).from_pretrained(loaded.folder, use_safetensors=not loaded.allow_pickle)
        return StepDistillPipeline(**_network_kwargs(loaded.den.backbone),
                                   scheduler=_scheduler_from_config(loaded.sched_cfg),
                                   student_timesteps=m.student_timesteps, class_names=m.class_names,
                                   prediction_type=m.prediction_type)

    @property
    def max_steps(self) -> int:
        return len(self.meta.student_timesteps or [999.0])

    hybrid = None  # an eval.hybrid.Hybrid: a teacher takes the first step(s) of the chain

    @property
    def min_steps(self) -> int:
        """The fewest steps the student's pipeline runs (Phased DMD: every expert once, exactly K)."""
        return next(n for n in range(1, self.max_steps + 1) if self._steps_ok(n))

    def _steps_ok(self, n: int) -> bool:
        try:
            self.pipe.timesteps_for(n)
        except ValueError:
            return False
        return True

    def resolve_steps(self, steps):
        """``steps`` checked by the student's own pipeline (``timesteps_for``): None means all of them."""
        k = self.max_steps
        steps = k if steps is None else int(steps)
        try:
            self.pipe.timesteps_for(steps)
        except ValueError as e:
            raise ConfigError(f"{e} ({self.path})") from None
        return steps

    def nfe_per_sample(self, steps=None, guidance_scale=None) -> int:
        if self.hybrid is not None:
            return self.hybrid.nfe(self.resolve_steps(steps))
        return self.resolve_steps(steps)

    def _sample(self, noise, labels, steps, guidance_scale, generator):
        if self.hybrid is not None:
            return self.hybrid.sample(self, noise, labels, steps, generator)
        return self.pipe.sample(noise, labels, steps, generator=generator)  # the pipeline's one sampling route

    def describe(self) -> dict:
        return {**super().describe(), "student_timesteps": list(self.meta.student_timesteps or []),
                "method": self.meta.method, "teacher": (self.meta.extra or {}).get("teacher")}


def _network_kwargs(backbone) -> dict:
    """``unet=...`` or ``unet=None, transformer=...`` (diffusers' component name for the backbone)."""
    from ..denoiser import component_name

    if component_name(backbone) == "transformer":
        return {"unet": None, "transformer": backbone}
    return {"unet": backbone}


def _pipeline_class(folder: Path) -> str | None:
    p = Path(folder) / "model_index.json"
    return json.loads(p.read_text()).get("_class_name") if p.is_file() else None


def _backbone_folder(p: Path) -> Path | None:
    if not p.is_dir():
        return None
    if (p / "config.json").is_file():
        return p
    for sub in ("unet", "transformer"):
        if (p / sub / "config.json").is_file():
            return p / sub
    return None


def load_any(path: str | Path, device: str | torch.device | None = None, allow_pickle: bool = False,
             sampler: str = "ddim") -> TeacherModel | StudentModel:
    """Load a teacher or student folder (see the module docstring) as a generation wrapper.

    Raises :class:`~stepdistill.models.ModelLoadError` for a missing/unsupported folder and
    :class:`TextModelsNotSupported` for text-conditioned models.
    """
    path = str(path)
    p = Path(_resolve(path))
    if not p.exists() and (path.startswith((".", "/", "~")) or len(path.split("/")) != 2):
        raise ModelLoadError(f"{path}: no such model folder")
    kind = read_folder(path).kind  # the one folder reader (models.read_folder)
    den, meta = load_denoiser(path, allow_pickle=allow_pickle)
    device = torch.device(device) if device is not None else _default_device()
    if meta.conditioning == "text":
        if kind in TEXT_LOADERS:
            return TEXT_LOADERS[kind](path, meta, device)
        raise TextModelsNotSupported(
            f"{path} is a text-conditioned {kind}; text-to-image evaluation is not implemented yet "
            "(only class-conditional and unconditional models are supported)")
    if kind == "student" and not meta.student_timesteps:
        meta.student_timesteps = json.loads((p / "model_index.json").read_text()).get("student_timesteps") or [999.0]
    loaded = _Loaded(p if p.exists() else None, meta, den, load_scheduler_config(path, _backbone_folder(p)), allow_pickle)
    if kind == "student":
        return StudentModel(path, loaded, device)
    return TeacherModel(path, loaded, device, sampler=sampler)


# -- evaluation helpers shared by `stepdistill eval` and `stepdistill report` -----------------------

def class_accuracy_of(model: str, num: int, seed: int, steps: int | None = None, batch_size: int = 64,
                      device: str | None = None) -> dict:
    """Class accuracy alone on ``num`` class-balanced samples at noise ``seed``: no reference images, so it can
    be measured on as many fresh noises as wanted without touching a held-out split (``stepdistill curve
    --acc-num``: a selection rule on class accuracy is not decided by one draw of 500 noises)."""
    m = load_any(model, device=device)
    labels = m.default_labels(num)
    if labels is None:
        return {"num": num, "seed": seed, "accuracy": None, "note": "an unconditional model has no class accuracy"}
    x = m.generate(labels, steps=m.resolve_steps(steps), seed=seed, batch_size=batch_size, progress=False)
    return {"num": num, "seed": seed, "accuracy": classifier_accuracy(x, labels, m.class_names)["class_accuracy"]}


def evaluate_model(model: str, steps: int | None = None, num: int = 1000, ref: str | None = None,
                   ref_split: str = "test", ref_num: int | None = None, guidance_scale: float = DEFAULT_GUIDANCE,
                   seed: int = 0, batch_size: int = 64, prompts: str | None = None, sampler: str = "ddim",
                   diversity_extractor: str = "auto", kid: bool = True, device: str | None = None,
                   allow_pickle: bool = False, progress: bool = True, hybrid_teacher: str | None = None,
                   hybrid_steps: int = 1, hybrid_substeps: int = 1, hybrid_handoff: str = "renoise", clip_model: str | None = None) -> dict:
    """``stepdistill eval``: sample ``num`` class-balanced images and score them.

    FID / KID against ``ref`` (default: the dataset the model was trained on, else animal_mnist),
    Animal-MNIST classifier accuracy (Animal-MNIST models at 32x32x1 only) and within-class
    diversity. Returns a JSON-serialisable dict.
    """
    if num < 2:
        raise ConfigError(f"--num must be >= 2 (FID needs at least 2 samples), got {num}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    prompt_list = read_prompts(prompts) if prompts else None
    m = load_any(model, device=device, allow_pickle=allow_pickle, sampler=sampler)
    steps = m.resolve_steps(steps)
    is_text = getattr(m, "is_text", False)
    if hybrid_teacher and is_text:
        raise ConfigError("--hybrid-teacher is not supported for text-to-image models")
    if hybrid_teacher:  # the teacher takes the first hybrid_steps steps (eval/hybrid.py)
        from .hybrid import Hybrid

        if m.kind != "student":
            raise ConfigError(f"--hybrid-teacher needs a distilled student as --model; {model} is a teacher")
        m.hybrid = Hybrid(load_any(hybrid_teacher, device=m.device, allow_pickle=allow_pickle), hybrid_steps,
                          hybrid_substeps, guidance_scale, hybrid_handoff)
        m.hybrid.check(m, steps)
    if is_text:  # text-to-image: prompts (default: its caption set), CLIP score (text_eval.py)
        from .text_eval import evaluate_text

        return evaluate_text(m, prompt_list, num, steps, guidance_scale, seed, batch_size, ref, ref_split, ref_num,
                             clip_model, diversity_extractor, kid, progress)
    if clip_model:
        raise ConfigError(f"--clip-model needs a text-to-image model; {model} is class-conditional or unconditional")
    if prompt_list is not None:  # class / unconditional models take no prompts: generate() explains
        m.generate(n=num, steps=steps, prompts=prompt_list, progress=False)
    ds_name, _ = training_dataset(m)
    ref_name = ref or ds_name or "animal_mnist"
    ref_images, ref_labels, cache_key = load_reference(ref_name, m.resolution, m.channels, ref_split, ref_num)
    labels = m.default_labels(num)
    x = m.generate(labels, n=None if labels is not None else num, steps=steps, guidance_scale=guidance_scale,
                   seed=seed, batch_size=batch_size, progress=progress)
    gen_s = m.last_generate_s
    out = {"model": str(model), "kind": m.kind, "steps": steps,
           "nfe_per_sample": m.nfe_per_sample(steps, guidance_scale), "num": num, "seed": seed,
           "batch_size": batch_size, "image_shape": list(m.image_shape)}
    if getattr(m, "hybrid", None) is not None:
        out["hybrid"] = m.hybrid.describe(steps)
    if m.kind == "teacher":
        out.update(guidance_scale=guidance_scale if m.uses_cfg(guidance_scale) else 1.0, sampler=m.sampler)
    out["reference"] = reference_info(ref_name, ref_split, m.resolution, ref_images, cache_key)
    same_classes = labels is not None and ref_labels is not None and ref_name in ("animal_mnist", "digits")
    out.update(fid_metrics(x, ref_images, cache_key, kid=kid, labels=labels if same_classes else None,
                           ref_labels=ref_labels if same_classes else None, class_names=m.class_names))
    out.update(classifier_accuracy(x, labels, m.class_names))
    out.update(diversity_metric(x, labels, diversity_extractor))
    out.update(generate_seconds=gen_s, latency_per_image_s=gen_s / num, device=str(m.device))
    return out
