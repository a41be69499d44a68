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
    """One-/few-step sampling of a distilled text-to-video student. ``causal`` (a Self-Forcing / streaming student,
    ``trainers/causal.py``: ``{"chunk_frames", "mode", "context_frames"}``) makes sampling the chunk-by-chunk
    rollout of :mod:`stepdistill.streaming`, and :meth:`frames` then yields each chunk's frames as soon as they
    are final, for as many frames as asked (the context window stays at the trained clip length)."""

    def __init__(self, transformer, scheduler, text_encoder=None, tokenizer=None, vae=None,
                 student_timesteps: list[float] | None = None, max_length: int | None = None,
                 prediction_type: str | None = None, causal: dict | None = None):
        super(StepDistillTextPipeline, self).__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(student_timesteps=list(student_timesteps or [999.0]), max_length=max_length,
                                prediction_type=prediction_type or scheduler.config.prediction_type,
                                causal=dict(causal) if causal else None)

    @property
    def causal(self) -> dict | None:
        return self.config.causal

    def _rollout(self, noise, cond, steps, generator, context: int | None = None):
        from ..streaming import rollout

        c = self.causal
        return rollout(self.denoiser(), noise, cond, self.timesteps_for(steps), c["chunk_frames"], c["mode"],
                       c["context_frames"] if context is None else context,
                       randn=lambda s: torch.randn(s, generator=generator).to(noise.device))

    @torch.no_grad()
    def sample(self, noise, cond, num_inference_steps=None, generator=None, first_step=None, hybrid_steps: int = 1):
        if self.causal is None:
            return super().sample(noise, cond, num_inference_steps, generator, first_step, hybrid_steps)
        if first_step is not None:
            raise ValueError("hybrid sampling (first_step) is not supported for video students")
        return self.decode(torch.cat([x for _, x in self._rollout(noise, cond, num_inference_steps, generator)], 2))

    @torch.no_grad()
    def frames(self, prompt=None, num_frames: int | None = None, prompt_embeds=None, num_inference_steps=None,
               generator: torch.Generator | None = None, seed: int | None = None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield frames (B, C, H, W) as they are produced. A causal student streams chunk by chunk, ``num_frames``
        (default: the trained clip length, else a multiple of its chunk) as long as asked; the noise and every
        re-noising come from ``generator`` in the order ``__call__`` draws them, so the frames of a clip-length
        stream equal ``__call__``'s clip."""
        if self.causal is None:
            yield from super().frames(prompt, prompt_embeds=prompt_embeds, num_inference_steps=num_inference_steps,
                                      generator=generator, seed=seed, **kwargs)
            return
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        cond = prompt_embeds.to(self.unet.device) if prompt_embeds is not None else self.encode_prompt(prompt)
        C, F, H, W = self.unet.sample_shape
        n = F if num_frames is None else int(num_frames)
        c = self.causal["chunk_frames"]
        if n < c or n % c:
            raise ValueError(f"num_frames must be a multiple of the chunk size {c}, got {n}")
        noise = torch.randn(cond.shape[0], C, n, H, W, generator=generator).to(self.unet.device)
        context = self.causal["context_frames"]
        if n > F:  # a stream past the trained length: the window keeps the trained clip length
            steps = len(self.timesteps_for(num_inference_steps))
            live = c * (steps if self.causal["mode"] == "pipelined" else 1)
            context = min(context or F - live, F - live)
        for _, x in self._rollout(noise, cond, num_inference_steps, generator, context):
            x = self.decode(x)
            for f in range(x.shape[2]):
                yield x[:, :, f]
