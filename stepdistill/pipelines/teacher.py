"""``StepDistillTeacherPipeline``: many-step class-conditional sampling with a stock diffusers
scheduler (DDIM / Euler / DPM-Solver++) and classifier-free guidance."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .base import StepDistillPipelineBase, image_output

from ..denoiser import Denoiser, sample_shape
from ..schedules import schedule_from_config
from .sampling import make_scheduler, scheduler_sample


class StepDistillTeacherPipeline(StepDistillPipelineBase):
    """The network is the ``unet`` component, or ``transformer`` (DiT / SD3 / Flux / PixArt teachers)."""

    _optional_components = ["unet", "transformer"]

    def __init__(self, unet, scheduler, class_names: list[str] | None = None, null_class: int | None = None,
                 prediction_type: str | None = None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("StepDistillTeacherPipeline needs exactly one network: unet or transformer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []), null_class=null_class,
                                prediction_type=prediction_type or scheduler.config.prediction_type)

    @classmethod
    def from_folder(cls, folder: str | Path, **kw) -> "StepDistillTeacherPipeline":
        """Same as ``from_pretrained`` (which fills the metadata from ``stepdistill.json``)."""
        return cls.from_pretrained(folder, **kw)

    def _read_meta(self, meta: dict) -> None:
        self.register_to_config(class_names=meta["class_names"], null_class=meta["null_class"],
                                prediction_type=meta["prediction_type"])

    @property
    def network(self):
        return self.unet if self.unet is not None else self.transformer

    def denoiser(self) -> Denoiser:
        """The network as a :class:`Denoiser` (built once, rebuilt when a component or the config changes)."""
        return self._cached("denoiser", self._component_key(self.config.prediction_type, self.config.null_class),
                            lambda: Denoiser(self.network, schedule_from_config(dict(self.scheduler.config)),
                                             self.config.prediction_type, null_class=self.config.null_class))

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int = 50,
                 guidance_scale: float = 2.0, sampler: str = "ddim", generator: torch.Generator | None = None,
                 seed: int | None = None, output_type: str = "pil", return_dict: bool = True, progress: bool = False,
                 on_step=None):
        """``on_step(i, n)``: called after each of the n sampler steps."""
        dev = self.network.device
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        labels, batch_size = self.conditions(class_labels, batch_size)
        noise = torch.randn(batch_size, *sample_shape(self.network), generator=generator).to(dev)
        sched = make_scheduler(sampler, dict(self.scheduler.config))
        t0 = time.perf_counter()
        x = scheduler_sample(self.denoiser(), sched, labels, num_inference_steps, guidance_scale, noise, progress,
                             on_step=on_step)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)
