"""Pairwise Sample Optimization (PSO): tuning an already distilled few-step model.

* PSO (Miao et al. 2024, "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample
  Optimization", ICLR 2025, Sec. 3): fine-tuning a distilled model with the plain diffusion loss
  makes its few-step samples blurry; PSO instead raises the model's likelihood of target images
  *relative to* reference images sampled from the distilled model itself (same conditions),
  measured against a frozen copy of the initial model. References are drawn once (offline) or
  re-drawn from the current model (online); with preference data (chosen, rejected) the rejected
  image is the reference.
* Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
  Optimization", Eq. 14): the DPO loss for diffusion models, with the intractable chain
  likelihood bounded by per-step denoising errors on forward-noised images.

The distilled model's own chain (``student_timesteps`` t_0 > ... > t_{K-1}; see
:func:`~stepdistill.pipelines.sampling.student_sample`) is a Markov chain with Gaussian
transitions::

    x_{t_0} ~ N(0, I)
    p_theta(x_{t_{k+1}} | x_{t_k}) = N(alpha_{k+1} G_theta(x_{t_k}, t_k, c), sigma_{k+1}^2 I)

so, for x_{t_{k+1}} = alpha_{k+1} x + sigma_{k+1} eps' (the image x forward-noised; expectation over
eps'), E log p_theta(x_{t_{k+1}} | x_{t_k}) = -alpha_{k+1}^2 / (2 sigma_{k+1}^2) |G_theta(x_{t_k}) - x|_2^2 + const
(the last step outputs x0 itself: a Gaussian decoder of fixed variance). As in Diffusion-DPO, the
chain's posterior is replaced by the forward process q(x_{t_k} | x) (their Eq. 14: T E_{t ~ U} over
all T steps becomes the exact sum over the model's K steps; eps-space errors become x0-space errors,
a per-step SNR factor absorbed in w_k). The likelihood surrogate of an image x with condition c::

    l_theta(x) = - sum_k w_k || G_theta(x_{t_k}, t_k, c) - x ||^2,   x_{t_k} = alpha_{t_k} x + sigma_{t_k} eps_k

with ``||v||^2 = mean_d v_d^2`` (mean over the D = C*H*W dimensions, as Diffusion-DPO's code) and
``k`` over ``pso.timesteps`` (default: the model's own ``student_timesteps``). The weights ``w_k``
(``pso.weights``, default uniform ``1/K``) stand for the precisions D alpha_{k+1}^2 / (2 sigma_{k+1}^2) of
the transitions out of step k, up to one common factor (which only rescales beta). The PSO loss for a pair (x^tgt, x^ref) with condition c::

    Delta(x) = l_theta(x) - l_ref(x) = sum_k w_k ( ||G_ref(x_{t_k}) - x||^2 - ||G_theta(x_{t_k}) - x||^2 )
    L = - log sigmoid( beta * [ Delta(x^tgt) - Delta(x^ref) ] )                            (PSO)

G_ref is a frozen copy of the *initial* model; the same eps_k (and t_k) serve theta and ref, and
target and reference of a pair (variance reduction, as Diffusion-DPO's code). At initialisation
(theta == ref) the argument is 0 and L = log 2 exactly. dL/dtheta = -beta sigmoid(-beta M)
dM/dtheta: a step raises the relative likelihood of targets and lowers that of references until
the margin M saturates the sigmoid (the regulariser that keeps the few-step ability).

The pure-noise step (``pso.likelihood``). For the first step t_0 of a model that samples from noise
(alpha_{t_0}^2 < 1e-3, e.g. t_0 = 999), x_{t_0} = alpha x + sigma eps carries no information about x, so the
forward-process surrogate ||G(x_{t_0}) - x||^2 compares x with G's output for an *unrelated* input: the
margin is then linear in G (``2 <G, x^tgt - x^ref>``), its gradient a shift of every sample along the mean
difference of targets and references, and a one-step model drifts off its data (observed on Animal-MNIST:
samples turn to noise within 50 steps). ``likelihood: kde`` (``auto`` picks it for such a t_0) uses the
model's own posterior over its input instead: with m draws z_j ~ N(0, I) (``pso.kde_samples``) and the
decoder N(G(z_j), (D tau / 2) I) (D = C*H*W), the chain's likelihood p(x) = E_z N(x; G(z), .) is estimated by::

    err_0(x) = -tau log (1/m) sum_j exp(-||G_theta(z_j, t_0, c) - x||^2 / tau)     (tau = ``pso.kde_tau``)

a soft-min distance from x to the model's samples (tau -> 0: the nearest sample, as IMLE, Li & Malik 2018;
tau -> inf: the mean distance, the forward surrogate). Its gradient moves the samples *nearest* to each
image, so targets pull samples toward themselves and references push theirs away, without averaging
(blurring) over unrelated images. The same z_j serve theta and the frozen model, target and reference.

Target anchor (``pso.target_anchor`` = lambda, DPO-Positive, Pal et al. 2024, "Smaug", Eq. 3): DPO's margin
can grow while *both* likelihoods fall (the references faster), the known failure of DPO on close pairs;
``margin -= lambda sum_k w_k max(0, err_theta(x^tgt) - err_ref(x^tgt))`` leaves no margin to a model whose
likelihood of the targets falls below the initial model's.

Naive baseline (:class:`NaiveFinetuneObjective`, the comparison PSO's Fig. 1 makes): the plain
denoising loss on the targets at the same timesteps and weights, L = - l_theta(x^tgt).

Target data: a dataset (``data`` section, or ``pso.target``) with an optional transform
(``pso.target_transform: invert``) and class subset (``pso.target_classes``), or preference pairs
(``pso.pairs``; :func:`load_preference_pairs`). Class-conditional and unconditional models are
supported (text-conditional ones not yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..conditioning import ClassLabels
from ..config import DistillConfig, OptimConfig, normalise
from ..data import ArrayDataset
from ..denoiser import Denoiser
from ..models import ModelMeta, load_denoiser
from ..pairs import weights_digest
from ..pipelines.sampling import grid_sample, student_sample
from ..tensor_cache import cached_tensors
from .checkpoint import latest_checkpoint
from .objective import Ctx, ObjectiveBase, Player, real_data_std, update_seed
from .losses import pso_loss
from .pso_data import build_target, load_preference_pairs

REF_CHUNK = 64              # reference sampling batch (fixed: the draws do not depend on it changing)
REF_SEED_OFFSET = 7_770_001  # reference draws use their own generators, apart from the training batches
ONLINE_REF_FILE = "pso_reference.safetensors"
PURE_NOISE_SNR = 1e-3       # alpha_t^2 below this: x_t carries (almost) no information about x


# -- the likelihood terms (the loss itself: losses.pso_loss) ---------------------------------------
def squared_errors(den: Denoiser, x: torch.Tensor, cond, timesteps: list[float], eps: torch.Tensor) -> torch.Tensor:
    """(B, K): ``||den(add_noise(x, eps[:, k], t_k), t_k, c) - x||^2`` (mean over dims), one batched call.

    ``x`` (B, C, H, W); ``eps`` (B, K, C, H, W); ``cond`` None or (B,) labels."""
    B, K = x.shape[0], len(timesteps)
    tt = torch.tensor([float(t) for t in timesteps], device=x.device).repeat_interleave(B)      # (K*B,)
    xk = x.unsqueeze(0).expand(K, *x.shape).reshape(K * B, *x.shape[1:])
    ek = eps.transpose(0, 1).reshape(K * B, *x.shape[1:])
    x_t = den.schedule.add_noise(xk, ek, tt)
    ck = None if cond is None else cond.repeat(K)
    x0 = den(x_t, tt, ck)
    return (x0.float() - xk.float()).pow(2).flatten(1).mean(1).reshape(K, B).t()


def model_samples(den: Denoiser, cond, t0: float, z: torch.Tensor) -> torch.Tensor:
    """(B, m, D): the model's outputs ``G(z_j, t_0, c_b)`` for noise draws ``z`` (B, m, C, H, W), ``cond`` None or (B,)."""
    B, m = z.shape[:2]
    tt = torch.full((B * m,), float(t0), device=z.device)
    ck = None if cond is None else cond.repeat_interleave(m)
    return den(z.reshape(B * m, *z.shape[2:]), tt, ck).reshape(B, m, -1)


def softmin_distance(g: torch.Tensor, x: torch.Tensor, tau: float) -> torch.Tensor:
    """(B,): ``-tau log (1/m) sum_j exp(-||g_j - x||^2 / tau)`` for samples ``g`` (B, m, D) and images ``x`` (B, ...)."""
    d = (g.float() - x.reshape(x.shape[0], 1, -1).float()).pow(2).mean(-1)     # (B, m)
    return -tau * (torch.logsumexp(-d / tau, dim=1) - math.log(g.shape[1]))


def softmin_errors(den: Denoiser, x: torch.Tensor, cond, t0: float, z: torch.Tensor, tau: float) -> torch.Tensor:
    """(B,): the pure-noise step's error term ``-tau log (1/m) sum_j exp(-||G(z_j, t_0, c) - x||^2 / tau)``.

    ``x`` (B, C, H, W); ``z`` (B, m, C, H, W) noise draws (the same for every model and for target and
    reference of a pair); ``cond`` None or (B,) labels. See "The pure-noise step" in the module docstring."""
    return softmin_distance(model_samples(den, cond, t0, z), x, tau)


# -- reference samples ---------------------------------------------------------------------
@torch.no_grad()
def draw_references(den: Denoiser, timesteps: list[float], labels: torch.Tensor | None, shape: tuple,
                    seed: int) -> torch.Tensor:
    """Samples of ``den``'s own few-step chain for ``labels`` (N,) (None: unconditional), deterministic in ``seed``."""
    n = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *shape, generator=g)
    dev = next(den.parameters()).device
    was_training = den.training
    den.eval()
    try:
        out = [student_sample(den, timesteps, None if labels is None else labels[i:i + REF_CHUNK].to(dev),
                              noise[i:i + REF_CHUNK].to(dev), generator=g).cpu()
               for i in range(0, n, REF_CHUNK)]
    finally:
        den.train(was_training)
    return torch.cat(out).float()


def reference_labels(classes: list[int], n: int) -> torch.Tensor:
    """Class-balanced labels: ``n`` rounded up to a multiple of ``len(classes)`` (every class gets references),
    sorted (each class's references are contiguous)."""
    n = -(-n // len(classes)) * len(classes)
    return torch.tensor(classes, dtype=torch.long)[torch.arange(n) % len(classes)].sort().values


def offline_references(den: Denoiser, timesteps: list[float], classes: list[int] | None, n: int, shape: tuple,
                       seed: int, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """Reference samples of the initial model, cached as safetensors under ``$STEPDISTILL_CACHE/pso_refs``.

    The key covers the model weights, prediction type, noise schedule, sampling timesteps, classes, count,
    shape and seed. Returns (images (N, C, H, W), labels (N,), cache path, cache hit)."""
    labels = reference_labels(classes or [0], n)
    n = labels.shape[0]
    sched = den.schedule.to_config() if hasattr(den.schedule, "to_config") else {}
    key = {"w": weights_digest(den.backbone), "pt": den.prediction_type, "sched": sched,
           "ts": [float(t) for t in timesteps], "classes": classes, "n": n, "shape": list(shape), "seed": seed, "v": 1}
    d, path, hit = cached_tensors(
        "pso_refs", key, lambda: {"images": draw_references(den, timesteps, labels if classes is not None else None,
                                                            shape, seed), "labels": labels},
        prefix="refs_", cache=cache)
    return d["images"], d["labels"], path, hit


class ReferencePool:
    """Reference images grouped by condition; :meth:`pick` draws one of the same class per target."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0):
        order = torch.argsort(labels, stable=True)
        self.images, self.labels, self.step = images[order], labels[order], step
        m = int(self.labels.max()) + 1
        self.count = torch.bincount(self.labels, minlength=m)
        self.start = torch.cumsum(self.count, 0) - self.count

    def pick(self, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``labels`` (B,) conditions, ``u`` (B,) uniforms in [0, 1) -> (B, C, H, W) references."""
        labels = labels.cpu()
        if int(labels.max()) >= len(self.count) or (self.count[labels] == 0).any():
            raise ValueError("no reference samples for a target class (reference pool built for other classes)")
        cnt = self.count[labels]
        idx = self.start[labels] + (u.cpu() * cnt).long().clamp(max=cnt - 1)
        return self.images[idx]


# -- objectives ----------------------------------------------------------------------------
class _TuneObjective(ObjectiveBase):
    """Shared by PSO and the naive baseline: one player ``generator`` (the tuned model, EMA), targets."""

    def __init__(self, model: Denoiser, cfg: PSOConfig, sample_timesteps: list[float], target: ArrayDataset,
                 conditional: bool, seed: int = 0):
        self.student, self.cfg, self.seed = model, cfg, seed
        self.sample_timesteps = [float(t) for t in sample_timesteps]
        self.timesteps = [float(t) for t in (cfg.timesteps or sample_timesteps)]
        T = model.schedule.num_train_timesteps
        if any(not 0 <= t < T for t in self.timesteps):
            raise ValueError(f"pso.timesteps {self.timesteps} must lie in [0, {T})")
        w = cfg.weights or [1.0 / len(self.timesteps)] * len(self.timesteps)
        if len(w) != len(self.timesteps):
            raise ValueError(f"pso.weights needs one weight per timestep ({len(self.timesteps)}), got {len(w)}")
        self.weights = torch.tensor(w, dtype=torch.float32)
        # the pure-noise step's likelihood ("The pure-noise step"): columns of the (B, K) error matrix that use it
        t0 = self.sample_timesteps[0]
        pure_noise = float(model.schedule.alpha(torch.tensor([t0])).reshape(-1)[0]) ** 2 < PURE_NOISE_SNR
        use_kde = cfg.likelihood == "kde" or (cfg.likelihood == "auto" and pure_noise)
        self.kde_columns = [k for k, t in enumerate(self.timesteps) if use_kde and t == t0]
        self.target, self.conditional = target, conditional
        self.shape = tuple(target.images.shape[1:])
        classes = sorted(set(target.labels.tolist())) if conditional else None
        self.classes = classes
        # grid conditions (sample grids, collapse guards) cycle over the target's classes; none without classes
        self.conds = ClassLabels(target.num_classes if conditional and classes else 0, classes or None)
        self.data_std = real_data_std(target)  # normalises the collapse guard's diversity
        model.backbone.train()
        self.players = {"generator": Player.from_optim(model.backbone, cfg.optim, ema=True)}

    def updates(self, step: int) -> list[str]:
        return ["generator"]

    def _targets(self, ctx: Ctx):
        idx = ctx.randint(0, len(self.target)).cpu()
        x = self.target.images[idx].to(ctx.device)
        y = self.target.labels[idx].to(ctx.device) if self.conditional else None
        return idx, x, y

    def _eps(self, ctx: Ctx) -> torch.Tensor:
        return ctx.randn(len(self.timesteps), *self.shape)          # (B, K, C, H, W)

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        return grid_sample(self.student, ema["generator"], self.sample_timesteps, self.conds.grid(n, device),
                           self.shape, n, device)



class PSOObjective(_TuneObjective):
    """PSO (module docstring) as an Objective for :class:`~stepdistill.trainers.core.Trainer`.

    Args:
        model: the distilled few-step model G_theta (trainable; a frozen copy becomes G_ref).
        cfg: :class:`~stepdistill.config.PSOConfig` (beta, timesteps, weights, mode, refresh_every, ...).
        sample_timesteps: the model's own sampling chain (its ``student_timesteps``).
        target: target images with the model's class labels (:func:`build_target`); with ``pairs`` the chosen images.
        conditional: class-conditional model (labels are its conditions) or unconditional.
        rejected: (N, C, H, W) rejected images aligned with ``target`` (preference pairs), or None.
        references: (images, labels) drawn offline (:func:`offline_references`), or None (online mode, pairs).
        seed: ``train.seed`` (online reference draws: seed of step s is ``update_seed(seed + offset, s, 0)``).
        output_dir: run folder; the online pool is saved with each checkpoint for an exact resume.
    """

    def __init__(self, model: Denoiser, cfg: PSOConfig, sample_timesteps: list[float], target: ArrayDataset,
                 conditional: bool, rejected: torch.Tensor | None = None, references=None, seed: int = 0,
                 output_dir: str | Path | None = None):
        super().__init__(model, cfg, sample_timesteps, target, conditional, seed)
        self.reference = Denoiser(copy.deepcopy(model.backbone), model.schedule, model.prediction_type,
                                  model.null_class, model.null_cond)
        self.reference.backbone.eval().requires_grad_(False)
        self.rejected = rejected
        self.mode = "pairs" if rejected is not None else cfg.mode
        self.pool: ReferencePool | None = None
        if references is not None:
            self.pool = ReferencePool(*references)
        elif self.mode == "offline":
            raise ValueError("offline PSO needs reference samples (offline_references)")
        self.output_dir = Path(output_dir) if output_dir else None
        self.refreshes: list[int] = []   # steps at which the online pool was (re)drawn

    def to(self, device):
        self.reference.to(device)
        return self

    # -- online references -------------------------------------------------------------------
    def online_seed(self, step: int) -> int:
        return update_seed(self.seed + REF_SEED_OFFSET, step, 0)

    def draw_online(self, step: int) -> ReferencePool:
        """Reference pool from the CURRENT model (the live generator weights), deterministic in (seed, step)."""
        labels = reference_labels(self.classes or [0], self.cfg.num_reference)
        images = draw_references(self.student, self.sample_timesteps, labels if self.conditional else None,
                                 self.shape, self.online_seed(step))
        self.refreshes.append(step)
        return ReferencePool(images, labels, step)

    def refresh(self, step: int) -> None:
        """Online mode: redraw at steps 0, R, 2R, ... (R = ``pso.refresh_every``); after a resume in
        between, reload the pool saved with the checkpoint (drawn at the last refresh step)."""
        R = self.cfg.refresh_every
        r = step - step % R
        if self.pool is not None and self.pool.step == r:
            return
        if step != r:
            loaded = self._load_saved_pool(r)
            if loaded is not None:
                self.pool = loaded
                return
            print(f"WARNING: pso: no saved online reference pool for step {r}; redrawing at step {step} "
                  "from the current model (the resumed run differs from an uninterrupted one)", file=sys.stderr)
        self.pool = self.draw_online(r if step == r else step)
        self.pool.step = r

    def on_checkpoint(self, trainer, folder: Path) -> None:
        """Trainer hook: keep the online pool with the checkpoint (exact resume)."""
        if self.mode == "online" and self.pool is not None:
            save_file({"images": self.pool.images.contiguous(), "labels": self.pool.labels.contiguous(),
                       "step": torch.tensor([self.pool.step])}, str(Path(folder) / ONLINE_REF_FILE))

    def _load_saved_pool(self, r: int) -> ReferencePool | None:
        if self.output_dir is None:
            return None
        latest = latest_checkpoint(self.output_dir)
        if latest is None or not (latest / ONLINE_REF_FILE).exists():
            return None
        d = load_file(str(latest / ONLINE_REF_FILE))
        if int(d["step"][0]) != r:
            return None
        return ReferencePool(d["images"], d["labels"], r)

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, player: str, ctx: Ctx):
        if self.mode == "online":
            self.refresh(ctx.step)
        idx, x_tgt, y = self._targets(ctx)
        if self.rejected is not None:
            x_ref = self.rejected[idx].to(ctx.device)
        else:
            u = ctx.rand()
            x_ref = self.pool.pick(y if y is not None else torch.zeros(len(idx), dtype=torch.long), u).to(ctx.device)
        eps = self._eps(ctx)
        B = x_tgt.shape[0]
        x = torch.cat([x_tgt, x_ref])
        c = None if y is None else torch.cat([y, y])
        e = torch.cat([eps, eps])                                      # same noise for target and reference
        err_theta, err_ref = self._errors(ctx, x, c, e)                # (2B, K) each
        loss, margin = pso_loss(err_theta[:B], err_ref[:B], err_theta[B:], err_ref[B:], self.weights, self.cfg.beta,
                                self.cfg.target_anchor)
        w = self.weights.to(err_theta)
        logs = {"pso_loss": loss.item(), "pso_margin": margin.mean().item(),
                "pso_acc": (margin > 0).float().mean().item(),
                "pso_delta_tgt": ((err_ref[:B] - err_theta[:B].detach()) @ w).mean().item(),
                "pso_delta_ref": ((err_ref[B:] - err_theta[B:].detach()) @ w).mean().item(),
                "err_tgt": (err_theta[:B].detach() @ w).mean().item(),
                "err_ref": (err_theta[B:].detach() @ w).mean().item()}
        return loss, logs


    def _errors(self, ctx: Ctx, x: torch.Tensor, c, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B, K) errors of the tuned and the frozen model for [targets; references]: forward-process squared
        errors, with the pure-noise step's soft-min errors in ``self.kde_columns``."""
        fwd = [k for k in range(len(self.timesteps)) if k not in self.kde_columns]
        B2 = x.shape[0]
        err_theta = x.new_zeros(B2, len(self.timesteps))
        err_ref = x.new_zeros(B2, len(self.timesteps))
        if fwd:
            ts = [self.timesteps[k] for k in fwd]
            err_theta[:, fwd] = squared_errors(self.student, x, c, ts, e[:, fwd])
            with torch.no_grad():
                err_ref[:, fwd] = squared_errors(self.reference, x, c, ts, e[:, fwd])
        if self.kde_columns:
            # target and reference of a pair share the condition: one set of samples serves both halves
            B = B2 // 2
            z = ctx.randn(self.cfg.kde_samples, *self.shape)                       # (B, m, C, H, W)
            t0, tau, cb = self.sample_timesteps[0], self.cfg.kde_tau, None if c is None else c[:B]
            g_theta = model_samples(self.student, cb, t0, z)                        # (B, m, D)
            with torch.no_grad():
                g_ref = model_samples(self.reference, cb, t0, z)
            e_t = torch.cat([softmin_distance(g_theta, x[:B], tau), softmin_distance(g_theta, x[B:], tau)])
            e_r = torch.cat([softmin_distance(g_ref, x[:B], tau), softmin_distance(g_ref, x[B:], tau)])
            for k in self.kde_columns:
                err_theta[:, k], err_ref[:, k] = e_t, e_r
        return err_theta, err_ref


class NaiveFinetuneObjective(_TuneObjective):
    """Naive baseline: the denoising loss on the targets at the model's timesteps,
    ``L = sum_k w_k ||G_theta(x_{t_k}, t_k, c) - x||^2`` (= -l_theta(x^tgt); no reference, no anchor)."""

    def loss(self, player: str, ctx: Ctx):
        _, x, y = self._targets(ctx)
        err = squared_errors(self.student, x, y, self.timesteps, self._eps(ctx))   # (B, K)
        loss = (err @ self.weights.to(err)).mean()
        return loss, {"naive_loss": loss.item(), "err_tgt": loss.item()}


# -- building from a config ------------------------------------------------------------------
def build_pso(cfg: DistillConfig, model: Denoiser | None = None, meta: ModelMeta | None = None, data=None):
    """(objective, target data, meta) for ``method: pso | pso_naive`` (called by :func:`build`).

    ``model``/``meta``: bring a loaded few-step :class:`Denoiser` instead of ``pso.model``; ``data``: a
    target ArrayDataset instead of ``pso.target`` / ``data.name``. The returned ``meta`` carries the
    model's ``student_timesteps`` (exported unchanged)."""
    normalise(cfg)  # a config built in Python: pso.naive: true means method: pso_naive (as load_config does)
    naive = cfg.method == "pso_naive"
    p = cfg.pso
    if model is None:
        model, meta = load_denoiser(p.model, allow_pickle=p.allow_pickle)
    meta = copy.deepcopy(meta) if meta is not None else ModelMeta(prediction_type=model.prediction_type,
                                                                   conditioning="none")
    if meta.conditioning == "text":
        raise ValueError(f"pso.model {p.model}: text-conditional models are not supported by PSO yet")
    ts = [float(t) for t in (p.model_timesteps or meta.student_timesteps or [])]
    if not ts:
        raise ValueError(f"pso.model {p.model} has no student_timesteps (stepdistill.json); set pso.model_timesteps "
                         "to its few-step sampling chain, e.g. [999] for a one-step model")
    T = model.schedule.num_train_timesteps
    if any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"pso.model_timesteps {ts} must be strictly decreasing in [0, {T})")
    meta.student_timesteps = ts
    conditional = meta.conditioning == "class"
    rejected = None
    if p.pairs:
        names = list(meta.class_names) if conditional else []
        chosen, rejected, labels = load_preference_pairs(p.pairs, cfg.data.resolution, cfg.data.channels, names)
        target = ArrayDataset(chosen, labels, names or ["all"])
    else:
        target = build_target(cfg, meta, data)
    _check_shape(model, target, cfg)
    if naive:
        return NaiveFinetuneObjective(model, p, ts, target, conditional, cfg.train.seed), target, meta
    refs = None
    if rejected is None and p.mode == "offline":
        classes = sorted(set(target.labels.tolist())) if conditional else None
        imgs, labels, path, hit = offline_references(model, ts, classes, p.num_reference,
                                                     tuple(target.images.shape[1:]), cfg.train.seed)
        refs = (imgs, labels)
    obj = PSOObjective(model, p, ts, target, conditional, rejected=rejected, references=refs, seed=cfg.train.seed,
                       output_dir=cfg.output_dir)
    if refs is not None:
        obj.reference_cache, obj.reference_cache_hit = path, hit
    return obj, target, meta


def _check_shape(model: Denoiser, target: ArrayDataset, cfg: DistillConfig) -> None:
    try:
        ch, size, _ = model.sample_shape
    except ValueError:   # a custom backbone without a sample_shape: nothing to check against
        return
    C, H, W = target.images.shape[1:]
    if (H, W) != (size, size):
        raise ValueError(f"data.resolution: target images are {H}x{W} but the model samples {size}x{size}")
    if C != ch:
        raise ValueError(f"data.channels: target images have {C} channels but the model has {ch}")


# -- the methods (stepdistill/methods.py) -----------------------------------------------------------------
def build(cfg: DistillConfig, teacher: Denoiser | None = None, meta: ModelMeta | None = None, data=None,
          text_bank=None):
    """``teacher``: the distilled model to tune (instead of ``pso.model``)."""
    return build_pso(cfg, model=teacher, meta=meta, data=data)


# -- the method's config section, checks and card (its one home; stepdistill/methods.py) ----------------
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


def check_pso(cfg: DistillConfig, check) -> None:
    """``method: pso | pso_naive`` (trainers/pso.py; :func:`normalise` has made the two spellings one)."""
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


def normalise_pso(cfg) -> None:
    """``pso.naive: true`` and ``method: pso_naive`` both mean the naive baseline; exports record ``pso_naive``."""
    if cfg.pso.naive or cfg.method == "pso_naive":
        cfg.method, cfg.pso.naive = "pso_naive", True


PSO_CARD = ("PSO (Pairwise Sample Optimization; Miao et al., ICLR 2025)",
    "An already distilled few-step model is tuned toward target images with a Diffusion-DPO-style "
    "pairwise loss: its likelihood (denoising error at its own timesteps) of target images rises relative"
    " to reference images sampled from the model itself, measured against a frozen copy of the initial "
    "model, so the few-step ability is kept.")

PSO_NAIVE_CARD = ("Naive fine-tuning of a distilled model (PSO's baseline)",
    "An already distilled few-step model is fine-tuned with the plain denoising loss on target images at "
    "its own timesteps (Miao et al., 2025 report that this blurs few-step samples).")


def export_tuned(ema: dict, obj, cfg: DistillConfig, meta, out: Path) -> Path:
    """A tuned distilled model (PSO: ``pso.model`` fine-tuned): its own chain, its teacher and its base model
    recorded in ``stepdistill.json``."""
    from .export import export_student

    base = cfg.pso.model
    extra = {"teacher": (meta.extra or {}).get("teacher", base), "base_model": base}
    return export_student(ema["generator"], cfg, meta, out, schedule=obj.student.schedule, base=base,
                          timesteps=list(meta.student_timesteps), extra=extra)


def _methods():
    from ..methods import Method
    from .dmd_method import generator_ema

    kw = dict(build=build, ema_modules=generator_ema, export=export_tuned, sections={"pso": PSOConfig},
              checks=check_pso, normalise=normalise_pso)
    return (Method("pso", description="PSO (Miao et al. 2024): tune a distilled model with pairwise preferences",
                   card=PSO_CARD, **kw),
            Method("pso_naive", description="naive tuning baseline: a denoising loss on the targets",
                   card=PSO_NAIVE_CARD, **kw))


PSO_METHOD, PSO_NAIVE_METHOD = _methods()
