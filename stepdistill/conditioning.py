"""Conditioning distributions for distillation: which conditions the student is trained on.

DMD-style trainers draw a condition ``c`` for every generator sample (DMD2, Yin et al. 2024: the
student is trained on the prompt distribution it will serve; data-free apart from the GAN term).
Class-conditional teachers use :class:`ClassLabels` (uniform over all classes, or over one student's
part of them in MSD, or over a tuning target's classes in PSO).
Text-conditional teachers (SD3, Flux, ``UNet2DConditionModel``, PixArt, custom) use a
:class:`TextEmbeddingBank`: a fixed set of N prompt embeddings computed once with the teacher's
own text encoder(s) (the encoders are not needed during training), drawn uniformly by index.

A sampler implements::

    __call__(ctx) -> cond          # (B,) labels | (B, L, D) | {"emb": (B, L, D), "pooled": (B, P)}
    grid(n, device) -> cond        # fixed conditions for the periodic sample grids
    real_cond(labels) -> cond      # condition of real data for the GAN's real branch
    index(idx, device) -> cond     # conditions of stored indices (DMD's ODE pairs: class labels / prompt indices)
    num_classes: int               # 0 for text banks

Real data for a text teacher is a set of (latent, prompt) pairs: give ``build_method`` an
``ArrayDataset`` whose ``labels`` are indices into the bank (a *bank-aligned* real set); the GAN
real branch then uses ``bank[labels]``. Without such pairs, train with ``dmd.gan=false``.
"""
from __future__ import annotations

import torch

GRID_CONDITIONS = 10  # sample grids cycle over the first 10 prompts (a column per prompt, as classes)


class ClassLabels:
    """Class labels as conditions (the protocol above): uniform over ``classes`` (default: all
    ``num_classes``), grids cycling over them, real data conditioned on its own labels.
    ``num_classes = 0`` is an unconditional model (every condition None)."""

    def __init__(self, num_classes: int, classes: list[int] | None = None):
        self.num_classes = int(num_classes)
        self.classes = torch.tensor(classes, dtype=torch.long) if classes is not None else None

    def __call__(self, ctx):
        if self.num_classes <= 0:
            return None
        if self.classes is None:
            return ctx.randint(0, self.num_classes)
        return self.classes.to(ctx.device)[ctx.randint(0, len(self.classes))]

    def grid(self, n: int, device):
        if self.num_classes <= 0:
            return None
        if self.classes is None:
            return (torch.arange(n) % self.num_classes).to(device)
        return self.classes[torch.arange(n) % len(self.classes)].to(device)

    def index(self, idx: torch.Tensor, device=None):
        """Conditions of stored indices (DMD's ODE pairs): the labels themselves, or None when unconditional."""
        return idx.to(device) if self.num_classes > 0 else None

    def real_cond(self, labels: torch.Tensor):
        """Condition of real data (GAN real branch): its labels, or None when unconditional."""
        return labels if self.num_classes > 0 else None


def class_index(c, names) -> int:
    """One class label -> its index: a name in ``names``, an index, or an index written as a string ("3").
    The one label parser of pipelines, the CLI, the demo and PSO (each wraps the ValueError in its own error
    type). With no ``names`` (a model that lists none), any integer passes."""
    names = list(names or [])
    if isinstance(c, str):
        s = c.strip()
        if s in names:
            return names.index(s)
        if not s.lstrip("-").isdigit():
            raise ValueError(f"unknown class {c!r}; known: {', '.join(names)}")
        c = s
    i = int(c)
    if names and not 0 <= i < len(names):
        raise ValueError(f"class index {i} out of range 0..{len(names) - 1}")
    return i


class TextEmbeddingBank:
    """A fixed bank of N prompt embeddings, drawn uniformly by index (``ctx.randint``).

    Args:
        emb: (N, L, D) token embeddings of the N prompts (``encoder_hidden_states``).
        pooled: (N, P) pooled embeddings (SD3 / Flux ``pooled_projections``) or None (UNet2DCondition,
            PixArt: conditions are then plain (B, L, D) tensors).
        null_emb, null_pooled: the empty-prompt ("") embedding (1, L, D) / (1, P): the teacher's CFG
            unconditional input (Ho & Salimans 2022); default zeros (only right for models trained so).
        prompts: optional prompt strings, for logs and sample grids.
        dtype: storage dtype of the bank (keep big banks in bfloat16 on the CPU; conditions are moved
            to the training device per batch).
    """

    num_classes = 0

    def __init__(self, emb: torch.Tensor, pooled: torch.Tensor | None = None, null_emb: torch.Tensor | None = None,
                 null_pooled: torch.Tensor | None = None, prompts: list[str] | None = None,
                 dtype: torch.dtype | None = None):
        if emb.ndim != 3:
            raise ValueError(f"emb must be (N, L, D) prompt embeddings, got shape {tuple(emb.shape)}")
        if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != emb.shape[0]):
            raise ValueError(f"pooled must be (N, P) with N = {emb.shape[0]}, got shape {tuple(pooled.shape)}")
        if prompts is not None and len(prompts) != emb.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {emb.shape[0]} embeddings")
        dtype = dtype or emb.dtype
        self.emb = emb.detach().to("cpu", dtype)
        self.pooled = pooled.detach().to("cpu", dtype) if pooled is not None else None
        ne = torch.zeros_like(self.emb[:1]) if null_emb is None else null_emb.detach().reshape(1, *emb.shape[1:])
        self.null_emb = ne.to("cpu", dtype)
        if self.pooled is not None:
            npool = torch.zeros_like(self.pooled[:1]) if null_pooled is None else null_pooled.detach().reshape(1, -1)
            self.null_pooled = npool.to("cpu", dtype)
        else:
            self.null_pooled = None
        self.prompts = list(prompts) if prompts is not None else None

    def __len__(self) -> int:
        return self.emb.shape[0]

    # -- conditions ---------------------------------------------------------------------------
    def index(self, idx: torch.Tensor, device=None):
        """Conditions of bank entries ``idx`` (B,): a dict for pooled models, else a (B, L, D) tensor."""
        idx = idx.to("cpu", torch.long)
        emb = self.emb[idx].to(device or "cpu", torch.float32)
        if self.pooled is None:
            return emb
        return {"emb": emb, "pooled": self.pooled[idx].to(device or "cpu", torch.float32)}

    @property
    def null_cond(self):
        """The empty-prompt condition (batch 1), for ``Denoiser(null_cond=...)`` (teacher CFG)."""
        emb = self.null_emb.float()
        return emb if self.null_pooled is None else {"emb": emb, "pooled": self.null_pooled.float()}

    def __call__(self, ctx):
        """Global-batch draw uniform over the bank (same on every rank), this rank's slice."""
        idx = ctx.randint(0, len(self))
        return self.index(idx, idx.device)

    def grid(self, n: int, device):
        """Cycle over the first ``GRID_CONDITIONS`` prompts: several samples per prompt (diversity guards)."""
        return self.index(torch.arange(n) % min(len(self), GRID_CONDITIONS), device)

    def real_cond(self, labels: torch.Tensor):
        """A bank-aligned real set: the dataset's labels are bank indices."""
        if labels.numel() and int(labels.max()) >= len(self):
            raise ValueError(f"real data label {int(labels.max())} is not an index into the {len(self)}-prompt bank: "
                             "the GAN real branch needs (latent, bank index) pairs (or set dmd.gan=false)")
        return self.index(labels, labels.device)

