"""Building, saving and loading backbones as diffusers folders (safetensors only by default).

A stepdistill model folder is a diffusers pipeline folder::

    model_index.json            pipeline class + components
    unet/ (or transformer/)     config.json + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json (stock diffusers scheduler)
    stepdistill.json            conditioning metadata: class names, null class, prediction type,
                                student timesteps (for distilled students)

Loading also accepts a bare diffusers *model* folder (config.json + weights), a pipeline folder
made by diffusers itself, or a hub id (``from_pretrained``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TeacherModelConfig
from .denoiser import BACKBONE_KINDS, Denoiser, component_name
from .schedules import NoiseSchedule, schedule_from_config
from .shipped import missing_folder_hint, resolve_shipped
WEIGHT_SAFE = "diffusion_pytorch_model.safetensors"
WEIGHT_PICKLE = "diffusion_pytorch_model.bin"
BACKBONE_SUBFOLDERS = ("unet", "transformer")


from .errors import ModelLoadError  # noqa: E402,F401  (re-exported)


@dataclass
class ModelMeta:
    """What a Denoiser needs beyond the network: saved as ``stepdistill.json``."""
    prediction_type: str = "epsilon"
    conditioning: str = "class"           # none | class | text
    class_names: list[str] = field(default_factory=list)
    null_class: int | None = None
    student_timesteps: list[float] | None = None  # set for distilled students
    method: str | None = None
    extra: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (Path(folder) / "stepdistill.json").write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "ModelMeta | None":
        p = Path(folder) / "stepdistill.json"
        if not p.exists():
            return None
        return cls(**json.loads(p.read_text()))


def build_teacher_unet(cfg: TeacherModelConfig, num_classes: int, channels: int, resolution: int):
    """A class-conditional diffusers UNet2DModel; label ``num_classes`` is the null (CFG) class."""
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim, num_class_embeds=num_classes + 1,
    )


def build_scheduler(cfg: TeacherModelConfig):
    """The stock diffusers scheduler stored with the model (DDPM family, our VP schedule reads it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def _resolve(path_or_id: str, allow_pickle: bool = False) -> str | Path:
    """A builtin name, a local folder, or a hub id (``owner/name``, fetched into / read from the hub cache,
    so ``HF_HUB_OFFLINE=1`` works with a cached snapshot) -> a local path. A missing local path says so."""
    if str(path_or_id).startswith("builtin:"):
        return resolve_shipped(path_or_id)
    if Path(path_or_id).exists():
        return path_or_id
    if _looks_like_hub_id(path_or_id):
        return hub_snapshot(path_or_id, allow_pickle)
    raise ModelLoadError(f"{path_or_id}: no such folder (and not a hub id of the form owner/name); "
                         f"{missing_folder_hint(path_or_id)}")


#: what a model folder needs from a hub repo: configs, the scheduler, the backbone's full-precision weights
HUB_PATTERNS = ["*.json", "*.txt", "*.md", "scheduler/*"] + [
    f"{sub}{w}" for sub in ("", "unet/", "transformer/")
    for w in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*.safetensors")]


def hub_snapshot(repo_id: str, allow_pickle: bool = False) -> Path:
    """The local snapshot folder of a hub model (downloaded once into the hub cache; offline: the cache)."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + ([p.replace(".safetensors", ".bin") for p in HUB_PATTERNS if p.endswith(".safetensors")]
                               if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline without a cached snapshot, unknown repo, no network ...
        first = repo_id.split("/")[0]
        local = (f"there is no local folder {repo_id!r} either (and {first!r} " +
                 ("exists here: a typo in the folder name?); " if Path(first).exists() else "does not exist here); "))
        raise ModelLoadError(f"{repo_id}: {local}as a Hugging Face hub id it could not be fetched or found in the "
                             f"cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Check the path, or the id and "
                             f"your network") from None


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights exist; pickle weights only with ``allow_pickle``."""
    if (folder / WEIGHT_SAFE).exists() or any(folder.glob("*.safetensors")):
        return True
    if (folder / WEIGHT_PICKLE).exists() or any(folder.glob("*.bin")):
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} only has pickle (.bin) weights, which can run arbitrary code when loaded; "
                "convert them to safetensors or pass allow_pickle=True (--allow-pickle) if you trust the source")
        return False
    raise ModelLoadError(f"{folder} has a config.json but no weights ({WEIGHT_SAFE})")


def load_backbone(path_or_id: str | Path, allow_pickle: bool = False, subfolder: str | None = None):
    """Load a supported diffusers backbone. Returns (model, model_folder_or_None)."""
    import diffusers

    p = Path(_resolve(str(path_or_id), allow_pickle))
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; expected a diffusers folder")
        folder = p / subfolder if subfolder else p
        if not (folder / "config.json").exists():
            for sub in BACKBONE_SUBFOLDERS:
                if (p / sub / "config.json").exists():
                    folder = p / sub
                    break
            else:
                raise ModelLoadError(f"{p} is not a diffusers model folder (no config.json, unet/ or transformer/)")
        config = json.loads((folder / "config.json").read_text())
        cls_name = config.get("_class_name")
        if cls_name == "custom":  # a user's own nn.Module (save_model_folder): its class, init kwargs, weights
            return load_custom_backbone(folder, config), folder
        if cls_name not in BACKBONE_KINDS:
            raise ModelLoadError(
                f"{folder}: model class {cls_name!r} is not supported; supported: {', '.join(BACKBONE_KINDS)}")
        safe = _check_weights(folder, allow_pickle)
        cls = getattr(diffusers, cls_name)
        model = cls.from_pretrained(folder, use_safetensors=safe)
        if BACKBONE_KINDS[cls_name] == "wan":  # a video clip's shape is not in Wan's config
            from .video_models import attach_sample_shape

            attach_sample_shape(model, folder)
        return model, folder
    raise ModelLoadError(f"{path_or_id}: no such folder (and not a hub id of the form owner/name); "
                         f"{missing_folder_hint(path_or_id)}")


def load_custom_backbone(folder: Path, config: dict):
    """A custom ``nn.Module`` saved by :func:`save_model_folder`: ``config.json`` names its class
    (``module.path.ClassName``, importable where it is loaded: the user's installed package) and the keyword
    arguments it was built with (the module's ``init_kwargs`` attribute); ``model.safetensors`` holds its weights.
    Only an ``nn.Module`` subclass is ever called, with JSON values, and weights are safetensors only."""
    import importlib

    from safetensors.torch import load_file

    target = str(config.get("module", ""))
    mod_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError, ValueError):
        raise ModelLoadError(f"{folder}: its network class {target!r} cannot be imported here; install the package "
                             f"that defines it (docs/your_teacher.md)") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelLoadError(f"{folder}: {target!r} is not a torch.nn.Module class; refusing to call it")
    init = config.get("init") or {}
    if not isinstance(init, dict):
        raise ModelLoadError(f"{folder}: config.json 'init' must be a mapping of keyword arguments")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelLoadError(f"{folder}: no model.safetensors beside config.json")
    if not (hasattr(cls, "device") and hasattr(cls, "dtype")):  # what diffusers pipelines ask of a network
        cls = type(cls.__name__, (cls,), {"device": property(lambda m: next(m.parameters()).device),
                                          "dtype": property(lambda m: next(m.parameters()).dtype),
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    net = cls(**init)
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


def load_scheduler_config(path_or_id: str | Path, model_folder: Path | None) -> dict:
    p = Path(_resolve(str(path_or_id)))
    for cand in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json",
                 (model_folder.parent / "scheduler" / "scheduler_config.json") if model_folder else None):
        if cand is not None and cand.exists():
            return json.loads(cand.read_text())
    raise ModelLoadError(
        f"{p}: no scheduler/scheduler_config.json, so the noise schedule the model was trained with is unknown. Save "
        f"the training scheduler beside the network, e.g. DDPMScheduler(num_train_timesteps=1000, beta_schedule="
        f"'linear', prediction_type='epsilon').save_pretrained('{p}/scheduler') with your training values "
        f"(docs/your_teacher.md)")


def load_meta(path_or_id: str | Path, allow_pickle: bool = False) -> ModelMeta | None:
    """A model's ``stepdistill.json`` without loading its weights: None for a folder without one, or a source that
    cannot be reached here (a hub id offline, a moved folder)."""
    try:
        root = Path(_resolve(str(path_or_id), allow_pickle))
    except Exception:  # noqa: BLE001 - not a folder we can read: no metadata
        return None
    return ModelMeta.load(root)


def meta_extra(path_or_id: str | Path, allow_pickle: bool = False) -> dict:
    """A model's ``stepdistill.json`` ``extra`` section ({} for a folder without one or an unreachable source): the
    records that tools leave there (``pruned``, ``grown``) are read from it."""
    m = load_meta(path_or_id, allow_pickle)
    return dict(m.extra or {}) if m is not None else {}


def load_denoiser(path_or_id: str | Path, allow_pickle: bool = False) -> tuple[Denoiser, ModelMeta]:
    """Teacher (or student) as a :class:`Denoiser` plus its metadata."""
    backbone, folder = load_backbone(path_or_id, allow_pickle)
    sched_cfg = load_scheduler_config(path_or_id, folder)
    schedule: NoiseSchedule = schedule_from_config(sched_cfg)
    root = Path(_resolve(str(path_or_id), allow_pickle))
    meta = ModelMeta.load(root) if root.exists() else None
    if meta is None:
        pt = sched_cfg.get("prediction_type", "epsilon")
        if "FlowMatch" in sched_cfg.get("_class_name", ""):
            pt = "flow_prediction"
        c, kind = backbone.config, BACKBONE_KINDS.get(type(backbone).__name__)
        if kind == "dit":
            # DiT: num_embeds_ada_norm real classes; the CFG null label is the extra entry == num_classes
            n_real = getattr(c, "num_embeds_ada_norm", None)
        else:
            # UNet: stepdistill's convention, num_class_embeds = classes + 1 (the last is the null class).
            # (PixArt's num_embeds_ada_norm counts timesteps, not classes.)
            n_cls = getattr(c, "num_class_embeds", None)
            n_real = n_cls - 1 if n_cls else None
        text = any(getattr(c, k, None) for k in ("cross_attention_dim", "joint_attention_dim", "caption_channels"))
        cond = "class" if n_real else ("text" if text else "none")
        meta = ModelMeta(prediction_type=pt, conditioning=cond,
                         class_names=[str(i) for i in range(n_real)] if cond == "class" else [],
                         null_class=n_real if cond == "class" else None)
    den = Denoiser(backbone, schedule, meta.prediction_type, null_class=meta.null_class)
    return den, meta


def backbone_subfolder(backbone) -> str:
    """diffusers' component name of ``backbone``: the adapter's :func:`~stepdistill.denoiser.component_name`."""
    return component_name(backbone)


#: the pipelines of distilled students (what ``kind == "student"`` means for a folder without student timesteps)
STUDENT_PIPELINES = ("StepDistillPipeline", "PhasedDMDPipeline", "MultiStudentPipeline", "StepDistillTextPipeline")


@dataclass
class FolderInfo:
    """What a model folder holds, read from its json files (no weights loaded): the one reader behind the
    CLI, eval, the text path and the demo."""
    path: Path
    pipeline_class: str | None = None
    conditioning: str = "class"  # none | class | text
    declared_conditioning: str | None = None  # stepdistill.json's own word, None for a stock folder
    class_names: list[str] = field(default_factory=list)
    student_timesteps: list[float] | None = None
    method: str | None = None
    experts: list | None = None  # stepdistill.json extra.experts / extra.students, when present
    channels: int | None = None
    resolution: int | None = None

    @property
    def kind(self) -> str:
        """``"student"`` (distilled: student timesteps or a student pipeline) or ``"teacher"``."""
        return "student" if self.student_timesteps or self.pipeline_class in STUDENT_PIPELINES else "teacher"

    @property
    def is_text(self) -> bool:
        """A text-to-image model by its own ``stepdistill.json`` (``conditioning: text``)."""
        return self.declared_conditioning == "text"

    @property
    def max_student_steps(self) -> int:
        return len(self.student_timesteps or [])


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: invalid JSON ({e})") from e


def read_folder(path: str | Path) -> FolderInfo:
    """:class:`FolderInfo` of a local model folder (``builtin:`` names and cached hub ids resolved); a stock folder
    without ``stepdistill.json`` is described from its network's config (class embeddings: classes named by index;
    cross-attention: text)."""
    p = Path(_resolve(str(path)))
    index, meta = _read_json(p / "model_index.json"), _read_json(p / "stepdistill.json")
    net = next((_read_json(p / sub / "config.json") for sub in ("unet", "transformer")
                if (p / sub / "config.json").is_file()), {})
    extra = meta.get("extra") or {}
    experts = extra.get("experts") or extra.get("students") or None
    cond = meta.get("conditioning")
    if cond is None:
        cond = "class" if net.get("num_class_embeds") else ("text" if net.get("cross_attention_dim") else "none")
    names = meta.get("class_names") or index.get("class_names") or []
    if not names and not meta and net.get("num_class_embeds"):  # a stock folder: classes + the null class
        names = [str(i) for i in range(int(net["num_class_embeds"]) - 1)]
    ts = meta.get("student_timesteps") or index.get("student_timesteps")
    res = net.get("sample_size")
    return FolderInfo(path=p, pipeline_class=index.get("_class_name"), conditioning=cond,
                      declared_conditioning=meta.get("conditioning"), class_names=list(names),
                      student_timesteps=[float(t) for t in ts] if ts else None, method=meta.get("method"),
                      experts=list(experts) if experts else None, channels=net.get("in_channels"),
                      resolution=res[0] if isinstance(res, (list, tuple)) else res)


def save_component(path: Path, part) -> list:
    """Write one pipeline component into ``path``: a diffusers / transformers model (safetensors), a tokenizer, or a
    custom ``nn.Module`` (weights + the class name and init kwargs, never pickled code: see
    :func:`load_custom_backbone`). Returns its ``model_index.json`` entry ``[library, class name]``."""
    library = type(part).__module__.split(".")[0]
    library = library if library in ("diffusers", "transformers") else "diffusers"
    if isinstance(part, torch.nn.Module) and hasattr(part, "save_pretrained"):
        part.save_pretrained(path, safe_serialization=True)
    elif hasattr(part, "save_pretrained"):  # tokenizers, schedulers
        part.save_pretrained(path)
    else:  # a custom nn.Module
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in part.state_dict().items()},
                  str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(
            {"_class_name": "custom", "module": f"{type(part).__module__}.{type(part).__qualname__}",
             "init": dict(getattr(part, "init_kwargs", {}) or {})}))  # models.load_custom_backbone
    return [library, type(part).__name__]


def save_model_folder(folder: str | Path, backbone, scheduler, meta: ModelMeta, pipeline_class: str,
                      parts: dict | None = None, index_extra: dict | None = None) -> Path:
    """Write a diffusers pipeline folder (safetensors weights, scheduler, model_index.json), every file once.

    ``parts``: more components beside the backbone, ``{subfolder: component}`` (a text encoder and its tokenizer, a
    VAE, Phased DMD's experts, MSD's students), each listed in ``model_index.json``; ``index_extra``: more
    ``model_index.json`` entries (a pipeline's own keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sub = backbone_subfolder(backbone)
    entry = save_component(folder / sub, backbone)
    scheduler.save_pretrained(folder / "scheduler")
    meta.save(folder)
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": __import__("diffusers").__version__,
        sub: ["diffusers", entry[1]],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    for name, part in (parts or {}).items():
        index[name] = save_component(folder / name, part)
    index.update(index_extra or {})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def count_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
