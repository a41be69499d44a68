"""What every teacher-distilling method starts from (DMD, DMD2, rCM, Phased DMD, MSD): the teacher (loaded, or
a Python ``Denoiser``), its metadata, the data, the condition sampler (a text teacher's prompt bank:
:func:`text_distill_setup`), and with ``dmd.lora_rank > 0`` the
teacher as the adapters-disabled view of a shared LoRA base. :func:`student_and_critic` copies it into the
two trainable players of the DMD family."""
from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass

from ..config import DistillConfig
from ..data import load_dataset
from ..denoiser import Denoiser
from ..errors import ConfigError
from ..models import ModelMeta, load_denoiser


@dataclass
class Setup:
    teacher: Denoiser
    meta: ModelMeta
    data: object                 # ArrayDataset (images in [-1, 1] / latents, labels)
    conds: object | None         # None: class labels (conditioning.ClassLabels); text teachers: a TextEmbeddingBank
    num_classes: int
    shared: object | None        # LoRA: the shared base (stepdistill.lora); None: full networks
    T: int                       # the teacher schedule's num_train_timesteps


def prepare(cfg: DistillConfig, teacher: Denoiser | None = None, meta: ModelMeta | None = None,
            data=None, text_bank=None) -> Setup:
    """Teacher, data and conditions for ``cfg`` (see :func:`stepdistill.trainers.distill.build_method`)."""
    teacher_given = teacher is not None
    if teacher is None:
        teacher, meta = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    if meta is not None and meta.student_timesteps and not cfg.dmd.allow_student_teacher:
        raise ConfigError(f"dmd.teacher {cfg.dmd.teacher} is a distilled student (timesteps {meta.student_timesteps}), "
                          "not a many-step teacher; its one-step score is not a data score. Use the teacher it came "
                          "from, or set dmd.allow_student_teacher=true if you mean it")
    data_given = data is not None
    if data is None and meta.conditioning != "text":
        data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
    num_classes = len(meta.class_names) if meta.conditioning == "class" else 0
    if num_classes and data.num_classes != num_classes:
        raise ConfigError(
            f"teacher {cfg.dmd.teacher} has {num_classes} classes (its class embedding holds {num_classes + 1} rows: "
            f"one per class plus the null class that classifier-free guidance uses) but dataset {cfg.data.name} has "
            f"{data.num_classes}; distill on the dataset the teacher was trained on, or use a teacher with "
            f"{data.num_classes} classes (num_class_embeds={data.num_classes + 1})")
    conds = None
    if meta.conditioning == "text":
        if text_bank is None and teacher_given:
            raise ValueError("a text-conditional teacher passed in Python needs text_bank=TextEmbeddingBank(...) "
                             "(stepdistill.conditioning): the prompt embeddings to distill on")
        if text_bank is None:  # from the config: the teacher's caption set + bank-aligned real data
            text_bank, data = text_distill_setup(cfg, meta, data if data_given else None)
        elif data is None:
            data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
        conds = text_bank
        if teacher.null_cond is None:
            teacher.null_cond = text_bank.null_cond
    check_shapes(cfg, teacher, data)
    T = teacher.schedule.num_train_timesteps
    shared = None
    if cfg.dmd.lora_rank > 0:  # the teacher becomes the adapters-disabled view of its own backbone
        from ..lora import lora_teacher

        teacher, shared = lora_teacher(teacher, cfg.dmd, seed=cfg.train.seed)
    return Setup(teacher, meta, data, conds, num_classes, shared, T)


def check_shapes(cfg: DistillConfig, teacher: Denoiser, data) -> None:
    """The real data (GAN branch, pixel discriminator) must have the teacher's sample shape: a 16x16 teacher
    distilled at 32x32, or a 32x32 teacher on 16x16 digits, would train and export a student whose config and
    metadata disagree."""
    if data is None:
        return
    try:
        want = tuple(int(v) for v in teacher.sample_shape)
    except (ValueError, TypeError):  # a custom backbone that does not declare its sample shape: nothing to check
        return
    got = tuple(int(v) for v in data.images.shape[1:])
    if want != got:
        c, h, w = want
        raise ConfigError(
            f"dmd.teacher {cfg.dmd.teacher} makes {c}x{h}x{w} samples but data {cfg.data.name} gives "
            f"{got[0]}x{got[1]}x{got[2]} images (data.resolution={cfg.data.resolution}, data.channels="
            f"{cfg.data.channels}); set data.resolution={h} data.channels={c}, or use a teacher of that size")


def text_distill_setup(cfg, meta, data=None):
    """(TextEmbeddingBank, real data) for ``build_method`` from ``cfg.dmd.teacher`` and ``cfg.text``: distilling a
    text teacher from a config alone.

    DMD2 trains the student on the prompt distribution it will serve (Yin et al. 2024): by default the
    teacher's own caption set (``stepdistill.json`` ``extra.text``: class names x templates), encoded once with
    the teacher's text encoder into a :class:`~stepdistill.conditioning.TextEmbeddingBank` whose "" embedding
    is the CFG null input. The GAN real branch needs (image, prompt) pairs: every real image gets one caption
    of its class (:func:`stepdistill.text.bank_aligned`). Latent teachers (a ``vae/``) see VAE latents of the
    real images (``vae.encode(x).latent_dist.mean * scaling_factor``). ``text.prompts: <file>`` distills on a
    prompt file instead (no pairs: ``dmd.gan=false``).
    """
    import torch

    from ..data import ArrayDataset
    from ..text import bank_aligned
    from ..text_models import encode_latents

    if cfg.text.prompts and cfg.dmd.gan:
        raise ConfigError("text.prompts: a prompt file gives no (image, prompt) pairs for the GAN real branch; "
                          "set dmd.gan=false (or text.prompts='' for the teacher's caption set)")
    bank, vae, names, templates = teacher_text_bank(cfg, meta)
    if data is None and cfg.text.prompts:
        data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
        data = ArrayDataset(data.images, torch.zeros_like(data.labels), list(data.class_names))
    elif data is None:
        raw = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
        if list(raw.class_names) != list(names):
            raise ConfigError(f"data.name: {cfg.data.name} has classes {raw.class_names}, the teacher's captions "
                              f"name {names}")
        data = bank_aligned(raw, len(templates), seed=cfg.train.seed)
    if vae is not None and data.images.shape[1] != vae.config.latent_channels:
        data = ArrayDataset(encode_latents(vae, data.images), data.labels, list(data.class_names))
    return bank, data


def teacher_text_bank(cfg, meta):
    """``(bank, vae, class names, templates)`` from the teacher alone: its text encoder (and VAE) loaded, and the
    prompt bank encoded with it: ``text.prompts`` (a prompt file; names and templates None) or the teacher's own
    caption set (class names x templates). Records the encoder's ``max_length`` in ``meta.extra["text"]`` (export
    copies the encoder). No data is read: data-free methods (BOOT) use it as it is."""
    from ..text import CAPTION_TEMPLATES, caption_bank, prompt_bank, read_prompts
    from ..text_models import load_text_components, text_meta

    encoder, vae = load_text_components(cfg.dmd.teacher, meta, cfg.text.max_length or None)
    t = text_meta(meta)
    meta.extra = {**(meta.extra or {}), "text": {**t, "max_length": encoder.max_length}}
    if cfg.text.prompts:
        return prompt_bank(encoder, read_prompts(cfg.text.prompts)), vae, None, None
    names = t.get("class_names")
    if not names:
        raise ConfigError("text.prompts: the teacher has no caption set (stepdistill.json extra.text.class_names); "
                          "give a prompt file")
    templates = list(cfg.text.templates or t.get("templates") or CAPTION_TEMPLATES)
    return caption_bank(encoder, names, templates), vae, names, templates


def check_student_timesteps(cfg: DistillConfig, s: Setup) -> None:
    if any(not 0 <= t < s.T for t in cfg.dmd.student_timesteps):
        raise ValueError(f"dmd.student_timesteps {cfg.dmd.student_timesteps} must lie in [0, {s.T})")


def student_and_critic(s: Setup, student_init: str = "", allow_pickle: bool = False) -> tuple[Denoiser, Denoiser]:
    """Two trainable copies of the teacher (LoRA: two adapter roles on the shared base), in train mode.

    ``student_init`` (``dmd.student_init``): a trained student of the same architecture (an exported folder
    or ``builtin:``) whose weights replace the student's copy of the teacher, to continue distilling an
    exported student with a new recipe; or a layer-pruned model (``stepdistill prune``, then ``method: kd``;
    its ``stepdistill.json`` holds ``extra.pruned``), which becomes the student with its own smaller architecture.
    The critic still starts from the teacher (DMD2 Sec. 4.1)."""
    teacher = s.teacher
    if s.shared is not None:
        from ..lora import lora_roles

        student, critic = lora_roles(teacher, s.shared, ("student", "critic"))
    else:
        student = student_from(teacher, student_init, allow_pickle) if student_init else None
        student = student or Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                                      teacher.null_class, teacher.null_cond)
        critic = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                          teacher.null_class, teacher.null_cond)
    if student_init and s.shared is not None:
        _load_student_weights(student, student_init, allow_pickle, lora=True)
    student.backbone.train()
    critic.backbone.train()
    return student, critic


def student_from(teacher: Denoiser, source: str, allow_pickle: bool = False) -> Denoiser:
    """A trainable student from ``source`` (``dmd.student_init``) with the teacher's schedule and null inputs: a
    pruned model (``stepdistill prune``) or a grown one (``stepdistill grow``) keeps its own smaller or deeper
    network; any other model must have the teacher's architecture, and its weights go into a copy of the teacher's
    network."""
    from ..models import meta_extra
    from ..pruning.folder import PRUNED_KEY
    from ..pruning.growth import GROWN_KEY

    extra = meta_extra(source, allow_pickle)
    if extra.get(PRUNED_KEY) is not None or extra.get(GROWN_KEY) is not None:
        init, _ = load_denoiser(source, allow_pickle=allow_pickle)
        return Denoiser(init.backbone, teacher.schedule, teacher.prediction_type, teacher.null_class,
                        teacher.null_cond)
    student = Denoiser(copy.deepcopy(teacher.backbone), teacher.schedule, teacher.prediction_type,
                       teacher.null_class, teacher.null_cond)
    _load_student_weights(student, source, allow_pickle, lora=False)
    return student


def _load_student_weights(student: Denoiser, source: str, allow_pickle: bool, lora: bool) -> None:
    if lora:
        raise ConfigError("dmd.student_init: not supported with dmd.lora_rank > 0 (the student is an adapter on "
                          "the teacher); export a merged student or train full networks")
    init, _ = load_denoiser(source, allow_pickle=allow_pickle)
    want, got = student.backbone.state_dict(), init.backbone.state_dict()
    bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k].shape != got[k].shape]
    if bad:
        raise ConfigError(f"dmd.student_init {source}: its network does not match the teacher's architecture "
                          f"(first differing weight: {bad[0]}); a smaller student comes from stepdistill prune, a "
                          "deeper one from stepdistill grow")
    student.backbone.load_state_dict(got)


#: True while a method is built for a run that will restore its own checkpoint (``--resume`` with one to resume
#: from): every player's weights then come from that checkpoint, so ``dmd.critic_init`` is not read
_RESTORING = contextvars.ContextVar("stepdistill_restoring", default=False)


@contextlib.contextmanager
def restoring_checkpoint(restoring: bool = True):
    """Build a method for a run that resumes from its own checkpoint (:func:`stepdistill.trainers.distill.distill`):
    :func:`load_critic_init` then reads nothing, so a resumed run does not need its ``dmd.critic_init`` source any
    more (it may have been moved or deleted). ``dmd.student_init`` is still read: a pruned student's network shape
    comes from its folder."""
    token = _RESTORING.set(bool(restoring))
    try:
        yield
    finally:
        _RESTORING.reset(token)


def load_critic_init(players: dict, source: str) -> str:
    r"""``dmd.critic_init``: every critic player of an objective (``critic``; MSD's ``critic_k``) starts from the
    critic of a DMD / DMD2 run's checkpoint instead of a teacher copy with fresh heads: its fake score always, its GAN
    head and pixel discriminator where the checkpoint holds them with this run's shapes (else they start fresh).

    Why. DMD's generator gradient is the difference of two scores, ``mu_fake(x_t, t) - mu_real(x_t, t)`` (DMD,
    Yin et al. 2023, Eq. 7). A critic copied from the teacher has ``mu_fake = mu_real``: a run that starts from an
    already distilled student (``dmd.student_init``; MSD's per-part students from one student) begins with a DM
    gradient of zero, and then follows a fake score that lags the student's distribution for hundreds of steps at
    the two time-scale rule's learning rate (DMD2, Yin et al. 2024, Sec. 4.1). The checkpoint that the student
    came from holds the critic that already tracks it. The critic's optimizer state is not carried over.

    ``source``: a checkpoint folder (``.../checkpoints/step_NNNNNN``) or a run folder (its latest checkpoint). The
    checkpoint's files are verified against their recorded sha256 first. Returns a one-line summary. Inside
    :func:`restoring_checkpoint` (a resumed run) nothing is read: the run's own checkpoint holds its critics."""
    if _RESTORING.get():
        return f"dmd.critic_init: not read ({source}): the run resumes from its own checkpoint, which holds the critics"
    import re
    from pathlib import Path

    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint

    path = Path(source)
    if not (path / "models.safetensors").exists():
        path = latest_checkpoint(path) or path
    if not (path / "models.safetensors").exists():
        raise ConfigError(f"dmd.critic_init {source}: not a checkpoint folder (no models.safetensors) nor a run "
                          "folder with checkpoints/latest")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"dmd.critic_init: {e}") from e
    pre = "player.critic."
    src = {k[len(pre):]: v for k, v in load_file(path / "models.safetensors").items() if k.startswith(pre)}
    if not src:
        raise ConfigError(f"dmd.critic_init {path}: the checkpoint holds no critic (player 'critic'); it must come "
                          "from a dmd / dmd2 run")
    critics = {name: p.module for name, p in players.items() if re.fullmatch(r"critic(_\d+)?", name)}
    if not critics:
        raise ConfigError(f"dmd.critic_init: this method's objective has no critic to start (players: "
                          f"{', '.join(players)})")
    loaded, fresh = set(), set()
    for module in critics.values():
        for part, sub in module.named_children():   # fake (the fake score), head (GAN), pixel_disc
            want = sub.state_dict()
            have = {k[len(part) + 1:]: v for k, v in src.items() if k.startswith(part + ".")}
            fits = have.keys() == want.keys() and all(have[k].shape == want[k].shape for k in want)
            if part == "fake" and not fits:
                bad = sorted((want.keys() ^ have.keys()) or
                             {k for k in want if have[k].shape != want[k].shape})[:3]
                raise ConfigError(f"dmd.critic_init {path}: its fake score does not match this run's critic network "
                                  f"(the teacher's architecture); first differing tensors: {', '.join(bad)}")
            if fits:
                sub.load_state_dict(have)
                loaded.add(part)
            else:
                fresh.add(part)
    if "fake" not in loaded:
        raise ConfigError(f"dmd.critic_init: this method's critic has no fake score to start (parts: "
                          f"{', '.join(sorted(fresh)) or 'none'})")
    line = f"dmd.critic_init: {len(critics)} critic(s) start from {path} ({' + '.join(sorted(loaded))})"
    return line + (f"; fresh: {', '.join(sorted(fresh))}" if fresh else "")
