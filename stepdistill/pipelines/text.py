"""Text-to-image pipelines: a many-step text teacher (negative prompt + CFG) and a distilled student.

Both are diffusers ``DiffusionPipeline`` subclasses with components ``unet`` (``UNet2DConditionModel``),
``scheduler``, ``text_encoder`` + ``tokenizer`` (transformers) and an optional ``vae`` (latent models: x0 is
decoded with ``vae.decode(x0 / scaling_factor)``, as in Stable Diffusion, Rombach et al. 2022).

Prompts are encoded as in :mod:`stepdistill.text` (token embeddings padded to ``max_length``); the empty
prompt is the CFG null condition, a negative prompt replaces it (``uncond + w (cond - uncond)``).

The student chain (DMD2, Yin et al. 2024, Sec. 4.3) is exactly what diffusers' ``LCMScheduler`` computes with
explicit ``timesteps`` and its boundary condition switched off (``timestep_scaling`` large): noise
``z ~ N(0, I)`` at ``t_0``, ``x0_k = G(x_{t_k}, t_k, c)``, ``x_{t_{k+1}} = sqrt(ac_{k+1}) x0_k +
sqrt(1 - ac_{k+1}) eps_k`` with fresh ``eps_k`` drawn from the same generator. So an SD-family student
(CLIP text encoder + AutoencoderKL) also runs in the stock ``StableDiffusionPipeline`` with the same images
for the same generator (tests/test_text_sd_family.py)::

    pipe = StableDiffusionPipeline.from_pretrained(folder)          # scheduler: LCMScheduler
    pipe(prompt, timesteps=[999], guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .base import StepDistillPipelineBase, image_output

from ..denoiser import Denoiser, sample_shape
from ..schedules import schedule_from_config
from ..text import PromptEncoder
from .sampling import make_scheduler, scheduler_sample


class _TextPipelineMixin:
    """Prompt encoding, starting noise and VAE decoding shared by the teacher and student pipelines."""

    def prompt_encoder(self) -> PromptEncoder:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text_encoder / tokenizer: pass prompt_embeds instead of prompts")
        L = self.config.max_length or min(int(getattr(self.tokenizer, "model_max_length", 77)), 512)
        return PromptEncoder(self.tokenizer, self.text_encoder, L)

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1) -> torch.Tensor:
        """str | list[str] -> (B * num_images_per_prompt, L, D) token embeddings."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        emb = self.prompt_encoder()(prompts).to(self.unet.device, self.unet.dtype)
        return emb.repeat_interleave(num_images_per_prompt, dim=0)

    def _noise(self, batch: int, generator) -> torch.Tensor:
        return torch.randn(batch, *sample_shape(self.unet), generator=generator).to(self.unet.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space -> image space, clamped to [-1, 1] (pixel-space models: the clamp only)."""
        if self.vae is None:
            return x0.clamp(-1, 1)
        return self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float().clamp(-1, 1)

    def _schedule(self):
        return schedule_from_config(dict(self.scheduler.config))


class StepDistillTextTeacherPipeline(_TextPipelineMixin, StepDistillPipelineBase):
    """Many-step sampling of a text teacher with a stock diffusers scheduler, CFG and negative prompts."""

    _optional_components = ["text_encoder", "tokenizer", "vae"]

    def __init__(self, unet, scheduler, text_encoder=None, tokenizer=None, vae=None, max_length: int | None = None,
                 prediction_type: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(max_length=max_length,
                                prediction_type=prediction_type or scheduler.config.prediction_type)

    def denoiser(self, null_cond=None) -> Denoiser:
        return Denoiser(self.unet, self._schedule(), self.config.prediction_type, null_cond=null_cond)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, sampler: str = "ddim",
                 generator: torch.Generator | None = None, seed: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, progress: bool = False,
                 latents: torch.Tensor | None = None, on_step=None):
        """One image per prompt (times ``num_images_per_prompt``); ``negative_prompt`` (str or one per prompt)
        replaces the empty prompt as CFG's unconditional input. ``on_step(i, n)``: called after each step."""
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        cond = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompt, num_images_per_prompt)
        B = cond.shape[0]
        null = self.encode_prompt("") if self.text_encoder is not None else None   # (1, L, D) CFG null
        neg = negative_prompt_embeds
        if negative_prompt is not None:
            negs = [negative_prompt] * (B // num_images_per_prompt) if isinstance(negative_prompt, str) \
                else list(negative_prompt)
            neg = self.encode_prompt(negs, num_images_per_prompt)
        if neg is not None and neg.shape[0] != B:
            raise ValueError(f"{neg.shape[0]} negative prompt embeddings for {B} prompts")
        noise = latents.to(self.unet.device) if latents is not None else self._noise(B, generator)
        sched = make_scheduler(sampler, dict(self.scheduler.config))
        t0 = time.perf_counter()
        x = scheduler_sample(self.denoiser(null), sched, cond, num_inference_steps, guidance_scale, noise,
                             progress, negative=neg, on_step=on_step)
        x = self.decode(x)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)


class StepDistillTextPipeline(_TextPipelineMixin, StepDistillPipelineBase):
    """One-/few-step sampling of a distilled text student (CFG and the negative prompt are distilled in)."""

    _optional_components = ["text_encoder", "tokenizer", "vae"]

    #: first steps a teacher may take (pipelines/hybrid.py): none: hybrid sampling is for class-conditional students
    max_hybrid_steps: int | None = 0

    def __init__(self, unet, scheduler, text_encoder=None, tokenizer=None, vae=None,
                 student_timesteps: list[float] | None = None, max_length: int | None = None,
                 prediction_type: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(student_timesteps=list(student_timesteps or [999.0]), max_length=max_length,
                                prediction_type=prediction_type or scheduler.config.prediction_type)

    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self._schedule(), self.config.prediction_type)

    @torch.no_grad()
    def __call__(self, prompt=None, num_images_per_prompt: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, prompt_embeds: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None):
        """Noise is drawn first, then one fresh draw per re-noising, all from ``generator`` (as the stock
        pipeline + LCMScheduler do), so both give the same images for the same generator."""
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        cond = prompt_embeds.to(self.unet.device) if prompt_embeds is not None \
            else self.encode_prompt(prompt, num_images_per_prompt)
        x = latents.to(self.unet.device) if latents is not None else self._noise(cond.shape[0], generator)
        t0 = time.perf_counter()
        x = self.sample(x, cond, num_inference_steps, generator=generator)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)

    # -- the one sampling route (pipelines/base.py) ---------------------------------------------------
    def denoisers(self) -> list[Denoiser]:
        return [self.denoiser()]

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, first_step=None, hybrid_steps: int = 1) -> torch.Tensor:
        """Images in [-1, 1] (decoded from latents for latent students) from the starting noise and prompt
        embeddings ``cond`` (B, L, D): the student chain, fresh noise from ``generator`` between steps."""
        if first_step is not None:
            raise ValueError("hybrid sampling (first_step) is not supported for text students")
        return self.decode(student_chain(self.denoiser(), self.timesteps_for(num_inference_steps), cond, noise,
                                         generator))


@torch.no_grad()
def student_chain(den: Denoiser, timesteps: list[float], cond, x: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The student chain in model space (latents are not clamped; pixel models clamp after decoding)."""
    x0 = x
    for k, t in enumerate(timesteps):
        x0 = den(x, torch.full((x.shape[0],), float(t), device=x.device), cond)
        if k + 1 < len(timesteps):
            eps = torch.randn(x.shape, generator=generator).to(x.device)
            x = den.schedule.add_noise(x0, eps, torch.full((x.shape[0],), float(timesteps[k + 1]), device=x.device))
    return x0
