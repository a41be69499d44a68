"""The one eval-model interface: what ``eval``, ``bench``, ``curve`` and ``report`` ask of any loaded model.

:class:`EvalModel` holds what every wrapper shares (network, image shape, parameter count, NFE per sample,
the summary); :class:`~stepdistill.eval.generate.TeacherModel` / ``StudentModel`` (class-conditional or
unconditional) and :class:`~stepdistill.eval.text_eval.TextModel` (prompts) subclass it and add how they
resolve steps and generate::

    m.resolve_steps(steps) -> int
    m.generate(labels=None, n=None, steps=None, guidance_scale=None, seed=0, ...) -> (N, C, H, W) in [-1, 1]
    m.nfe_per_sample(steps, guidance_scale) -> int
    m.describe() -> dict
"""
from __future__ import annotations

import torch

from ..denoiser import sample_shape


class EvalModel:
    kind = "model"          # teacher | student
    is_text = False
    hybrid = None           # a Hybrid (eval/hybrid.py) makes a student's generate run the hybrid chain
    last_generate_s: float | None = None

    pipe = None             # the loaded pipeline
    meta = None             # its ModelMeta
    path = ""

    # -- the network and its sample ---------------------------------------------------------------
    @property
    def network(self) -> torch.nn.Module:
        """The pipeline's network: ``unet``, or ``transformer`` for transformer models (expert / student 0)."""
        net = getattr(self.pipe, "network", None)
        return net if net is not None else self.pipe.unet

    @property
    def unet(self):  # the older name, kept for callers; also a transformer
        return self.network

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a generated image (the adapter's sample shape; latent models override it)."""
        return sample_shape(self.network)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        return self.image_shape[1]

    @property
    def class_names(self) -> list[str]:
        return []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    # -- cost -------------------------------------------------------------------------------------
    def resolve_steps(self, steps: int | None) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def uses_cfg(self, guidance_scale: float | None) -> bool:
        """Whether sampling runs the conditional and unconditional pass (students: guidance is distilled in)."""
        return False

    def nfe_per_sample(self, steps: int | None = None, guidance_scale: float | None = None) -> int:
        return self.resolve_steps(steps) * (2 if self.uses_cfg(guidance_scale) else 1)

    def describe(self) -> dict:
        return {"path": self.path, "kind": self.kind, "class_names": self.class_names,
                "image_shape": list(self.image_shape), "params": self.num_params(),
                "prediction_type": self.meta.prediction_type}
