"""``StepDistillPipeline``: a distilled one-/few-step student as a diffusers pipeline.

Loads with ``StepDistillPipeline.from_pretrained(folder)``; imports only diffusers, torch and
the lightweight :mod:`stepdistill.denoiser` / :mod:`stepdistill.schedules` (no training code).
The student network itself is a stock diffusers model (``UNet2DModel`` for our teachers) and the
scheduler a stock ``DDPMScheduler`` config, so the same output can be reproduced with diffusers
alone (see tests/test_export.py)::

    x = noise                                   # x_{t_0}, t_0 = student_timesteps[0]
    for k, t in enumerate(student_timesteps):
        x0 = pred_to_x0(unet(x, t, class_labels).sample)      # v / eps / x0 prediction
        x = sqrt(ac[t_{k+1}]) x0 + sqrt(1 - ac[t_{k+1}]) eps_k  # fresh noise, if k < K-1
"""
from __future__ import annotations

import time

import torch

from .base import StepDistillPipelineBase, image_output

from ..denoiser import Denoiser, sample_shape
from ..schedules import schedule_from_config
from .sampling import student_sample


class StepDistillPipeline(StepDistillPipelineBase):
    """One-/few-step sampling of a distilled student (CFG-free: guidance is distilled in).

    The network is the ``unet`` component (UNets) or ``transformer`` (SD3 / Flux / DiT / PixArt
    students, with a ``FlowMatchEulerDiscreteScheduler`` for flow-matching teachers)."""

    _optional_components = ["unet", "transformer"]

    #: first steps a teacher may take (pipelines/hybrid.py): any number of first steps, either hand-off
    max_hybrid_steps: int | None = None

    def __init__(self, unet, scheduler, student_timesteps: list[float] | None = None,
                 class_names: list[str] | None = None, prediction_type: str | None = None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("StepDistillPipeline needs exactly one network: unet or transformer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)
        self.register_to_config(student_timesteps=list(student_timesteps or [999.0]),
                                class_names=list(class_names or []),
                                prediction_type=prediction_type or scheduler.config.prediction_type)

    def _read_meta(self, meta: dict) -> None:
        if meta.get("class_names") and not self.config.class_names:
            self.register_to_config(class_names=list(meta["class_names"]))

    @property
    def network(self):
        return self.unet if self.unet is not None else self.transformer

    def denoiser(self) -> Denoiser:
        """The network as a :class:`Denoiser` (built once, rebuilt when a component or the config changes)."""
        return self._cached("denoiser", self._component_key(self.config.prediction_type),
                            lambda: Denoiser(self.network, schedule_from_config(dict(self.scheduler.config)),
                                             self.config.prediction_type))

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil", return_dict: bool = True, first_step=None, hybrid_steps: int = 1,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None):
        """Sample ``batch_size`` images (or one per entry of ``class_labels``: names or indices; or one per
        row of ``prompt_embeds`` (B, L, D) (+ ``pooled_prompt_embeds`` (B, P) for SD3 / Flux), text students).

        ``first_step(x, t) -> x0`` takes the first ``hybrid_steps`` steps instead of the student (hybrid
        sampling; e.g. :class:`stepdistill.pipelines.hybrid.TeacherSteps`)."""
        dev = self.network.device
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        labels, batch_size = self.conditions(class_labels, batch_size, prompt_embeds, pooled_prompt_embeds)
        noise = torch.randn(batch_size, *sample_shape(self.network), generator=generator).to(dev)
        t0 = time.perf_counter()
        x = self.sample(noise, labels, num_inference_steps, generator=generator, first_step=first_step,
                        hybrid_steps=hybrid_steps)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)

    # -- the one sampling route (pipelines/base.py) ---------------------------------------------------
    def denoisers(self) -> list[Denoiser]:
        return [self.denoiser()]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels=None, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, first_step=None, hybrid_steps: int = 1) -> torch.Tensor:
        """x0 in [-1, 1] from the starting noise (B, C, H, W): the student chain (fresh noise between steps, from
        ``generator``); ``first_step(x, t) -> x0`` takes the first ``hybrid_steps`` steps (hybrid sampling)."""
        return student_sample(self.denoiser(), self.timesteps_for(num_inference_steps), labels, noise,
                              generator=generator, first_step=first_step, hybrid_steps=hybrid_steps)
