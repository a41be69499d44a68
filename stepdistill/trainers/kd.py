r"""Normalised feature distillation (LAPTOP-Diff, Zhang et al. 2024, arXiv 2404.11098) as a method,
``method: kd``: retrain a layer-pruned network (``stepdistill prune``) to be its teacher again, as a many-step
diffusion model, before it is distilled to one step (``dmd.student_init``). Players: ``student`` (EMA).

For real (x0, c), t ~ the schedule's training law, eps ~ N(0, I), x_t = alpha_t x0 + sigma_t eps and labels c~
dropped to the null class with probability ``kd.cfg_dropout`` (so that the student keeps CFG)::

    L = w_task L_task + w_out L_outKD + w_feat L_featKD
    L_task   = || f_S(x_t, t, c~) - y(x0, eps, t) ||^2                  denoising loss (Ho et al. 2020, Eq. 14),
                                                                         y the native target (eps / v / x0)
    L_outKD  = || f_S(x_t, t, c~) - f_T(x_t, t, c~) ||^2                 output KD (teacher without CFG)
    L_featKD = sum_l E_b [ || F_S^l - F_T^l ||^2 / || F_T^l ||^2 ]       per-layer feature KD, each layer's
                                                                         term divided by the teacher feature's
                                                                         squared L2 norm (LAPTOP-Diff)

||.||^2 in L_task / L_outKD is the mean over elements (as the teacher was trained); in L_featKD the squared
L2 norms are per sample, so the ratio is scale-free: no layer dominates because its features are large
(LAPTOP-Diff's "normalized" feature distillation, against BK-SDM's plain sum). The features F^l are the outputs
of the blocks both networks keep, paired by the prune record's ``block_map`` (a down block's hidden state, the mid
block, an up block; a DiT's transformer blocks) and kept only where the shapes agree (after the deepest stage is
cut, the shallower down block loses its downsampler and the mid block runs at another resolution). Without a
prune record, blocks of the same name and shape are paired.

**A distilled student as the KD teacher** (``dmd.teacher`` a one- or few-step student, with
``dmd.allow_student_teacher``; the pruned folder made by ``stepdistill prune --model <that student>``): the pruned
network is retrained to be that student again, on the inputs the student is given, not on the diffusion's training
law. t is drawn from ``kd.timesteps`` (default: the student's own, e.g. [999]); at the first of them the input is
pure noise x_T = eps, as in the student's chain (DMD2's generator), and at later ones noised real data. Only the
output and feature terms apply (``kd.task_weight`` must be 0: the denoising loss at t = T regresses onto the data
mean), so the loss is L = w_out ||G_S(eps, T, c) - G_T(eps, T, c)||^2 + w_feat L_featKD: distillation of the
one-step map itself, one forward of each network per sample, no sampling chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..errors import ConfigError
from ..pipelines.sampling import make_scheduler, scheduler_sample, student_sample
from ..utils import class_balanced_labels
from .objective import Ctx, ObjectiveBase, Player, real_data_std


def _first(out):
    """A block's hidden state: down blocks return (hidden, skips), attention blocks may return a tuple."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


class FeatureTap:
    """Forward hooks that keep the outputs of named sub-modules of a network (the last call of each)."""

    def __init__(self, net: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        mods = dict(net.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ConfigError(f"kd: {type(net).__name__} has no module {missing[0]!r}")
        self.handles = [mods[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.out[name] = _first(output)
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.out = self.out, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def normalised_feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                            pairs: dict[str, str]) -> torch.Tensor:
    """L_featKD = sum_l mean_b ||F_S^l(b) - F_T^l(b)||^2 / ||F_T^l(b)||^2 over ``pairs`` {student name: teacher
    name}; norms per sample over all feature elements."""
    total = None
    for s_name, t_name in pairs.items():
        fs, ft = student[s_name].float(), teacher[t_name].float().detach()
        num = (fs - ft).flatten(1).pow(2).sum(1)                    # (B,)
        den = ft.flatten(1).pow(2).sum(1).clamp_min(1e-12)          # (B,)
        term = (num / den).mean()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def feature_pairs(student: Denoiser, teacher: Denoiser, candidates: dict[str, str], cond, shape) -> dict[str, str]:
    """The pairs of ``candidates`` whose outputs have the same shape (one probe forward of each network)."""
    s_tap = FeatureTap(student.backbone, list(candidates))
    t_tap = FeatureTap(teacher.backbone, sorted(set(candidates.values())))
    try:
        x = torch.zeros(1, *shape)
        t = torch.full((1,), float(teacher.schedule.num_train_timesteps // 2))
        with torch.no_grad():
            student.raw(x, t, cond)
            teacher.raw(x, t, cond)
        fs, ft = s_tap.take(), t_tap.take()
    finally:
        s_tap.remove(), t_tap.remove()
    return {s: t for s, t in candidates.items() if s in fs and t in ft and fs[s].shape == ft[t].shape}


def default_block_pairs(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Without a prune record: the block-level modules of the same name in both networks."""
    prefixes = ("down_blocks.", "up_blocks.", "transformer_blocks.")
    s_names = {n for n, _ in student.named_modules()
               if n == "mid_block" or (n.startswith(prefixes) and n.count(".") == 1)}
    t_names = {n for n, _ in teacher.named_modules()}
    return {n: n for n in sorted(s_names & t_names)}


class KDObjective(ObjectiveBase):
    """L = w_task L_task + w_out L_outKD + w_feat L_featKD (module docstring); player ``student``."""

    def __init__(self, teacher: Denoiser, student: Denoiser, kd: "KDConfig", optim, num_classes: int,
                 pairs: dict[str, str], scheduler_config: dict, shape, conds=None, data_std: float = 1.0,
                 timesteps: list[float] | None = None, student_teacher: bool = False):
        self.teacher, self.student, self.kd = teacher, student, kd
        # t: the schedule's training law, or these timesteps (a distilled KD teacher's own; the first pure noise)
        self.timesteps = [float(t) for t in (timesteps or [])]
        self.student_teacher = student_teacher
        self.players = {"student": Player.from_optim(student.backbone, optim, ema=True)}
        self.num_classes, self.pairs, self.scheduler_config = num_classes, pairs, scheduler_config
        self.shape, self.conds, self.data_std = tuple(shape), conds, data_std
        self._s_tap = FeatureTap(student.backbone, list(pairs)) if pairs and kd.feature_weight else None
        self._t_tap = FeatureTap(teacher.backbone, sorted(set(pairs.values()))) if self._s_tap else None

    def updates(self, step: int) -> list[str]:
        return ["student"]

    def _labels(self, labels: torch.Tensor, ctx: Ctx):
        drop = ctx.rand() < self.kd.cfg_dropout
        if self.conds is not None:  # a text bank: real captions, the empty prompt when dropped
            cond, null = self.conds.real_cond(labels), self.teacher.null_cond
            if isinstance(cond, dict) or null is None:
                return cond
            keep = ~drop.to(cond.device).view(-1, *[1] * (cond.ndim - 1))
            return torch.where(keep, cond, null.to(cond).expand_as(cond))
        if self.num_classes == 0:
            return None
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes), labels)

    def loss(self, player: str, ctx: Ctx):
        k, sch = self.kd, self.teacher.schedule
        x0, labels = ctx.real_batch()                                          # (B, C, H, W), (B,)
        cond = self._labels(labels, ctx)
        eps = ctx.randn(*x0.shape[1:])
        if self.timesteps:                                                     # a distilled student's inputs
            ki = ctx.randint(0, len(self.timesteps))                           # (B,)
            t = torch.tensor(self.timesteps, dtype=torch.float64)[ki]
            x_t = sch.add_noise(x0, eps, t)
            if self.student_teacher:                                           # x_T = eps at the chain's start
                x_t = torch.where((ki == 0).to(x_t.device).view(-1, *[1] * (x_t.ndim - 1)), eps.to(x_t), x_t)
        else:
            t = ctx.sample_t(sch, 0, sch.num_train_timesteps - 1)              # (B,)
            x_t = sch.add_noise(x0, eps, t)
        with torch.no_grad():
            f_t = self.teacher.raw(x_t, t, cond).float()
        feats_t = self._t_tap.take() if self._t_tap else {}
        f_s = self.student.raw(x_t, t, cond).float()
        feats_s = self._s_tap.take() if self._s_tap else {}
        target = sch.x0_eps_to_pred(x0, eps, t, self.student.prediction_type).float()
        task = F.mse_loss(f_s, target)
        out = F.mse_loss(f_s, f_t)
        feat = normalised_feature_loss(feats_s, feats_t, self.pairs) if feats_s else torch.zeros((), device=x0.device)
        loss = k.task_weight * task + k.output_weight * out + k.feature_weight * feat
        return loss, {"task_loss": task.item(), "output_kd": out.item(), "feature_kd": float(feat.detach())}

    def to(self, device):
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        s = self.student
        den = Denoiser(ema["student"], s.schedule, s.prediction_type, s.null_class, s.null_cond)
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(n, *self.shape, generator=g).to(device)
        if self.conds is not None:
            cond = self.conds.grid(n, device)
        else:
            cond = class_balanced_labels(n, self.num_classes).to(device) if self.num_classes else None
        if self.student_teacher:   # a few-step student: its own chain on the same noise
            return student_sample(den, self.timesteps, cond, noise, generator=g)
        sched = make_scheduler("ddim", self.scheduler_config)
        return scheduler_sample(den, sched, cond, self.kd.sample_steps, self.kd.guidance_scale, noise)


# -- building / export ---------------------------------------------------------------------------------------------
def build_kd(cfg, teacher: Denoiser | None = None, meta=None, data=None, text_bank=None):
    """Teacher and data as for DMD (trainers/setup.py); the student is ``kd.student`` (a pruned folder) as it is."""
    from ..models import load_denoiser, load_scheduler_config
    from ..pruning.folder import pruned_record
    from .setup import prepare

    if not cfg.kd.student:
        raise ConfigError("kd.student: the pruned model folder to retrain (stepdistill prune --out FOLDER)")
    s = prepare(cfg, teacher, meta, data, text_bank)
    init, _ = load_denoiser(cfg.kd.student, allow_pickle=cfg.dmd.allow_pickle)
    t = s.teacher
    student = Denoiser(init.backbone.train(), t.schedule, t.prediction_type, t.null_class, t.null_cond)
    shape = tuple(s.data.images.shape[1:])
    record = pruned_record(cfg.kd.student, cfg.dmd.allow_pickle) or {}
    candidates = record.get("block_map") or default_block_pairs(student.backbone, t.backbone)
    probe_cond = None
    if s.conds is not None:
        probe_cond = s.conds.grid(1, "cpu")
    elif s.num_classes:
        probe_cond = torch.zeros(1, dtype=torch.long)
    pairs = feature_pairs(student, t, candidates, probe_cond, shape)
    if cfg.kd.feature_weight and not pairs:
        raise ConfigError(f"kd.feature_weight: no block of {cfg.kd.student} has a teacher block of the same output "
                          "shape to distill from; set kd.feature_weight=0")
    own = list(s.meta.student_timesteps or []) if s.meta is not None else []
    if own and cfg.kd.task_weight:
        raise ConfigError(f"kd.task_weight: dmd.teacher {cfg.dmd.teacher} is a distilled student; the denoising loss "
                          "trains a many-step model (at its t = T it regresses onto the data mean): set "
                          "kd.task_weight=0 to distil the student's map with the output and feature terms")
    timesteps = list(cfg.kd.timesteps) or own
    T = t.schedule.num_train_timesteps
    bad = [x for x in timesteps if not 0 <= x < T]
    if bad:
        raise ConfigError(f"kd.timesteps: {bad[0]} is outside the teacher's [0, {T})")
    obj = KDObjective(t, student, cfg.kd, cfg.dmd.optim, s.num_classes, pairs,
                      load_scheduler_config(cfg.kd.student, None), shape, conds=s.conds,
                      data_std=real_data_std(s.data), timesteps=timesteps, student_teacher=bool(own))
    return obj, s.data, s.meta


def _ema(obj) -> dict[str, nn.Module]:
    return {"student": obj.student.backbone}


def export_kd(ema: dict[str, nn.Module], obj, cfg, meta, out):
    """The retrained student as a many-step model folder like ``kd.student``'s (its scheduler, text parts and prune
    record), with the KD run in ``stepdistill.json`` ``extra.kd``."""
    from ..models import ModelMeta, _resolve
    from ..pruning.folder import fill_like
    from .export import _cfg_dict

    base = Path(_resolve(cfg.kd.student, cfg.dmd.allow_pickle))
    smeta = ModelMeta.load(base) or meta
    kd = {"teacher": cfg.dmd.teacher, "student": cfg.kd.student, "max_steps": cfg.train.max_steps,
          "feature_pairs": obj.pairs, "config": _cfg_dict(cfg)}
    fill_like(Path(out), base, ema["student"], {"kd": kd}, smeta)
    _write_card(Path(out), smeta, cfg)
    return out


def _write_card(out: Path, meta, cfg) -> None:
    from ..pruning.folder import describe

    rec = (meta.extra or {}).get("pruned")
    lines = [f"# {out.name}", "",
             "A layer-pruned diffusion model retrained with normalised feature distillation (LAPTOP-Diff, "
             f"Zhang et al. 2024; `stepdistill distill method=kd`) from the teacher `{cfg.dmd.teacher}`: "
             f"a run of {cfg.train.max_steps} steps (this folder may hold one of its checkpoints) at batch "
             f"{cfg.train.batch_size}, weights task {cfg.kd.task_weight:g}, "
             f"output KD {cfg.kd.output_weight:g}, feature KD {cfg.kd.feature_weight:g}.", ""]
    if rec:
        lines += [describe(rec), ""]
    if meta is not None and meta.student_timesteps:
        lines += [f"It is a distilled student of the same timesteps ({meta.student_timesteps}) as its KD teacher, "
                  "made smaller: `stepdistill sample --model <folder>`; it can continue as "
                  "`stepdistill distill dmd.student_init=<folder>`.", ""]
    else:
        lines += ["It samples as a many-step model (`stepdistill sample --model <folder>`) and is the start of a "
                  "one-step student: `stepdistill distill dmd.student_init=<folder>`.", ""]
    (out / "README.md").write_text("\n".join(lines))


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------------------
@dataclass
class KDConfig:
    """Normalised feature distillation of a pruned student (``method: kd``; stepdistill/trainers/kd.py). The teacher
    is ``dmd.teacher``, the optimizer ``dmd.optim``."""
    student: str = ""              # the pruned model folder (stepdistill prune --out)
    task_weight: float = 1.0       # the denoising loss on real data
    output_weight: float = 1.0     # output KD
    feature_weight: float = 1.0    # normalised per-block feature KD
    cfg_dropout: float = 0.1       # labels dropped to the null class (keeps CFG)
    timesteps: list[float] = field(default_factory=list)  # train at these t only; empty: the schedule's law, or the
                                   # student's own when dmd.teacher is a distilled student (its first: pure noise)
    sample_steps: int = 50         # sample grids: DDIM steps
    guidance_scale: float = 2.0    # sample grids: CFG scale


def kd_makes_a_student(cfg) -> bool:
    """A KD run whose ``dmd.teacher`` is a distilled student exports a student of its timesteps: ``stepdistill
    curve`` scores its checkpoints (two forward passes per sample and step: the student's and the teacher's)."""
    from ..models import load_meta

    meta = load_meta(cfg.dmd.teacher, cfg.dmd.allow_pickle)   # None when unreachable: curve refuses the run
    return bool(meta is not None and meta.student_timesteps)


def check_kd(cfg, check) -> None:
    k = cfg.kd
    check(bool(k.student), "kd.student", "the pruned model folder to retrain (stepdistill prune --out FOLDER)")
    for name in ("task_weight", "output_weight", "feature_weight"):
        check(getattr(k, name) >= 0, f"kd.{name}", "must be >= 0")
    check(k.task_weight + k.output_weight + k.feature_weight > 0, "kd.task_weight", "at least one weight must be > 0")
    check(0 <= k.cfg_dropout < 1, "kd.cfg_dropout", "must lie in [0, 1)")
    check(k.sample_steps >= 1, "kd.sample_steps", "must be >= 1")
    check(all(isinstance(x, (int, float)) and x >= 0 for x in k.timesteps), "kd.timesteps",
          "must be a list of model timesteps >= 0, e.g. [999]")
    check(cfg.dmd.lora_rank == 0, "dmd.lora_rank", "method kd trains the whole pruned network (no LoRA)")


CARD = ("Normalised feature distillation (LAPTOP-Diff; Zhang et al. 2024)",
    "A layer-pruned copy of the teacher retrained with the denoising loss, output distillation and per-layer "
    "feature distillation normalised by the teacher feature's norm.")


def _method():
    from ..config import SharedDistillConfig
    from ..methods import Method

    return Method("kd", build=build_kd, ema_modules=_ema, export=export_kd,
                  pipeline="StepDistillTeacherPipeline", curve=kd_makes_a_student, passes=lambda cfg: 2,
                  description="LAPTOP-Diff normalised feature distillation of a pruned teacher (many-step)",
                  sections={"dmd": SharedDistillConfig, "kd": KDConfig}, checks=check_kd, card=CARD)


METHOD = _method()
