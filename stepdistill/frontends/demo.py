"""The demo's computation: a teacher (many steps, CFG) and its distilled student (1..K steps) side by side.
The Gradio app and the ``stepdistill demo`` command are in :mod:`stepdistill.frontends.demo_ui`.

    stepdistill demo [--teacher PATH] [--student PATH] [--host 127.0.0.1] [--port N]
    python app.py     [--teacher PATH] [--student PATH] [--port N]

Works offline: analytics off, system fonts only (no Google Fonts), no server-side rendering, and
the server listens on 127.0.0.1 unless told otherwise. Gradio is imported lazily, so importing this
module (the CLI does) does not need the optional ``demo`` extra.

:func:`generate` is the whole computation as a plain Python function (the tests call it); the UI's
Generate button wraps it and is exposed to ``gradio_client`` as ``api_name="/generate"``. Invalid
input never crashes the app: :func:`generate` raises :class:`DemoInputError` and the UI shows its
message (``gr.Error``; ``gradio_client`` raises ``AppError`` carrying the same text).

NFE (network function evaluations) reported per image batch:

* teacher: ``steps * 2`` with classifier-free guidance (``w != 1``: one conditional and one
  unconditional evaluation per step), else ``steps``;
* student: ``steps`` (guidance is distilled in);
* hybrid student (Gandikota & Bau 2025, :mod:`stepdistill.pipelines.hybrid`): the teacher takes the
  first ``n`` of the student's ``K`` steps, walking ``m`` DDIM sub-steps across each, with its own CFG
  scale ``w_h``, and hands over by ``ode`` (its DDIM state) or ``renoise`` (its x0, re-noised); so
  ``n m (2 with CFG, else 1) + (K - n)`` (:func:`stepdistill.pipelines.hybrid.hybrid_nfe`, as in
  ``stepdistill eval --hybrid-*``). The defaults (n = 1, m = 4, ``ode``, ``w_h = 1``: no CFG) are the
  best row of BENCHMARKS.md "Hybrid sampling" (diversity 0.160 vs 0.122 for the plain 4-step student).
  Phased DMD and multi-student students take ``n = 1`` with ``renoise`` only; other settings fall
  back to that, with a note in the student's summary.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..conditioning import class_index
from ..errors import StepDistillError
from ..shipped import BUILTIN_STUDENTS, BUILTIN_TEACHERS

if TYPE_CHECKING:
    from ..models import FolderInfo

DEFAULT_TEACHER = "builtin:animal_mnist"
DEFAULT_STUDENT = "builtin:animal_mnist_dmd2"
ALL_CLASSES = "(all classes)"
SAMPLERS = ("ddim", "euler", "dpm++")
from ..config import MAX_SEED  # noqa: E402  (the one seed range of every entry point)
MAX_BATCH = 16
MAX_TEACHER_STEPS = 200
MAX_GUIDANCE = 20.0
DISPLAY_SIZE = 128  # images are nearest-upscaled by an integer factor to at least this size
HYBRID_HANDOFFS = ("ode", "renoise")
MAX_HYBRID_SUBSTEPS = 50
MAX_PROMPT_CHARS = 200
# hybrid defaults: the best row of BENCHMARKS.md "Hybrid sampling" (1 unguided teacher step of 4 DDIM sub-steps, ode)
HYBRID_DEFAULTS = {"steps": 1, "substeps": 4, "handoff": "ode", "guidance_scale": 1.0}
HYBRID_CAPTION = ("Hybrid (Gandikota & Bau 2025): the teacher takes the first n student steps, m DDIM sub-steps each, "
                  "with its own guidance scale, then hands over (`ode`: its DDIM state; `renoise`: its x0 re-noised). "
                  "Defaults = the best setting in BENCHMARKS.md \"Hybrid sampling\": 1 teacher step × 4 sub-steps, `ode`, "
                  "no CFG (w = 1) raised diversity 0.122 → 0.160 at FID 71.7 vs 73.5 on the 4-step student (7 NFE); "
                  "one guided teacher x0, re-noised, *lowered* it (0.104). NFE per image = n·m·(2 with CFG, else 1) + (K − n).")


class DemoInputError(StepDistillError, ValueError):
    """Invalid demo input; the message is shown to the user as is."""


# -- model folders --------------------------------------------------------------------------------
def resolve_model_path(path_or_name: str | os.PathLike, role: str = "model") -> Path:
    """``builtin:`` names -> shipped folders; check the folder exists and holds a pipeline."""
    name = str(path_or_name or "").strip()
    if not name:
        raise DemoInputError(f"{role} folder is empty")
    builtins = {**BUILTIN_TEACHERS, **BUILTIN_STUDENTS}
    if name in builtins:
        p = Path(builtins[name])
        if not p.exists():
            hint = "`stepdistill teacher`" if name in BUILTIN_TEACHERS else "`stepdistill distill` (and export it there)"
            raise DemoInputError(f"{role} {name}: the shipped folder is missing at {p}; create it with {hint} "
                                 f"or give a model folder")
    elif name.startswith("builtin:"):
        raise DemoInputError(f"unknown builtin {role} {name!r}; known: {', '.join(sorted(builtins))}")
    else:
        p = Path(name).expanduser()
        if not p.exists():
            raise DemoInputError(f"{role} folder {name!r} does not exist")
    if not p.is_dir():
        raise DemoInputError(f"{role} path {str(p)!r} is a file; expected a diffusers pipeline folder")
    if not (p / "model_index.json").exists() and not _bare_model_folder(p):
        raise DemoInputError(f"{role} folder {str(p)!r} has no model_index.json (not a diffusers pipeline folder) "
                             f"and no unet/ (or transformer/) with scheduler/ (docs/your_teacher.md)")
    return p


def _bare_model_folder(p: Path) -> bool:
    """A stock diffusers network saved with ``save_pretrained`` beside its scheduler, without a pipeline index: a
    teacher as users bring it (docs/your_teacher.md)."""
    return any((p / sub / "config.json").exists() for sub in ("unet", "transformer")) and \
        (p / "scheduler" / "scheduler_config.json").exists()


def read_model_info(path_or_name: str | os.PathLike, role: str = "model") -> FolderInfo:
    """The folder the user named, checked for the UI (:func:`resolve_model_path`), described by the one folder
    reader (:func:`stepdistill.models.read_folder`; no weights loaded)."""
    from ..models import ModelLoadError, read_folder

    p = resolve_model_path(path_or_name, role)
    try:
        return read_folder(p)
    except ModelLoadError as e:
        raise DemoInputError(str(e)) from None


def student_supports_hybrid(info: FolderInfo) -> bool:
    """True when the student's pipeline lets a teacher take its first step (``max_hybrid_steps`` != 0)."""
    cls = _student_pipeline_class(info)
    return cls is not None and getattr(cls, "max_hybrid_steps", 0) != 0


def student_supports_hybrid_chain(info: FolderInfo) -> bool:
    """True when the student accepts any teacher steps n and the ``ode`` hand-off (``max_hybrid_steps`` None:
    StepDistillPipeline); Phased DMD and multi-student pipelines take n = 1 with ``renoise`` only."""
    cls = _student_pipeline_class(info)
    return cls is not None and getattr(cls, "max_hybrid_steps", 0) is None


def _student_pipeline_class(info: FolderInfo):
    """The pipeline class named by model_index.json among stepdistill's student pipelines."""
    from ..pipelines import student_pipeline_class

    cls = student_pipeline_class(info.pipeline_class)
    if cls is None and info.student_timesteps:
        cls = student_pipeline_class("StepDistillPipeline")
    return cls


def hybrid_compatible(teacher: FolderInfo, student: FolderInfo) -> str | None:
    """None when the teacher can take the student's first step, else why not: the one hybrid check
    (:func:`stepdistill.pipelines.hybrid.hybrid_problem`, as ``stepdistill eval --hybrid-teacher``), on what the
    folders say (no weights loaded)."""
    from ..pipelines.hybrid import hybrid_problem

    return hybrid_problem(_hybrid_side(teacher), _hybrid_side(student), _student_pipeline_class(student),
                          student.student_timesteps or [999.0])


def _hybrid_side(info: FolderInfo):
    from ..pipelines.hybrid import HybridSide

    sched = info.path / "scheduler" / "scheduler_config.json"
    return HybridSide((info.channels, info.resolution, info.resolution), info.conditioning, list(info.class_names),
                      json.loads(sched.read_text()) if sched.exists() else {})


def expert_caption(experts: list[Any] | None, class_name: str | None, class_index: int | None,
                   timesteps: list[float]) -> str | None:
    """Which student/expert produced an image, from ``extra.experts`` / ``extra.students``.

    Entries may be plain names (all listed), or dicts with ``name`` and optionally ``classes``
    (names or indices: a class-partitioned multi-student model picks the one owning the class) or
    ``timesteps`` (a phased model: every expert owning one of the sampled timesteps, in order).
    """
    if not experts:
        return None
    names = []
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            names.append(str(e))
            continue
        name = str(e.get("name", e.get("id", f"expert {i}")))
        if "classes" in e:
            owned = {str(c) for c in e["classes"]}
            if (class_name is not None and class_name in owned) or (class_index is not None and str(class_index) in owned):
                return name
            continue
        if "timesteps" in e:
            owned_t = [float(t) for t in e["timesteps"]]
            used = [t for t in timesteps if any(abs(t - o) < 1e-6 for o in owned_t)]
            if used:
                names.append(f"{name} (t={', '.join(f'{t:g}' for t in used)})")
            continue
        names.append(name)
    return " → ".join(names) if names else None


# -- loading (cached) -----------------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}
COMPILE = {"on": False}  # `stepdistill demo --compile`
_LOCK = threading.Lock()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stamp(p: Path) -> tuple:
    files = [p / "model_index.json", p / "stepdistill.json", *sorted(p.glob("*/*.safetensors")), *sorted(p.glob("*/*.bin"))]
    return tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())


def load_teacher(info: FolderInfo):
    from ..pipelines.teacher import StepDistillTeacherPipeline

    if info.conditioning == "text":  # text encoder (+ VAE) come with it; safetensors only
        from ..pipelines.loading import load_text_pipeline

        return _cached(("teacher", _stamp(info.path)), info.path, lambda: load_text_pipeline(info.path))
    if not (info.path / "model_index.json").exists():  # a bare network + scheduler (docs/your_teacher.md)
        return _cached(("teacher", _stamp(info.path)), info.path, lambda: _bare_teacher_pipeline(info.path))
    return _cached(("teacher", _stamp(info.path)), info.path,
                   lambda: StepDistillTeacherPipeline.from_folder(info.path, use_safetensors=True))  # never pickle


def _bare_teacher_pipeline(path: Path):
    """A teacher pipeline around a stock network folder (safetensors only), with the loader's metadata."""
    from diffusers import DDPMScheduler

    from ..models import load_denoiser, load_scheduler_config
    from ..pipelines.teacher import StepDistillTeacherPipeline

    den, meta = load_denoiser(path)
    scheduler = DDPMScheduler.from_config(load_scheduler_config(path, None))
    nets = {"unet": None, "transformer": den.backbone} if (path / "transformer").is_dir() else {"unet": den.backbone}
    return StepDistillTeacherPipeline(scheduler=scheduler, class_names=meta.class_names, null_class=meta.null_class,
                                      prediction_type=meta.prediction_type, **nets)


def load_student(info: FolderInfo):
    def build():
        if info.conditioning == "text":
            from ..pipelines.loading import load_text_pipeline

            return load_text_pipeline(info.path)
        cls = _student_pipeline_class(info)
        if cls is None:
            raise DemoInputError(f"{info.path}: pipeline class {info.pipeline_class!r} is not a stepdistill student")
        pipe = cls.from_pretrained(info.path, use_safetensors=True)  # the demo never unpickles weights
        if info.class_names and not pipe.config.class_names:
            pipe.register_to_config(class_names=info.class_names)
        return pipe

    return _cached(("student", _stamp(info.path)), info.path, build)


def _cached(key, path: Path, build):
    with _LOCK:
        if key not in _CACHE:
            try:
                pipe = build()
            except DemoInputError:
                raise
            except Exception as e:  # noqa: BLE001 - a broken folder is a user error here, shown in the UI
                raise DemoInputError(f"could not load the {key[0]} from {str(path)!r}: {e}") from e
            net = pipe.network if hasattr(pipe, "network") else pipe.unet  # unet, or transformer
            from ..denoiser import check_sample_shape, sample_shape

            try:  # a broken sample_size (100000) is refused before anything is allocated
                check_sample_shape(sample_shape(net), f"the {key[0]} at {path}")
            except ValueError as e:
                raise DemoInputError(str(e)) from None
            pipe.to(_device())
            net.eval()
            if COMPILE["on"]:
                net.compile()
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = pipe
        return _CACHE[key]


# -- validation -----------------------------------------------------------------------------------
def _int_in(value, name: str, lo: int, hi: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoInputError(f"{name} is empty; enter an integer in {lo}..{hi}")
    if isinstance(value, bool):
        raise DemoInputError(f"{name} must be an integer in {lo}..{hi}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be an integer in {lo}..{hi}, got {value!r}") from None
    if f != f or f != int(f):
        raise DemoInputError(f"{name} must be a whole number in {lo}..{hi}, got {value!r}")
    v = int(f)
    if not lo <= v <= hi:
        raise DemoInputError(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _float_in(value, name: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}") from None
    if f != f or not lo <= f <= hi:
        raise DemoInputError(f"{name} must be in {lo:g}..{hi:g}, got {value!r}")
    return f


def resolve_labels(info: FolderInfo, class_name, batch_size: int) -> tuple[list[str] | None, list[int] | None]:
    """(names, indices) of the batch's classes; ``ALL_CLASSES`` cycles through every class, so the batch has
    ``max(batch_size, number of classes)`` images."""
    if info.conditioning != "class":
        return None, None
    names = info.class_names
    c = "" if class_name is None else str(class_name).strip()
    if not names:
        raise DemoInputError("the model is class-conditional but lists no class names")
    if c in ("", ALL_CLASSES):  # every class, in turn: at least one image per class
        idx = [i % len(names) for i in range(max(batch_size, len(names)))]
    else:
        try:
            idx = [class_index(c, names)] * batch_size
        except ValueError as e:
            raise DemoInputError(str(e)) from None
    return [names[i] for i in idx], idx


# -- generation -----------------------------------------------------------------------------------
@dataclass
class ModelRun:
    images: list  # PIL images, upscaled
    captions: list[str]
    nfe: int
    seconds: float
    steps: int
    detail: str
    x: Any = None  # the sampled batch (B, C, H, W) in [-1, 1], before display upscaling

    @property
    def summary(self) -> str:
        return f"NFE {self.nfe} · {self.seconds:.3f} s wall-clock · {self.detail}"

    def gallery(self) -> list[tuple]:
        return list(zip(self.images, self.captions))


@dataclass
class GenerateResult:
    teacher: ModelRun
    student: ModelRun

    @property
    def status(self) -> str:
        t, s = self.teacher, self.student
        sp = t.seconds / s.seconds if s.seconds > 0 else float("inf")
        return (f"{len(s.images)} image(s) per model · student uses {s.nfe} NFE vs teacher {t.nfe} "
                f"({t.nfe / max(s.nfe, 1):.1f}x fewer) · {sp:.1f}x faster wall-clock")


def teacher_nfe(steps: int, guidance_scale: float) -> int:
    return steps * (2 if guidance_scale != 1.0 else 1)


def student_nfe(steps: int, hybrid: bool = False, guidance_scale: float = 1.0, hybrid_steps: int = 1,
                substeps: int = 1, conditioned: bool = True) -> int:
    """Student NFE per image; hybrid: ``n m (2 with CFG, else 1) + (K - n)`` (eval/hybrid.py's count)."""
    if not hybrid:
        return steps
    from ..pipelines.hybrid import hybrid_nfe

    return hybrid_nfe(steps, hybrid_steps, substeps, cfg=conditioned and guidance_scale != 1.0)


def hybrid_settings(student_steps: int, hybrid_steps, hybrid_substeps, hybrid_handoff, hybrid_guidance,
                    full_chain: bool = True) -> tuple[int, int, str, float, str | None]:
    """Validated ``(n, m, handoff, w, note)``; ``full_chain=False`` (Phased DMD / multi-student) falls
    back to n = 1 with ``renoise`` and says so in ``note``."""
    from ..pipelines.hybrid import check_hybrid

    handoff = str(hybrid_handoff or "").strip()
    n = _int_in(hybrid_steps, "hybrid teacher steps", 1, MAX_TEACHER_STEPS)   # the boxes' own limits
    m = _int_in(hybrid_substeps, "hybrid teacher sub-steps", 1, MAX_HYBRID_SUBSTEPS)
    try:
        check_hybrid(student_steps, n, m, handoff)                             # the pipelines' rule
    except ValueError as e:
        hint = "; lower the hybrid teacher steps or raise the student steps" if n > student_steps else ""
        raise DemoInputError(f"{e}{hint}") from None
    w = _float_in(hybrid_guidance, "hybrid teacher guidance scale", 0.0, MAX_GUIDANCE)
    note = None
    if not full_chain and (n != 1 or handoff != "renoise"):
        note = (f"this student (Phased DMD / multi-student) lets the teacher take 1 step with the renoise hand-off "
                f"only: ran n=1, renoise instead of n={n}, {handoff}")
        n, handoff = 1, "renoise"
    return n, m, handoff, w, note


@dataclass
class Plan:
    """A validated request: what :func:`run_student` and :func:`run_teacher` sample."""
    tinfo: FolderInfo
    sinfo: FolderInfo
    seed: int
    batch_size: int
    student_steps: int
    teacher_steps: int
    guidance_scale: float
    sampler: str
    names: list[str] | None = None     # class names of the batch (class models)
    idx: list[int] | None = None       # their indices
    prompts: list[str] | None = None   # one prompt per image (text models)
    hybrid: tuple | None = None        # (n, m, handoff, w, note)

    @property
    def captions(self) -> list[str]:
        if self.prompts is not None:
            return list(self.prompts)
        return [n or f"#{i}" for i, n in enumerate(self.names or [""] * self.batch_size)]


def plan_generation(teacher_path: str = DEFAULT_TEACHER, student_path: str = DEFAULT_STUDENT,
                    class_name: str | None = ALL_CLASSES, prompt: str = "", seed=0, batch_size=4,
                    student_steps=None, teacher_steps=50, guidance_scale=2.0, sampler: str = "ddim",
                    hybrid: bool = False, hybrid_steps=HYBRID_DEFAULTS["steps"],
                    hybrid_substeps=HYBRID_DEFAULTS["substeps"], hybrid_handoff: str = HYBRID_DEFAULTS["handoff"],
                    hybrid_guidance=HYBRID_DEFAULTS["guidance_scale"]) -> Plan:
    """Validate every input (raises :class:`DemoInputError`); nothing is loaded or sampled."""
    seed = _int_in(seed, "seed", 0, MAX_SEED)
    batch_size = _int_in(batch_size, "batch size", 1, MAX_BATCH)
    teacher_steps = _int_in(teacher_steps, "teacher steps", 1, MAX_TEACHER_STEPS)
    guidance_scale = _float_in(guidance_scale, "guidance scale", 0.0, MAX_GUIDANCE)
    if sampler not in SAMPLERS:
        raise DemoInputError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    tinfo = read_model_info(teacher_path, "teacher")
    sinfo = read_model_info(student_path, "student")
    K = sinfo.max_student_steps
    if K == 0:
        raise DemoInputError(f"student folder {str(sinfo.path)!r} is not a distilled student "
                             "(its stepdistill.json has no student_timesteps)")
    student_steps = K if student_steps in (None, "") else _int_in(student_steps, "student steps", 1, K)
    plan = Plan(tinfo, sinfo, seed, batch_size, student_steps, teacher_steps, guidance_scale, sampler)
    if (sinfo.conditioning == "text") != (tinfo.conditioning == "text"):
        raise DemoInputError(f"the teacher is {tinfo.conditioning}-conditioned but the student is "
                             f"{sinfo.conditioning}-conditioned; pick a matching pair")
    if sinfo.conditioning == "text":
        text = str(prompt or "").strip()
        if not text:
            raise DemoInputError("the prompt is empty; describe the image to generate")
        if len(text) > MAX_PROMPT_CHARS:
            raise DemoInputError(f"the prompt is {len(text)} characters long; keep it to {MAX_PROMPT_CHARS}")
        if hybrid:
            raise DemoInputError("hybrid sampling is for class-conditional students; untick Hybrid for text models")
        plan.prompts = [text] * batch_size
        return plan
    names, idx = resolve_labels(sinfo, class_name, batch_size)
    if names is not None and tinfo.conditioning == "class" and tinfo.class_names and not set(names) <= set(tinfo.class_names):
        raise DemoInputError(f"the teacher does not know class(es) {sorted(set(names) - set(tinfo.class_names))}; "
                             f"teacher classes: {', '.join(tinfo.class_names)}")
    plan.names, plan.idx = names, idx
    plan.batch_size = len(names) if names is not None else batch_size  # "(all classes)": one image per class at least
    if hybrid:
        if not student_supports_hybrid(sinfo):
            raise DemoInputError("this student pipeline does not support hybrid sampling (no first_step)")
        why = hybrid_compatible(tinfo, sinfo)
        if why:
            raise DemoInputError(f"hybrid sampling needs a compatible teacher: {why}")
        plan.hybrid = hybrid_settings(student_steps, hybrid_steps, hybrid_substeps, hybrid_handoff, hybrid_guidance,
                                      student_supports_hybrid_chain(sinfo))
    return plan


def run_teacher(plan: Plan, on_step=None) -> ModelRun:
    """The teacher's images for ``plan``; ``on_step(i, n)`` after each sampler step."""
    import torch

    teacher = load_teacher(plan.tinfo)
    _warm_up(teacher, plan, "teacher")
    with torch.inference_mode():
        if plan.prompts is not None:
            xt = teacher(plan.prompts, num_inference_steps=plan.teacher_steps, guidance_scale=plan.guidance_scale,
                         sampler=plan.sampler, seed=plan.seed, output_type="pt", on_step=on_step).images
        else:
            t_labels = (plan.names if plan.tinfo.class_names else plan.idx) if plan.tinfo.conditioning == "class" \
                else None
            xt = teacher(class_labels=t_labels, batch_size=plan.batch_size, num_inference_steps=plan.teacher_steps,
                         guidance_scale=plan.guidance_scale, sampler=plan.sampler, seed=plan.seed, output_type="pt",
                         on_step=on_step).images
    w = plan.guidance_scale
    return ModelRun(_to_pil(xt), plan.captions, teacher_nfe(plan.teacher_steps, w), float(teacher.last_latency_s),
                    plan.teacher_steps, f"{plan.teacher_steps} {plan.sampler} step(s)"
                    + (f" × 2 (CFG w={w:g})" if w != 1.0 else " (no CFG)"), x=xt)


_WARM: set = set()


def _warm_up(pipe, plan: Plan, role: str) -> None:
    """One untimed call (batch 1, one step) the first time a loaded model is used, so that its first timed call
    does not count one-off costs (allocator growth, kernel selection, lazy initialisation) and the banner's
    "x faster" compares steady-state latencies."""
    import torch

    if id(pipe) in _WARM:
        return
    # a teacher warms up on one sampler step; a student on its own chain (a phased student takes exactly K steps)
    kw = dict(num_inference_steps=1 if role == "teacher" else plan.student_steps, seed=0, output_type="pt")
    with torch.inference_mode():
        if plan.prompts is not None:
            pipe(plan.prompts[:1], **kw)
        else:
            info = plan.tinfo if role == "teacher" else plan.sinfo
            labels = (plan.names if role == "student" or info.class_names else plan.idx) \
                if info.conditioning == "class" else None
            extra = dict(guidance_scale=plan.guidance_scale, sampler=plan.sampler) if role == "teacher" else {}
            pipe(class_labels=labels[:1] if labels else None, batch_size=1, **kw, **extra)
    _WARM.add(id(pipe))


def run_student(plan: Plan) -> ModelRun:
    """The student's images for ``plan`` (independent of the teacher's run, except that hybrid sampling
    lets the teacher's network take the first step(s))."""
    import torch

    student, sinfo, K = load_student(plan.sinfo), plan.sinfo, plan.sinfo.max_student_steps
    _warm_up(student, plan, "student")
    if plan.prompts is not None:
        with torch.inference_mode():
            xs = student(plan.prompts, num_inference_steps=plan.student_steps, seed=plan.seed, output_type="pt").images
        return ModelRun(_to_pil(xs), plan.captions, student_nfe(plan.student_steps), float(student.last_latency_s),
                        plan.student_steps, f"{plan.student_steps} of {K} student step(s)", x=xs)
    used_ts = [float(v) for v in student.timesteps_for(plan.student_steps)] if hasattr(student, "timesteps_for") else []
    kw = {}
    if plan.hybrid:
        h_n, h_m, h_handoff, h_w, h_note = plan.hybrid
        kw["first_step"] = hybrid_first_step(load_teacher(plan.tinfo), plan.idx, h_w, used_ts, h_m, h_handoff)
        if h_n != 1:  # only StepDistillPipeline takes hybrid_steps (hybrid_settings enforces n = 1 otherwise)
            kw["hybrid_steps"] = h_n
    s_labels = plan.names if sinfo.conditioning == "class" else None
    with torch.inference_mode():
        xs = student(class_labels=s_labels, batch_size=plan.batch_size, num_inference_steps=plan.student_steps,
                     seed=plan.seed, output_type="pt", **kw).images
    captions = []
    for i in range(plan.batch_size):
        who = f"teacher {plan.hybrid[0]} step(s) + student" if plan.hybrid else None
        ex = expert_caption(sinfo.experts, plan.names[i] if plan.names else None, plan.idx[i] if plan.idx else None,
                            used_ts)
        captions.append(" · ".join(x for x in (plan.captions[i], ex, who) if x))
    if plan.hybrid:
        h_n, h_m, h_handoff, h_w, h_note = plan.hybrid
        conditioned = plan.tinfo.conditioning != "none"
        snfe = student_nfe(plan.student_steps, True, h_w, h_n, h_m, conditioned=conditioned)
        detail = hybrid_detail(plan.student_steps, h_n, h_m, h_handoff, h_w, conditioned)
        if h_note:
            detail += f" · ⚠️ {h_note}"
    else:
        snfe = student_nfe(plan.student_steps)
        detail = f"{plan.student_steps} of {K} student step(s)"
    return ModelRun(_to_pil(xs), captions, snfe, float(student.last_latency_s), plan.student_steps, detail, x=xs)


def generate(teacher_path: str = DEFAULT_TEACHER, student_path: str = DEFAULT_STUDENT,
             class_name: str | None = ALL_CLASSES, prompt: str = "", seed=0, batch_size=4,
             student_steps=None, teacher_steps=50, guidance_scale=2.0, sampler: str = "ddim",
             hybrid: bool = False, hybrid_steps=HYBRID_DEFAULTS["steps"], hybrid_substeps=HYBRID_DEFAULTS["substeps"],
             hybrid_handoff: str = HYBRID_DEFAULTS["handoff"],
             hybrid_guidance=HYBRID_DEFAULTS["guidance_scale"]) -> GenerateResult:
    """Sample the same seed/classes (or prompt) with the teacher and the student; raises :class:`DemoInputError`.

    ``student_steps=None`` uses all K trained student steps; ``guidance_scale`` is the teacher's CFG
    scale. ``class_name=ALL_CLASSES`` draws every class in turn, at least one image per class.
    ``hybrid``: the teacher takes the first ``hybrid_steps`` student steps with ``hybrid_substeps``
    DDIM sub-steps each, CFG scale ``hybrid_guidance`` and hand-off ``hybrid_handoff`` (``ode`` |
    ``renoise``; :mod:`stepdistill.pipelines.hybrid`). The UI runs the same two halves, showing the
    student's images first (:func:`run_student`, :func:`run_teacher`).
    """
    plan = plan_generation(teacher_path, student_path, class_name, prompt, seed, batch_size, student_steps,
                           teacher_steps, guidance_scale, sampler, hybrid, hybrid_steps, hybrid_substeps,
                           hybrid_handoff, hybrid_guidance)
    return GenerateResult(run_teacher(plan), run_student(plan))


def teacher_progress(plan: Plan, every: float = 0.25):
    """Run the teacher in a thread; yield ``"teacher: step i/n · s"`` lines while it samples, then its
    :class:`ModelRun` (an error in the thread is raised here)."""
    import time

    state = {"i": 0, "n": plan.teacher_steps}
    box: dict = {}

    def work():
        try:
            box["run"] = run_teacher(plan, on_step=lambda i, n: state.update(i=i, n=n))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    last = -1
    while th.is_alive():
        th.join(every)
        if state["i"] != last and th.is_alive():
            last = state["i"]
            yield f"teacher: step {state['i']}/{state['n']} · {time.perf_counter() - t0:.1f} s"
    if "error" in box:
        raise box["error"]
    yield box["run"]


def hybrid_detail(student_steps: int, n: int, m: int, handoff: str, w: float, conditioned: bool = True) -> str:
    """The student summary's hybrid breakdown: teacher NFE (n m, x2 with CFG) + student NFE (K - n)."""
    cfg = conditioned and w != 1.0
    tn = n * m * (2 if cfg else 1)
    return (f"hybrid: {tn} teacher NFE ({n} step(s) × {m} DDIM sub-step(s)"
            + (f" × 2, CFG w={w:g}" if cfg else ", no CFG") + f", {handoff} hand-off)"
            + f" + {student_steps - n} student NFE")


def hybrid_first_step(teacher, class_indices: list[int] | None, guidance_scale: float, timesteps=None,
                      substeps: int = 1, handoff: str = "renoise"):
    """``first_step(x, t)`` for the student pipelines: a :class:`~stepdistill.pipelines.hybrid.TeacherSteps`
    (the teacher's x0 with CFG ``guidance_scale``, ``substeps`` DDIM sub-steps across each student
    interval of ``timesteps``, hand-off ``renoise`` -> x0 | ``ode`` -> (x0, DDIM state))."""
    import torch

    from ..pipelines.hybrid import teacher_steps_for

    cond = torch.tensor(class_indices, dtype=torch.long) if class_indices is not None else None
    return teacher_steps_for(teacher.denoiser(), cond, guidance_scale, timesteps, substeps, handoff)


def _to_pil(x) -> list:
    """(B, C, H, W) in [-1, 1] -> PIL images, nearest-upscaled to at least ``DISPLAY_SIZE``."""
    from PIL import Image

    from ..utils import to_uint8

    arr = to_uint8(x)
    scale = max(1, DISPLAY_SIZE // arr.shape[1])
    out = []
    for im in arr:
        im = im[..., 0] if im.shape[-1] == 1 else im
        img = Image.fromarray(im)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        out.append(img)
    return out


# -- video: a student's frames as they are produced ----------------------------------------------------------------
MAX_STREAM_FRAMES = 64


@dataclass
class StreamedFrame:
    index: int                  # 0-based frame number
    frame: Any                  # the frame, a PIL image upscaled for display
    strip: Any                  # every frame so far side by side (PIL)
    elapsed_s: float            # since the stream started
    summary: str


def stream_video(student_path: str, prompt: str, seed=0, num_frames=None, steps=None):
    """Yield a :class:`StreamedFrame` for every frame of a video student's clip as soon as the pipeline produces it
    (``StepDistillVideoPipeline.frames``: a causal / streaming student chunk by chunk, a bidirectional one all at
    the end). Bad input raises :class:`DemoInputError` with one line."""
    import time

    import torch

    info = read_model_info(student_path, "video student")
    if info.conditioning != "text" or not info.max_student_steps:
        raise DemoInputError(f"{info.path} is not a distilled text-to-video student")
    pipe = load_student(info)
    if not hasattr(pipe, "frames") or len(getattr(pipe.unet, "sample_shape", ())) != 4:
        raise DemoInputError(f"{info.path} is not a video model (its samples are not clips)")
    if not str(prompt or "").strip():
        raise DemoInputError("give a prompt, e.g. 'a cat'")
    seed = _int_in(seed, "seed", 0, MAX_SEED)
    clip_frames = pipe.unet.sample_shape[1]
    causal = pipe.causal
    n = clip_frames if num_frames in (None, "", 0) else _int_in(num_frames, "frames", 1, MAX_STREAM_FRAMES)
    if causal is None and n != clip_frames:
        raise DemoInputError(f"this student makes whole clips of {clip_frames} frames; only a causal student streams "
                             f"other lengths")
    if causal is not None and n % causal["chunk_frames"]:
        raise DemoInputError(f"frames must be a multiple of the chunk size {causal['chunk_frames']}, got {n}")
    k = _int_in(steps if steps not in (None, "") else info.max_student_steps, "student steps", 1,
                info.max_student_steps)
    kw = {"num_frames": n} if causal is not None else {}
    t0, frames = time.perf_counter(), []
    with torch.no_grad():
        for i, f in enumerate(pipe.frames(str(prompt), num_inference_steps=k, seed=seed, **kw)):
            img = _to_pil(f[:1].float().cpu())[0]
            frames.append(img)
            elapsed = time.perf_counter() - t0
            mode = f"{causal['mode']} chunks of {causal['chunk_frames']}" if causal else "whole clip"
            yield StreamedFrame(i, img, _strip(frames), elapsed,
                                f"frame {i + 1}/{n} after {elapsed:.2f} s ({mode}, {k} step(s))")


def _strip(frames: list):
    from PIL import Image

    w, h = frames[0].size
    out = Image.new(frames[0].mode, (w * len(frames) + 2 * (len(frames) - 1), h))
    for i, f in enumerate(frames):
        out.paste(f, (i * (w + 2), 0))
    return out
