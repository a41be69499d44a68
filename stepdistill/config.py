"""Typed configs: dataclasses loaded from YAML, with dotted ``a.b=c`` command-line overrides.

Unknown keys and values of the wrong type fail with a :class:`ConfigError` naming the key::

    cfg = load_config(DistillConfig, "configs/dmd2_animal.yaml", ["train.max_steps=200"])
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


from .errors import ConfigError  # noqa: F401  (re-exported: stepdistill.config.ConfigError)
from .recipe import ScheduleEntry, check_schedule

#: the one seed range of every entry point (train.seed, every --seed, the demo's seed box): 0..2**31-1, exact in
#: JSON and in a browser's number field
MAX_SEED = 2**31 - 1


@dataclass
class DataConfig:
    name: str = "animal_mnist"      # animal_mnist | digits | path to an image folder
    resolution: int = 32
    channels: int = 1
    split: str = "train"
    frames: int = 8                # video datasets (moving_animal_mnist): frames per clip


@dataclass
class TextConfig:
    """Text conditioning (stepdistill/text.py): captions ``template.format(name=class name)`` for every class and
    template, encoded once with a frozen text encoder (token embeddings, padded to ``max_length``)."""
    encoder: str = "minilm"        # teacher training: minilm (the shipped MiniLM) | folder | hub id; distill: the teacher's
    max_length: int = 0            # tokens per prompt (padded / truncated); 0: 16 (teacher training) | the teacher's
    templates: list[str] = field(default_factory=list)  # [] = stepdistill.text.CAPTION_TEMPLATES
    prompts: str = ""              # distill: "" = the teacher's caption set (GAN real branch aligned); or a prompt file


@dataclass
class VideoModelConfig:
    """A video teacher's ``WanTransformer3DModel`` (diffusers; Wan 2.1's architecture at a tiny size)."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])   # (frames, height, width) per token
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    ffn_dim: int = 256
    num_layers: int = 4
    freq_dim: int = 64             # sinusoidal timestep embedding width
    shift: float = 1.0             # flow-matching sigma shift of the scheduler


@dataclass
class TeacherModelConfig:
    """A class-conditional diffusers UNet2DModel (null class = num_classes, for CFG)."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = 16
    attention_head_dim: int = 32
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    conditioning: str = "class"    # class: UNet2DModel + class labels | text: UNet2DConditionModel + captions (text:)
    family: str = "unet"           # unet | wan (a video WanTransformer3DModel: text conditioning, flow matching)
    video: VideoModelConfig = field(default_factory=lambda: VideoModelConfig())  # model.family: wan


@dataclass
class OptimConfig:
    """AdamW settings of one trained network: the one optimizer section of every config (``optim`` of the
    teacher, ``dmd.optim`` / ``dmd.critic_optim`` of the DMD family, ``pso.optim``)."""
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0          # linear learning-rate warm-up over the first N updates
    grad_clip: float = 1.0         # global gradient-norm clip (0 = off)


def dmd2_optim() -> OptimConfig:
    """DMD2's AdamW: beta1 = 0 (GAN practice), weight decay 0.01, clip 10 (Yin et al. 2024, their code)."""
    return OptimConfig(lr=2e-5, beta1=0.0, beta2=0.999, weight_decay=0.01, warmup_steps=0, grad_clip=10.0)


REPORT_TO = ("none", "tensorboard", "wandb")   # train.report_to (trainers/tracking.py)
ATTENTION = ("sdpa", "math", "xformers")       # train.attention (attention.py)


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    max_steps: int = 1000          # steps of the main player (teacher / generator)
    ema_decay: float = 0.999
    log_every: int = 10
    sample_every: int = 250
    checkpoint_every: int = 250
    mixed_precision: str = "no"    # no | bf16 (autocast; fp16 needs loss scaling and is not offered)
    cpu: bool = False              # force CPU (also makes 2-process CPU runs use gloo)
    num_workers: int = 0
    threads: int = 0               # torch.set_num_threads when > 0
    gradient_checkpointing: bool = False  # diffusers activation checkpointing in trainable players' backbones
    guard_every: int = 0           # collapse / over-saturation guard every N steps (0 = off; trainers/guards.py)
    guard_min_diversity: float = 0.05   # trip when same-condition sample diversity (x data std) falls below
    guard_max_saturation: float = 0.5   # trip when the fraction of pixels with |x| > 0.98 exceeds
    guard_max_collapsed: float = 0.25  # video: trip when more of the grid's clips are static or solid-colour
    guard_action: str = "warn"     # warn | stop (stop: checkpoint, then raise CollapseError)
    nonfinite_tolerance: float = 1e-3  # stop when a step's NaN/inf score fraction (*_nonfinite_frac) exceeds it
    fsdp: bool = False             # shard players + EMA over the processes (FSDP2; trainers/fsdp.py)
    fsdp_shard_teacher: bool = False  # with fsdp: shard the frozen teacher backbone too
    report_to: str = "none"        # none | tensorboard | wandb: an experiment tracker (trainers/tracking.py)
    attention: str = "sdpa"        # sdpa | math | xformers: diffusers attention backend of every network (attention.py)
    memory_budget_gib: str = ""    # distill: "" (off) | N | auto: the planner picks the cheapest setting that fits
                                   # (bf16 teacher, checkpointing, offload, FSDP, LoRA rank; profiling/budget.py)


@dataclass
class FinetuneConfig:
    """``stepdistill teacher`` starting from a trained model instead of random weights (trainers/teacher_finetune.py):
    a full fine-tune, or with ``lora_rank > 0`` a LoRA adapter on the frozen model (a "style" LoRA that stacks on a
    distilled LoRA), on all of the data or a class-restricted / transformed part of it."""
    init: str = ""                 # "" = train from scratch (model:); a model folder / hub id / builtin: to start from
    lora_rank: int = 0             # > 0 (needs init): train a LoRA adapter on the frozen init; export merged + lora/
    lora_alpha: float = 0.0        # LoRA scale alpha / rank; 0 means alpha = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    classes: list[str] = field(default_factory=list)   # train on these classes only (names or indices); [] = all
    transform: str = "none"        # none | invert | bold: applied to the training images (the "style")


@dataclass
class TeacherConfig:
    output_dir: str = "runs/teacher"
    data: DataConfig = field(default_factory=DataConfig)
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)  # model.conditioning: text
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # start from a trained model (LoRA: a style)
    cfg_dropout: float = 0.1       # probability of replacing the label by the null class
    sample_steps: int = 25         # sampler steps for the periodic sample grids
    guidance_scale: float = 2.0


@dataclass
class SharedDistillConfig:
    """The ``dmd:`` section's fields that every distill method reads: the teacher, the student's timesteps, the
    generator's optimizer, LoRA and the teacher's memory options. A method's own options extend it (DMD's
    :class:`~stepdistill.trainers.dmd.DMDConfig`: critic, GAN, regression, ...) or live in a section of their own
    (``phased``, ``msd``, ``pso``, ``rcm``), declared by the method (:attr:`stepdistill.methods.Method.sections`).
    The section keeps its name ``dmd`` so that every earlier config and checkpoint still loads."""
    teacher: str = "builtin:animal_mnist"  # diffusers folder, hub id, or builtin:animal_mnist
    allow_pickle: bool = False
    allow_student_teacher: bool = False  # a distilled student as dmd.teacher is refused unless this is set
    student_timesteps: list[float] = field(default_factory=lambda: [999.0])  # one-step default
    student_init: str = ""         # a trained student (folder / builtin:) to start the generator from; "" = the teacher
    real_guidance_scale: float = 2.0
    optim: OptimConfig = field(default_factory=dmd2_optim)         # the generator (student, experts)
    lora_rank: int = 0             # > 0: student, critic = LoRA adapters on the frozen teacher (stepdistill/lora.py)
    lora_alpha: float = 0.0        # LoRA scale alpha / rank; 0 means alpha = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    teacher_dtype: str = "float32"  # float32 | bfloat16 (teacher weights; outputs are cast back to float32)
    offload_teacher: bool = False  # keep the teacher on the CPU, move it to the accelerator for its forward only


@dataclass
class DistillConfig:
    """A distill run's config: the sections every method shares. ``load_config(DistillConfig, ...)`` returns an
    instance of :func:`distill_config_class` ``(method)``, this class plus the sections the method declares."""
    output_dir: str = "runs/dmd2"
    method: str = "dmd2"           # a registered method (stepdistill.methods): dmd | dmd2 | phased_dmd | msd | pso | ...
    data: DataConfig = field(default_factory=DataConfig)
    dmd: SharedDistillConfig = field(default_factory=SharedDistillConfig)
    text: TextConfig = field(default_factory=TextConfig)  # text teachers: the prompt set to distill on
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, max_steps=300, ema_decay=0.95,
                                                                   sample_every=50, checkpoint_every=50))
    schedule: list[ScheduleEntry] = field(default_factory=list)  # settings that change at given steps (recipe.py)


_CLASSES: dict[tuple, type] = {}


def distill_config_class(method: str) -> type:
    """:class:`DistillConfig` with the config sections of ``method`` (:attr:`stepdistill.methods.Method.sections`,
    e.g. ``{"dmd": DMDConfig, "phased": PhasedConfig}``): a ``dmd`` entry retypes the shared section with the
    method's extension of it, other entries add sections. One class per method and set of sections."""
    from .methods import method_sections

    sections = method_sections(method)
    if not sections:
        return DistillConfig
    key = (method, tuple((k, v) for k, v in sections.items()))
    if key not in _CLASSES:
        fields = [(name, tp, field(default_factory=tp)) for name, tp in sections.items()]
        _CLASSES[key] = dataclasses.make_dataclass(f"DistillConfig_{method}", fields, bases=(DistillConfig,))
    return _CLASSES[key]


def distill_defaults(method: str = "dmd2"):
    """The default config of ``method`` (every section at its defaults)."""
    return distill_config_class(method)(method=method)


# -- loading / overriding ------------------------------------------------------------------
def _parse(text: str, key: str):
    """YAML-parse an override's raw text; a syntax error names the key."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse {text!r} ({type(e).__name__})") from None


def _short(value, limit: int = 120) -> str:
    """``repr(value)`` clipped: a YAML alias bomb's value must not become a megabyte error line (nor be built
    as one: nested containers are described by their length)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 20:
        return f"<a {type(value).__name__} of {len(value)} items>"
    r = repr(value) if not isinstance(value, (list, tuple, dict)) else reprlib_repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def reprlib_repr(value) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring = 3, 8, 8, 60
    return r.repr(value)


def _budget_ok(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("", "auto", "0", "none", "off"):
        return True
    try:
        return float(v) > 0
    except ValueError:
        return False


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is dict:
        if isinstance(value, str):
            value = _parse(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = _parse(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _parse(value, key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {_short(value)}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {_short(value)}")
        try:
            v = _parse(value, key) if isinstance(value, str) else value
            if isinstance(v, bool):
                raise ValueError
            if tp is int and (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return tp(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {_short(value)}") from None
    if tp is str:
        if isinstance(value, str):
            # overrides arrive as raw text: drop YAML quoting ('no' -> no) but never let YAML turn
            # words like no / off / 2024-01-01 into bools or dates
            try:
                parsed = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                parsed = value
            return parsed if isinstance(parsed, str) else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a string, got {_short(value)} (quote it in YAML, e.g. 'no')")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    d[parts[-1]] = value


#: keys of earlier releases -> the keys that replaced them; configs, run folders and checkpoints written with
#: the old spelling still load (the optimizer keys of the ``dmd`` and ``pso`` sections became ``OptimConfig``s)
_OPTIM_KEYS = ("beta1", "beta2", "weight_decay", "grad_clip", "warmup_steps")
LEGACY_KEYS: dict[type, dict[str, tuple[str, ...]]] = {
    DistillConfig: {
        "dmd.student_lr": ("dmd.optim.lr",), "dmd.critic_lr": ("dmd.critic_optim.lr",),
        **{f"dmd.{k}": (f"dmd.optim.{k}", f"dmd.critic_optim.{k}") for k in _OPTIM_KEYS},
        **{f"pso.{k}": (f"pso.optim.{k}",) for k in ("lr", "weight_decay", "grad_clip", "warmup_steps")},
    },
}


def _legacy(cls) -> dict[str, tuple[str, ...]]:
    """:data:`LEGACY_KEYS` of ``cls`` or of the class it extends (a method's :func:`distill_config_class`)."""
    for c in getattr(cls, "__mro__", (cls,)):
        if c in LEGACY_KEYS:
            return LEGACY_KEYS[c]
    return {}


def upgrade_keys(cls, data: dict) -> dict:
    """``data`` (a nested config mapping) with the old spellings of :data:`LEGACY_KEYS` renamed; where both
    spellings are given, the new key wins. A copy: ``data`` is not changed."""
    import copy

    out = copy.deepcopy(data)
    for old, targets in _legacy(cls).items():
        section, key = old.split(".")
        sec = out.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec.pop(key)
        for target in targets:
            _, sub, leaf = target.split(".")
            dest = sec.setdefault(sub, {})
            if isinstance(dest, dict):
                dest.setdefault(leaf, value)
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults <- YAML file <- ``key.sub=value`` overrides; validated into ``cls``. Old key spellings
    (:data:`LEGACY_KEYS`, e.g. ``dmd.student_lr`` for ``dmd.optim.lr``) are accepted. ``cls=DistillConfig``
    gives the class of the config's ``method`` (:func:`distill_config_class`): its own sections; keys of other
    methods' sections are ignored (:func:`drop_foreign_keys`: a warning names any set away from its default)."""
    loaded = upgrade_keys(cls, read_yaml_chain(Path(path))) if path else {}  # None or "" means defaults only
    pairs = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value")
        k, v = o.split("=", 1)
        pairs.append((k.strip(), v))
    if cls is DistillConfig:
        cls = distill_config_class(_method_of(loaded, pairs))
    data = to_dict(cls())
    _merge(data, loaded, "")
    for k, v in pairs:
        # keep the raw text: _coerce parses it by the field's type (YAML would read `no` as False)
        for key in _legacy(cls).get(k, (k,)):
            _set_dotted(data, key, v)
    if issubclass(cls, DistillConfig):
        drop_foreign_keys(cls, data)
    try:
        cfg = _build(cls, data)
        normalise(cfg)
        validate(cfg)
        if path:  # not a field: the file a run reads, which --overwrite must never delete (outputs.run_inputs)
            cfg.source_path = str(path)
    except ConfigError as e:  # a bad value given under an old spelling: name the key as the user wrote it
        msg = str(e)
        for old, targets in _legacy(cls).items():
            hit = next((t for t in targets if msg.startswith(t + ":")), None)
            if hit and _mentions(path, overrides, old):
                raise ConfigError(f"{msg} (given as {old}, the old spelling of {hit})") from None
        raise
    return cfg


def _method_of(loaded: dict, pairs: list[tuple[str, str]]) -> str:
    """The ``method`` a config names: the last ``method=`` override, else the file's, else the default."""
    method = loaded.get("method", DistillConfig.method)
    for k, v in pairs:
        if k == "method":
            method = _coerce(v, str, "method")
    if not isinstance(method, str):
        raise ConfigError(f"method: expected a string, got {_short(method)}")
    return method


def drop_foreign_keys(cls, data: dict, warn: bool = True) -> list[str]:
    """Remove from ``data`` (a config mapping of ``cls``) the keys that ``cls`` lacks but another registered
    method's sections define (``dmd.critic_updates`` in a PSO config, a ``phased:`` section in a DMD2 one): options
    this method never reads. Earlier releases accepted them (and wrote every method's section into run folders and
    checkpoints), so they still load; one that differs from its default is named in a warning. Returns the
    non-default keys dropped. Keys no method defines stay, and :func:`_build` refuses them. The other methods'
    modules are imported only when such keys are there."""
    hints = typing.get_type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    stray = {}  # section -> the keys of it that cls lacks
    for sec, value in data.items():
        if not isinstance(value, dict):
            continue
        if sec not in own:
            stray[sec] = list(value)
        elif dataclasses.is_dataclass(hints[sec]):
            mine = {f.name for f in dataclasses.fields(hints[sec])}
            if set(value) - mine:
                stray[sec] = [k for k in value if k not in mine]
    scheduled = []  # (entry, dotted key, section, field) of schedule entries that set a field cls lacks
    for entry in data.get("schedule") or []:
        for key in list((entry.get("set") or {}) if isinstance(entry, dict) else {}):
            sec, _, rest = str(key).partition(".")
            k = rest.split(".")[0]
            if sec in hints and dataclasses.is_dataclass(hints[sec]) and k and \
                    k not in {f.name for f in dataclasses.fields(hints[sec])}:
                stray.setdefault(sec, [])
                if k not in stray[sec]:
                    stray[sec].append(k)
                scheduled.append((entry, key, sec, k))
    if not stray:
        return []
    from .methods import method_names, method_sections

    owners: dict[tuple[str, str], list[str]] = {}
    defaults: dict[tuple[str, str], object] = {}
    for name in method_names():
        try:
            secs = method_sections(name)
        except Exception:  # a method whose module cannot be imported here owns nothing we can compare
            continue
        for sec, tp in secs.items():
            if sec in stray:
                d = to_dict(tp())
                for k in stray[sec]:
                    if k in d:
                        owners.setdefault((sec, k), []).append(name)
                        defaults[(sec, k)] = d[k]
    changed = []
    for entry, key, sec, k in scheduled:  # a schedule entry of another method's option: dropped, as the option
        names = owners.get((sec, k))
        if not names:
            continue  # no method has it: the schedule check refuses it, naming the key
        value = entry["set"].pop(key)
        changed.append(f"schedule: {key}")
        if warn:
            import warnings

            warnings.warn(f"schedule entry at step {entry.get('at')}: {key} = {_short(value)} is an option of method "
                          f"{' | '.join(names)}; method {data.get('method', '?')} does not read it (ignored)",
                          stacklevel=3)
    if scheduled:
        data["schedule"] = [e for e in data["schedule"] if not isinstance(e, dict) or e.get("set")]
    for (sec, k), names in owners.items():
        if k not in data.get(sec, {}):
            continue  # only scheduled
        value = data[sec].pop(k)
        if value != defaults[(sec, k)]:
            changed.append(f"{sec}.{k}")
            if warn:
                import warnings

                warnings.warn(f"{sec}.{k} = {_short(value)} is an option of method {' | '.join(names)}; method "
                              f"{data.get('method', '?')} does not read it (ignored)", stacklevel=3)
        if sec not in own and not data[sec]:
            del data[sec]
    return changed


def read_yaml_chain(p: Path, seen: tuple = ()) -> dict:
    """A config file as one mapping: ``base: other.yaml`` (relative to this file) loads that file first and this
    file's keys are merged over it, section by section, so a config can be written as the diff of another."""
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist" + (f" (the base of {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise ConfigError(f"config file {p}: base: chain loops ({' -> '.join(str(x) for x in (*seen, p))})")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {p}: base must name another YAML file, got {base!r}")
    merged = read_yaml_chain(p.parent / base, (*seen, p.resolve()))
    _merge(merged, loaded, "")
    return merged


def _mentions(path, overrides, old: str) -> bool:
    """Whether the overrides or the YAML file set the old key ``old`` (``section.key``)."""
    if any(o.split("=", 1)[0].strip() == old for o in overrides or []):
        return True
    if path and Path(path).exists():
        section, key = old.split(".")
        loaded = read_yaml_chain(Path(path))
        return isinstance(loaded, dict) and isinstance(loaded.get(section), dict) and key in loaded[section]
    return False


def normalise(cfg) -> None:
    """The one place a loaded config is rewritten (``validate`` only reads): two spellings of one setting become
    one (a method's own spellings: :attr:`stepdistill.methods.Method.normalise`, e.g. PSO's ``pso.naive``)."""
    if isinstance(cfg, DistillConfig):
        from .methods import get_method, method_names

        hook = get_method(cfg.method).normalise if cfg.method in method_names() else None
        if hook is not None:
            hook(cfg)
    # a path written with ~ means the home folder, from YAML as from the shell (never a literal ./~)
    if isinstance(getattr(cfg, "output_dir", None), str) and cfg.output_dir.startswith("~"):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser())
    for section, key in (("dmd", "teacher"), ("dmd", "student_init"), ("dmd", "critic_init"), ("data", "name"),
                         ("pso", "model")):
        sec = getattr(cfg, section, None)
        v = getattr(sec, key, None)
        if isinstance(v, str) and v.startswith("~"):
            setattr(sec, key, str(Path(v).expanduser()))


def _merge(base: dict, new: dict, prefix: str) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, prefix + k + ".")
        else:
            base[k] = v


#: numeric keys ending like this must be >= 0 (guidance scales, loss weights, learning rates, tolerances)
NON_NEGATIVE_SUFFIXES = ("_scale", "_weight", "lr", "_tolerance", "weight_decay", "grad_clip", "margin")


def _numbers(obj, prefix: str = ""):
    """(dotted key, value) of every float / int field of a config, lists included (``a.b[2]``)."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _numbers(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)
        elif isinstance(v, list):
            yield from ((f"{key}[{i}]", float(x)) for i, x in enumerate(v) if isinstance(x, (int, float))
                        and not isinstance(x, bool))


def validate(cfg) -> None:
    """Value checks that types alone cannot express."""
    def check(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for key, value in _numbers(cfg):  # NaN / inf never make sense; scales, weights and rates are >= 0
        check(math.isfinite(value), key, f"must be a finite number, got {value}")
        if key.rsplit(".", 1)[-1].endswith(NON_NEGATIVE_SUFFIXES):
            check(value >= 0, key, f"must be >= 0, got {value}")
    data = getattr(cfg, "data", None)
    if data is not None:
        check(data.resolution > 0, "data.resolution", f"must be > 0, got {data.resolution}")
        check(data.channels in (1, 3), "data.channels", f"must be 1 or 3, got {data.channels}")
    tr = getattr(cfg, "train", None)
    if tr is not None:
        check(tr.batch_size > 0, "train.batch_size", "must be > 0")
        check(tr.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(0.0 <= tr.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
        check(tr.mixed_precision in ("no", "bf16"), "train.mixed_precision", "must be no | bf16")
        check(tr.sample_every > 0 and tr.checkpoint_every > 0 and tr.log_every > 0,
              "train.sample_every", "sample/checkpoint/log intervals must be > 0")
        check(tr.guard_every >= 0, "train.guard_every", "must be >= 0 (0 = off)")
        check(tr.guard_min_diversity >= 0, "train.guard_min_diversity", "must be >= 0")
        check(0.0 <= tr.guard_max_saturation <= 1.0, "train.guard_max_saturation", "must be in [0, 1]")
        check(0.0 <= tr.guard_max_collapsed <= 1.0, "train.guard_max_collapsed", "must be in [0, 1]")
        check(tr.guard_action in ("warn", "stop"), "train.guard_action", "must be warn | stop")
        check(tr.report_to in REPORT_TO, "train.report_to", f"must be {' | '.join(REPORT_TO)}, got {tr.report_to!r}")
        check(tr.attention in ATTENTION, "train.attention", f"must be {' | '.join(ATTENTION)}, got {tr.attention!r}")
        check(_budget_ok(tr.memory_budget_gib), "train.memory_budget_gib",
              f"must be a number of GiB > 0, auto or empty (off), got {tr.memory_budget_gib!r}")
        check(0 <= tr.seed <= MAX_SEED, "train.seed", f"must be an integer in 0..{MAX_SEED}, got {tr.seed}")
        check(tr.threads >= 0, "train.threads", f"must be >= 0 (0 = all cores), got {tr.threads}")
        check(tr.num_workers >= 0, "train.num_workers", f"must be >= 0, got {tr.num_workers}")
    if isinstance(cfg, TeacherConfig):
        m = cfg.model
        check(m.prediction_type in ("epsilon", "v_prediction", "sample"), "model.prediction_type",
              "must be epsilon | v_prediction | sample")
        check(0.0 <= cfg.cfg_dropout < 1.0, "cfg_dropout", "must be in [0, 1)")
        check(m.conditioning in ("class", "text"), "model.conditioning", "must be class | text")
        check(m.family in ("unet", "wan"), "model.family", f"must be unet | wan, got {m.family!r}")
        check(m.family != "wan" or m.conditioning == "text", "model.conditioning",
              "a wan video teacher is text-conditioned (captions of the clip's class): set model.conditioning=text")
        check(m.family != "wan" or cfg.data.frames >= 2, "data.frames", "a video teacher needs clips of >= 2 frames")
        check(len(m.video.patch_size) == 3 and all(p >= 1 for p in m.video.patch_size), "model.video.patch_size",
              f"needs three sizes >= 1 (frames, height, width), got {m.video.patch_size}")
        check(m.family != "wan" or (cfg.data.resolution % m.video.patch_size[1] == 0
                                    and cfg.data.frames % m.video.patch_size[0] == 0), "model.video.patch_size",
              f"must divide the clip (frames {cfg.data.frames}, resolution {cfg.data.resolution})")
        check(len(m.block_out_channels) >= 1 and all(c > 0 for c in m.block_out_channels), "model.block_out_channels",
              f"needs at least one channel count > 0, e.g. [32, 64, 64], got {m.block_out_channels}")
        check(m.norm_num_groups > 0 and all(c % m.norm_num_groups == 0 for c in m.block_out_channels),
              "model.norm_num_groups", f"must divide every entry of model.block_out_channels {m.block_out_channels}")
        down = 2 ** (len(m.block_out_channels) - 1)
        check(m.family != "unet" or cfg.data.resolution % down == 0, "data.resolution",
              f"must be a multiple of {down} (the UNet halves it {len(m.block_out_channels) - 1} times), got "
              f"{cfg.data.resolution}")
        check(m.layers_per_block >= 1, "model.layers_per_block", "must be >= 1")
        check(len(m.attention_levels) == len(m.block_out_channels), "model.attention_levels",
              "needs one entry per block_out_channels")
        f = cfg.finetune
        check(f.lora_rank >= 0, "finetune.lora_rank", f"must be >= 0 (0 = full fine-tuning), got {f.lora_rank}")
        check(f.lora_rank == 0 or bool(f.init), "finetune.lora_rank",
              "needs finetune.init (a LoRA adapts a trained model; give its folder or builtin: name)")
        check(f.lora_rank == 0 or len(f.lora_targets) > 0, "finetune.lora_targets", "needs at least one module name")
        check(f.transform in ("none", "invert", "bold"), "finetune.transform",
              f"must be none | invert | bold, got {f.transform!r}")
    text = getattr(cfg, "text", None)
    if text is not None:
        check(0 <= text.max_length <= 512, "text.max_length", "must be in 0..512 (0 = default)")
        check(all("{name}" in t for t in text.templates), "text.templates",
              "every template needs the placeholder {name}, e.g. 'a photo of a {name}'")
    if isinstance(cfg, DistillConfig):
        d = cfg.dmd
        from .methods import get_method, method_names

        check(cfg.method in method_names(), "method", f"must be {' | '.join(method_names())}")
        check(len(d.student_timesteps) >= 1, "dmd.student_timesteps", "needs at least one timestep")
        check(all(a > b for a, b in zip(d.student_timesteps, d.student_timesteps[1:])),
              "dmd.student_timesteps", "must be strictly decreasing")
        check(d.optim.lr > 0, "dmd.optim.lr", "must be > 0")
        check(d.lora_rank >= 0, "dmd.lora_rank", "must be >= 0 (0 = full fine-tuning)")
        check(d.lora_alpha >= 0, "dmd.lora_alpha", "must be >= 0 (0 = lora_rank)")
        check(d.lora_rank == 0 or len(d.lora_targets) > 0, "dmd.lora_targets", "needs at least one module name")
        check(d.teacher_dtype in ("float32", "bfloat16"), "dmd.teacher_dtype", "must be float32 | bfloat16")
        check(not (d.offload_teacher and d.lora_rank > 0), "dmd.offload_teacher",
              "cannot be combined with dmd.lora_rank > 0 (the LoRA teacher is the shared base of student and critic)")
        checks = get_method(cfg.method).checks
        if checks is not None:  # the method's own sections (its module; stepdistill/methods.py)
            checks(cfg, check)
        if cfg.schedule:
            def error(msg):
                raise ConfigError(msg)
            check_schedule(cfg, _coerce, validate, error)
