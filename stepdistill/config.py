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


@dataclass
class TextConfig:
    """Text conditioning (stepdistill/text.py): captions ``template.format(name=class name)`` for every class and
    template, encoded once with a frozen text encoder (token embeddings, padded to ``max_length``)."""
    encoder: str = "minilm"        # teacher training: minilm (the shipped MiniLM) | folder | hub id; distill: the teacher's
    max_length: int = 0            # tokens per prompt (padded / truncated); 0: 16 (teacher training) | the teacher's
    templates: list[str] = field(default_factory=list)  # [] = stepdistill.text.CAPTION_TEMPLATES
    prompts: str = ""              # distill: "" = the teacher's caption set (GAN real branch aligned); or a prompt file


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


def _dmd_optim() -> OptimConfig:
    """DMD2's AdamW: beta1 = 0 (GAN practice), weight decay 0.01, clip 10 (Yin et al. 2024, their code)."""
    return OptimConfig(lr=2e-5, beta1=0.0, beta2=0.999, weight_decay=0.01, warmup_steps=0, grad_clip=10.0)


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
    guard_action: str = "warn"     # warn | stop (stop: checkpoint, then raise CollapseError)
    nonfinite_tolerance: float = 1e-3  # stop when a step's NaN/inf score fraction (*_nonfinite_frac) exceeds it
    fsdp: bool = False             # shard players + EMA over the processes (FSDP2; trainers/fsdp.py)
    fsdp_shard_teacher: bool = False  # with fsdp: shard the frozen teacher backbone too


@dataclass
class TeacherConfig:
    output_dir: str = "runs/teacher"
    data: DataConfig = field(default_factory=DataConfig)
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)  # model.conditioning: text
    cfg_dropout: float = 0.1       # probability of replacing the label by the null class
    sample_steps: int = 25         # sampler steps for the periodic sample grids
    guidance_scale: float = 2.0


@dataclass
class DMDConfig:
    """DMD / DMD2 hyper-parameters (Yin et al. 2023, 2024); defaults follow DMD2 where they transfer."""
    teacher: str = "builtin:animal_mnist"  # diffusers folder, hub id, or builtin:animal_mnist
    allow_pickle: bool = False
    allow_student_teacher: bool = False  # a distilled student as dmd.teacher is refused unless this is set
    student_timesteps: list[float] = field(default_factory=lambda: [999.0])  # one-step default
    student_init: str = ""         # a trained student (folder / builtin:) to start the generator from; "" = the teacher
    backward_simulation: bool = True
    real_guidance_scale: float = 2.0
    fake_guidance_scale: float = 1.0
    t_min: float = 20.0            # 0.02 T
    t_max: float = 980.0           # 0.98 T
    critic_updates: int = 5        # fake-score updates per generator update (two time-scale rule)
    dm_weight: float = 1.0
    gan: bool = True
    gan_g_weight: float = 3e-3
    gan_d_weight: float = 1e-2
    regression_weight: float = 0.0  # original DMD regression loss; > 0 builds teacher ODE pairs
    regression_pairs: int = 256
    regression_steps: int = 25
    regression_distance: str = "mse"  # mse | lpips
    regression_warmup_steps: int = 0  # first N generator steps: regression on teacher ODE pairs only (no critic)
    gan_fresh_t: bool = False      # generator GAN term at its own t ~ U[0, T) (DMD2's code) instead of the DM step's t
    pixel_gan_g_weight: float = 0.0  # > 0: a pixel-space patch discriminator on clean samples (trainers/pixel_gan.py)
    pixel_gan_d_weight: float = 1.0  # its loss weight in the critic update
    pixel_gan_r1: float = 0.0        # R1 penalty gamma on real images (0 = off)
    pixel_gan_width: int = 32        # first conv width (doubles at each of its two stride-2 convs)
    pixel_gan_lr: float = 0.0        # its learning rate (own param group of the critic's AdamW); 0 = dmd.critic_optim.lr
    divergence: str = "reverse_kl"  # reverse_kl (DMD) | forward_kl | js: f-distill's h(r) weights (needs dmd.gan)
    divergence_logit_clip: float = 10.0  # the discriminator logit log r is clipped to +-this before h(r)
    optim: OptimConfig = field(default_factory=_dmd_optim)         # the generator (student, experts)
    critic_optim: OptimConfig = field(default_factory=_dmd_optim)  # the fake score and its GAN head
    lora_rank: int = 0             # > 0: student, critic = LoRA adapters on the frozen teacher (stepdistill/lora.py)
    lora_alpha: float = 0.0        # LoRA scale alpha / rank; 0 means alpha = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    teacher_dtype: str = "float32"  # float32 | bfloat16 (teacher weights; outputs are cast back to float32)
    offload_teacher: bool = False  # keep the teacher on the CPU, move it to the accelerator for its forward only
    # Decoupled DMD (Liu et al. 2025): the guided DM gradient split into a CFG-augmentation (CA) term and a
    # distribution-matching term, each with its own weight and re-noising schedule (trainers/decoupled_dmd.py)
    decoupled: bool = False
    ca_weight: float = 1.0         # weight of the CA term -(w-1)(mu_real_cond - mu_real_uncond)
    dm_term_weight: float = 1.0    # weight of the DM term mu_fake - mu_real_cond (its t: t_min..t_max)
    ca_schedule: str = "above_student"  # shared (the DM term's t and noise: DMD2) | uniform | above_student
    ca_t_min: float = 20.0         # CA times: U[ca_t_min, ca_t_max] (above_student: U[max(t_k, ca_t_min), ca_t_max])
    ca_t_max: float = 980.0


@dataclass
class PhasedConfig:
    """Phased DMD (SenseNova 2025; method: phased_dmd): K phases on the training-time axis, one
    expert per phase, trained progressively. The other hyper-parameters come from ``dmd``."""
    boundaries: list[float] = field(default_factory=lambda: [999.0, 500.0, 0.0])  # s_0 > ... > s_K = 0
    steps_per_phase: list[int] = field(default_factory=list)  # [N_0, ..]; [] splits train.max_steps evenly
    margin: float = 1.0            # score times of phase k < K-1 lie in [s_{k+1} + margin, s_k]
    subinterval_weighting: bool = True  # weight the fake-score loss by beta_{t|s}^2 / sigma_t^2


@dataclass
class MSDConfig:
    """Multi-student distillation (Song et al. 2024; method: msd): K one-step students, each distilled
    with DMD2 (the ``dmd`` section) on its own part of the classes. See trainers/multi_student.py."""
    num_students: int = 4
    groups: list[list[int]] = field(default_factory=list)  # class indices per student; [] = msd.partition decides
    partition: str = "contiguous"  # groups = []: contiguous (balanced split) | kmeans (classes by their mean real image)
    shared_critic: bool = False    # one fake score for all students (else one per student)
    schedule: str = "round_robin"  # round_robin: one student per step | all: every student every step
    steps_per_student: int = 0     # DM generator updates per student; 0 = what train.max_steps leaves after TSM
    student_channels: list[int] = field(default_factory=list)  # [] = the teacher's architecture (teacher init)
    student_layers_per_block: int = 0  # 0 = the teacher's
    tsm_steps: int = 0             # teacher score-matching updates per student before DM (smaller students)

    @property
    def round_steps(self) -> int:
        """Global steps per update of one student: K (round_robin) or 1 (all)."""
        return self.num_students if self.schedule == "round_robin" else 1


@dataclass
class PSOConfig:
    """Pairwise Sample Optimization (Miao et al. 2024; method: pso | pso_naive): tune an already distilled
    few-step model toward target data, anchored to its own samples. See trainers/pso.py."""
    model: str = "builtin:animal_mnist_dmd2"  # distilled model: our student folder, a diffusers folder or hub id
    model_timesteps: list[float] = field(default_factory=list)  # its sampling chain if it has no stepdistill.json
    allow_pickle: bool = False
    target: str = ""               # target dataset: "" = the data section; animal_mnist | digits | image folder
    target_transform: str = "none"  # none | invert (x -> -x: inverted silhouettes) | bold (3x3 dilation)
    target_classes: list[str] = field(default_factory=list)  # class subset (names or indices); [] = all
    pairs: str = ""                # preference pairs (.safetensors or folder with chosen/ rejected/): replaces target
    mode: str = "offline"          # offline: references drawn once from the initial model (cached) | online
    num_reference: int = 256       # reference samples (class-balanced over the target's classes)
    refresh_every: int = 20        # online: redraw the references from the current model every N steps
    beta: float = 10.0             # DPO temperature; the loss saturates once the margin reaches ~5 / beta
    timesteps: list[float] = field(default_factory=list)  # likelihood timesteps; [] = the model's own
    weights: list[float] = field(default_factory=list)    # w_k per timestep; [] = uniform 1/K
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.0, grad_clip=1.0))
    naive: bool = False            # the naive baseline (denoising loss on the targets) = method: pso_naive
    likelihood: str = "auto"       # pure-noise first step: kde (the model's own posterior over its input noise) |
    #                                forward (Diffusion-DPO's forward-process surrogate) | auto (kde when t_0 is pure noise)
    kde_samples: int = 32          # kde: noise draws per image (m)
    kde_tau: float = 0.02          # kde: temperature of the soft-min over the m distances (-> 0: nearest sample)
    target_anchor: float = 0.0     # DPO-Positive penalty (Pal et al. 2024): lambda * max(0, err_theta - err_ref) on targets


@dataclass
class RCMConfig:
    """rCM (Zheng et al. 2025; method: rcm): sCM on the TrigFlow view of the student + DMD's DM term as a
    regulariser (stepdistill/trainers/rcm.py). ``dmd.*`` keeps the teacher, guidance, critic and timesteps."""
    scm_weight: float = 100.0      # rCM's loss_scale (our DM surrogate's scaling: see trainers/rcm.py)
    dmd_weight: float = 1.0        # the DMD regulariser; 0 = plain sCM (no critic)
    tangent: str = "auto"          # auto (JVP, plain attention; finite differences if an op lacks forward AD) | jvp | fd
    fd_size: float = 1.0e-3        # finite-difference step in TrigFlow time
    tangent_warmup_steps: int = 100  # r = min(1, step / N) in sCM's tangent; DMD starts after it
    p_mean: float = -0.8           # sCM's time law: s = arctan(sigma), log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    norm_eps: float = 0.1          # tangent normalisation g / (||g|| + norm_eps)


@dataclass
class DistillConfig:
    output_dir: str = "runs/dmd2"
    method: str = "dmd2"           # dmd | dmd2 | phased_dmd | msd | pso | pso_naive | rcm
    data: DataConfig = field(default_factory=DataConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    phased: PhasedConfig = field(default_factory=PhasedConfig)
    msd: MSDConfig = field(default_factory=MSDConfig)
    pso: PSOConfig = field(default_factory=PSOConfig)
    rcm: RCMConfig = field(default_factory=RCMConfig)
    text: TextConfig = field(default_factory=TextConfig)  # text teachers: the prompt set to distill on
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, max_steps=300, ema_decay=0.95,
                                                                   sample_every=50, checkpoint_every=50))
    schedule: list[ScheduleEntry] = field(default_factory=list)  # settings that change at given steps (recipe.py)


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


def upgrade_keys(cls, data: dict) -> dict:
    """``data`` (a nested config mapping) with the old spellings of :data:`LEGACY_KEYS` renamed; where both
    spellings are given, the new key wins. A copy: ``data`` is not changed."""
    import copy

    out = copy.deepcopy(data)
    for old, targets in LEGACY_KEYS.get(cls, {}).items():
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
    (:data:`LEGACY_KEYS`, e.g. ``dmd.student_lr`` for ``dmd.optim.lr``) are accepted."""
    data = to_dict(cls())
    if path:  # None or "" means defaults only
        _merge(data, upgrade_keys(cls, read_yaml_chain(Path(path))), "")
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value")
        k, v = o.split("=", 1)
        # keep the raw text: _coerce parses it by the field's type (YAML would read `no` as False)
        for key in LEGACY_KEYS.get(cls, {}).get(k.strip(), (k.strip(),)):
            _set_dotted(data, key, v)
    try:
        cfg = _build(cls, data)
        normalise(cfg)
        validate(cfg)
        if path:  # not a field: the file a run reads, which --overwrite must never delete (outputs.run_inputs)
            cfg.source_path = str(path)
    except ConfigError as e:  # a bad value given under an old spelling: name the key as the user wrote it
        msg = str(e)
        for old, targets in LEGACY_KEYS.get(cls, {}).items():
            hit = next((t for t in targets if msg.startswith(t + ":")), None)
            if hit and _mentions(path, overrides, old):
                raise ConfigError(f"{msg} (given as {old}, the old spelling of {hit})") from None
        raise
    return cfg


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
    one. ``pso.naive: true`` and ``method: pso_naive`` both mean the naive baseline; exports record ``pso_naive``."""
    if isinstance(cfg, DistillConfig) and (cfg.pso.naive or cfg.method == "pso_naive") \
            and cfg.method in ("pso", "pso_naive"):
        cfg.method, cfg.pso.naive = "pso_naive", True
    # a path written with ~ means the home folder, from YAML as from the shell (never a literal ./~)
    if isinstance(getattr(cfg, "output_dir", None), str) and cfg.output_dir.startswith("~"):
        cfg.output_dir = str(Path(cfg.output_dir).expanduser())
    for section, key in (("dmd", "teacher"), ("dmd", "student_init"), ("data", "name"), ("pso", "model")):
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
        check(tr.guard_action in ("warn", "stop"), "train.guard_action", "must be warn | stop")
        check(0 <= tr.seed <= MAX_SEED, "train.seed", f"must be an integer in 0..{MAX_SEED}, got {tr.seed}")
        check(tr.threads >= 0, "train.threads", f"must be >= 0 (0 = all cores), got {tr.threads}")
        check(tr.num_workers >= 0, "train.num_workers", f"must be >= 0, got {tr.num_workers}")
    if isinstance(cfg, TeacherConfig):
        m = cfg.model
        check(m.prediction_type in ("epsilon", "v_prediction", "sample"), "model.prediction_type",
              "must be epsilon | v_prediction | sample")
        check(0.0 <= cfg.cfg_dropout < 1.0, "cfg_dropout", "must be in [0, 1)")
        check(m.conditioning in ("class", "text"), "model.conditioning", "must be class | text")
        check(len(m.block_out_channels) >= 1 and all(c > 0 for c in m.block_out_channels), "model.block_out_channels",
              f"needs at least one channel count > 0, e.g. [32, 64, 64], got {m.block_out_channels}")
        check(m.norm_num_groups > 0 and all(c % m.norm_num_groups == 0 for c in m.block_out_channels),
              "model.norm_num_groups", f"must divide every entry of model.block_out_channels {m.block_out_channels}")
        down = 2 ** (len(m.block_out_channels) - 1)
        check(cfg.data.resolution % down == 0, "data.resolution",
              f"must be a multiple of {down} (the UNet halves it {len(m.block_out_channels) - 1} times), got "
              f"{cfg.data.resolution}")
        check(m.layers_per_block >= 1, "model.layers_per_block", "must be >= 1")
        check(len(m.attention_levels) == len(m.block_out_channels), "model.attention_levels",
              "needs one entry per block_out_channels")
    text = getattr(cfg, "text", None)
    if text is not None:
        check(0 <= text.max_length <= 512, "text.max_length", "must be in 0..512 (0 = default)")
        check(all("{name}" in t for t in text.templates), "text.templates",
              "every template needs the placeholder {name}, e.g. 'a photo of a {name}'")
    if isinstance(cfg, DistillConfig):
        d = cfg.dmd
        from .methods import method_checks, method_names

        check(cfg.method in method_names(), "method", f"must be {' | '.join(method_names())}")
        check(len(d.student_timesteps) >= 1, "dmd.student_timesteps", "needs at least one timestep")
        check(all(a > b for a, b in zip(d.student_timesteps, d.student_timesteps[1:])),
              "dmd.student_timesteps", "must be strictly decreasing")
        check(0 <= d.t_min < d.t_max, "dmd.t_min", "must satisfy 0 <= t_min < t_max")
        check(d.critic_updates >= 1, "dmd.critic_updates", "must be >= 1")
        check(d.regression_distance in ("mse", "lpips"), "dmd.regression_distance", "must be mse | lpips")
        check(d.regression_warmup_steps >= 0, "dmd.regression_warmup_steps", "must be >= 0")
        check(d.divergence in ("reverse_kl", "forward_kl", "js"), "dmd.divergence",
              "must be reverse_kl | forward_kl | js")
        check(d.divergence_logit_clip > 0, "dmd.divergence_logit_clip", "must be > 0")
        check(d.regression_pairs >= 1, "dmd.regression_pairs", "must be >= 1")
        check(d.pixel_gan_width >= 1, "dmd.pixel_gan_width", "must be >= 1")
        check(d.pixel_gan_r1 >= 0, "dmd.pixel_gan_r1", "must be >= 0")
        check(d.optim.lr > 0, "dmd.optim.lr", "must be > 0")
        check(d.critic_optim.lr > 0, "dmd.critic_optim.lr", "must be > 0")
        check(d.lora_rank >= 0, "dmd.lora_rank", "must be >= 0 (0 = full fine-tuning)")
        check(d.lora_alpha >= 0, "dmd.lora_alpha", "must be >= 0 (0 = lora_rank)")
        check(d.lora_rank == 0 or len(d.lora_targets) > 0, "dmd.lora_targets", "needs at least one module name")
        check(d.teacher_dtype in ("float32", "bfloat16"), "dmd.teacher_dtype", "must be float32 | bfloat16")
        check(not (d.offload_teacher and d.lora_rank > 0), "dmd.offload_teacher",
              "cannot be combined with dmd.lora_rank > 0 (the LoRA teacher is the shared base of student and critic)")
        (method_checks(cfg.method) or check_no_dmd_extras)(cfg, check)  # the method's own sections (methods.py)
        if cfg.schedule:
            def error(msg):
                raise ConfigError(msg)
            check_schedule(cfg, _coerce, validate, error)


def check_no_dmd_extras(cfg: DistillConfig, check) -> None:
    """Methods other than DMD / DMD2 use the plain reverse-KL DM term: f-distill weights, Decoupled DMD and the
    pixel discriminator are options of the DMD objective only."""
    check(cfg.dmd.divergence == "reverse_kl", "dmd.divergence",
          f"forward_kl / js are supported by method dmd / dmd2 only, not {cfg.method}")
    check(not cfg.dmd.decoupled, "dmd.decoupled", f"is supported by method dmd / dmd2 only, not {cfg.method}")
    check(cfg.dmd.pixel_gan_g_weight == 0, "dmd.pixel_gan_g_weight",
          f"the pixel discriminator is supported by method dmd / dmd2 only, not {cfg.method}")


def check_dmd(cfg: DistillConfig, check) -> None:
    """``method: dmd | dmd2``: f-distill's divergence and Decoupled DMD's terms."""
    d = cfg.dmd
    check(d.divergence == "reverse_kl" or (d.gan and not d.decoupled), "dmd.divergence",
          "forward_kl / js need dmd.gan=true (the discriminator gives the density ratio) and no dmd.decoupled")
    if d.decoupled:
        check(d.ca_schedule in ("shared", "uniform", "above_student"), "dmd.ca_schedule",
              "must be shared | uniform | above_student")
        check(0 <= d.ca_t_min <= d.ca_t_max, "dmd.ca_t_min", "must satisfy 0 <= ca_t_min <= ca_t_max")
        check(d.ca_weight >= 0 and d.dm_term_weight >= 0, "dmd.ca_weight", "term weights must be >= 0")
        check(d.dm_weight > 0, "dmd.dm_weight", "must be > 0 with dmd.decoupled (it scales both terms)")


def check_rcm(cfg: DistillConfig, check) -> None:
    """``method: rcm`` (trainers/rcm.py)."""
    d, rc = cfg.dmd, cfg.rcm
    check_no_dmd_extras(cfg, check)
    check(not d.gan, "dmd.gan", "must be false with method rcm (rCM needs no GAN)")
    check(rc.tangent in ("auto", "jvp", "fd"), "rcm.tangent", "must be auto | jvp | fd")
    check(rc.fd_size > 0, "rcm.fd_size", "must be > 0")
    check(rc.tangent_warmup_steps >= 0, "rcm.tangent_warmup_steps", "must be >= 0")
    check(rc.p_std > 0, "rcm.p_std", "must be > 0")
    check(rc.norm_eps > 0, "rcm.norm_eps", "must be > 0")


def check_phased(cfg: DistillConfig, check) -> None:
    """``method: phased_dmd`` (trainers/phased_dmd.py)."""
    check_no_dmd_extras(cfg, check)
    b, n, K, tr = cfg.phased.boundaries, cfg.phased.steps_per_phase, len(cfg.phased.boundaries) - 1, cfg.train
    check(K >= 1 and all(x > y for x, y in zip(b, b[1:])) and b[-1] == 0, "phased.boundaries",
          "needs >= 2 strictly decreasing entries ending at 0, e.g. [999, 500, 0]")
    check((len(n) == K and min(n) >= 1 and sum(n) == tr.max_steps) if n else tr.max_steps >= K,
          "phased.steps_per_phase", f"needs {K} entries >= 1 summing to train.max_steps ({tr.max_steps}), "
          f"or [] for an even split of train.max_steps (>= {K})")
    check(cfg.phased.margin > 0, "phased.margin", "must be > 0")


def check_msd(cfg: DistillConfig, check) -> None:
    """``method: msd``: student count, schedule, per-student budget, architecture, groups (structure)."""
    check_no_dmd_extras(cfg, check)
    m, K, tr, d = cfg.msd, cfg.msd.num_students, cfg.train, cfg.dmd
    check(1 <= K <= 8, "msd.num_students", "must be in 1..8 (MultiStudentPipeline holds at most 8 students)")
    check(m.schedule in ("round_robin", "all"), "msd.schedule", "must be round_robin | all")
    check(m.partition in ("contiguous", "kmeans"), "msd.partition", "must be contiguous | kmeans")
    check(not (m.groups and m.partition != "contiguous"), "msd.partition",
          "applies when msd.groups is [] (explicit groups are the partition)")
    check(m.tsm_steps >= 0, "msd.tsm_steps", "must be >= 0")
    check(m.steps_per_student >= 0, "msd.steps_per_student", "must be >= 0 (0 = split train.max_steps)")
    per = m.round_steps
    if m.steps_per_student:  # the schedule is msd's; a smaller train.max_steps stops early (a prefix of it)
        need = per * (m.tsm_steps + m.steps_per_student)
        check(tr.max_steps <= need, "msd.steps_per_student",
              f"{K} students x (msd.tsm_steps {m.tsm_steps} + {m.steps_per_student}) with schedule {m.schedule} "
              f"take train.max_steps={need} (fewer stops early), got {tr.max_steps}; or set msd.steps_per_student=0")
    else:
        check(tr.max_steps % per == 0 and tr.max_steps // per > m.tsm_steps, "msd.steps_per_student",
              f"0 splits train.max_steps evenly: with schedule {m.schedule} it must be a multiple of {per} that "
              f"leaves more than msd.tsm_steps={m.tsm_steps} updates per student, got {tr.max_steps}")
    check(all(c > 0 for c in m.student_channels), "msd.student_channels", "entries must be > 0 ([] = the teacher's)")
    check(m.student_layers_per_block >= 0, "msd.student_layers_per_block", "must be >= 0 (0 = the teacher's)")
    check(d.lora_rank == 0, "dmd.lora_rank", "LoRA students are not supported by method msd")
    check(d.regression_weight == 0, "dmd.regression_weight", "DMD's regression loss is not supported by method msd")
    check(d.regression_warmup_steps == 0, "dmd.regression_warmup_steps", "not supported by method msd")
    if m.groups:  # structure only here (overlaps, gaps); the class count is checked against the teacher at build
        from .partitions import partition_classes

        partition_classes(1 + max((c for g in m.groups for c in g), default=-1), K, m.groups)


def check_pso(cfg: DistillConfig, check) -> None:
    """``method: pso | pso_naive`` (trainers/pso.py; :func:`normalise` has made the two spellings one)."""
    check_no_dmd_extras(cfg, check)
    p = cfg.pso
    check(bool(p.model), "pso.model", "needs the distilled model to tune (folder, hub id or builtin:animal_mnist_dmd2)")
    check(p.mode in ("offline", "online"), "pso.mode", "must be offline | online")
    check(p.refresh_every >= 1, "pso.refresh_every", "must be >= 1")
    check(p.num_reference >= 1, "pso.num_reference", "must be >= 1")
    check(p.beta > 0, "pso.beta", "must be > 0")
    check(p.optim.lr > 0, "pso.optim.lr", "must be > 0")
    check(p.target_transform in ("none", "invert", "bold"), "pso.target_transform", "must be none | invert | bold")
    check(p.likelihood in ("auto", "kde", "forward"), "pso.likelihood", "must be auto | kde | forward")
    check(p.kde_samples >= 1, "pso.kde_samples", "must be >= 1")
    check(p.kde_tau > 0, "pso.kde_tau", "must be > 0")
    check(p.target_anchor >= 0, "pso.target_anchor", "must be >= 0")
    check(all(a > b for a, b in zip(p.timesteps, p.timesteps[1:])) and all(t >= 0 for t in p.timesteps),
          "pso.timesteps", "must be strictly decreasing and >= 0 ([] = the model's own)")
    check(all(a > b for a, b in zip(p.model_timesteps, p.model_timesteps[1:])), "pso.model_timesteps",
          "must be strictly decreasing ([] = the model's stepdistill.json student_timesteps)")
    check(not p.weights or ((not p.timesteps or len(p.weights) == len(p.timesteps)) and min(p.weights) >= 0
                            and sum(p.weights) > 0),
          "pso.weights", "needs one weight >= 0 per timestep (pso.timesteps, or the model's own), not all 0")
    if p.pairs:
        check(not p.target and p.target_transform == "none" and not p.target_classes, "pso.pairs",
              "replaces pso.target / target_transform / target_classes (the chosen images are the targets)")
        check(p.mode == "offline" or p.naive, "pso.mode",
              "with pso.pairs the rejected images are the references: use mode offline")
