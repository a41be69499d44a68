"""Text-to-video pipelines: a many-step video teacher and a distilled few-step video student.

Both are the text pipelines (:mod:`stepdistill.pipelines.text`) over a video backbone (``transformer``: a diffusers
``WanTransformer3DModel``) whose samples are clips (B, C, F, H, W) in [-1, 1]; the clip shape comes from
``stepdistill.json`` (:mod:`stepdistill.video_models`). The teacher integrates the flow ODE with the stock
``FlowMatchEulerDiscreteScheduler`` (Euler; CFG as for images); the student runs its chain
(x0_k = G(x_{t_k}, t_k, c), re-noised with fresh noise to t_{k+1}), which is what the stock flow scheduler with
``stochastic_sampling`` computes step by step.

``frames(...)`` is a generator that yields each frame (B, C, H, W) as soon as it exists: for these bidirectional
models every frame of a clip is produced by the same last network call, so the frames come together at the end.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .text import StepDistillTextPipeline, StepDistillTextTeacherPipeline


class _VideoMixin:
    """``transformer`` is the registered component; the text mixin's code reads it as ``unet``."""

    @property
    def unet(self):
        return self.transformer

    def frames(self, prompt=None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield frames (B, C, H, W) in time order (module docstring); same arguments as ``__call__``."""
        clips = self(prompt, output_type="pt", **kwargs).images          # (B, C, F, H, W)
        for f in range(clips.shape[2]):
            yield clips[:, :, f]


class StepDistillVideoTeacherPipeline(_VideoMixin, StepDistillTextTeacherPipeline):
    """Many-step sampling of a text-to-video teacher (flow-matching Euler by default, CFG, negative prompts)."""

    def __init__(self, transformer, scheduler, text_encoder=None, tokenizer=None, vae=None, max_length: int | None = None,
                 prediction_type: str | None = None):
        super(StepDistillTextTeacherPipeline, self).__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(max_length=max_length,
                                prediction_type=prediction_type or scheduler.config.prediction_type)

    def __call__(self, prompt=None, *args, sampler: str = "flow_euler", **kwargs):
        return super().__call__(prompt, *args, sampler=sampler, **kwargs)


class StepDistillVideoPipeline(_VideoMixin, StepDistillTextPipeline):
    """One-/few-step sampling of a distilled text-to-video student."""

    def __init__(self, transformer, scheduler, text_encoder=None, tokenizer=None, vae=None,
                 student_timesteps: list[float] | None = None, max_length: int | None = None,
                 prediction_type: str | None = None):
        super(StepDistillTextPipeline, self).__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(student_timesteps=list(student_timesteps or [999.0]), max_length=max_length,
                                prediction_type=prediction_type or scheduler.config.prediction_type)
