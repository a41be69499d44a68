"""Samplers over a :class:`~stepdistill.denoiser.Denoiser`: stock diffusers schedulers for the
teacher, and the few-step chain of a distilled student (DMD2, Yin et al. 2024, Sec. 4.3)."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


def make_scheduler(name: str, config: dict):
    """A stock diffusers scheduler built from the model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown sampler / --scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    if "FlowMatch" in str(config.get("_class_name", "")) or config.get("kind") == "flow":
        # a flow-matching model (SD3, Flux, Wan): the VP samplers' formulas do not apply; its Euler ODE sampler does
        name = "flow_euler"
    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"timestep_spacing": "trailing"} if name in ("ddim", "euler", "dpm++") else {}
    if name == "dpm++":
        extra["algorithm_type"] = "dpmsolver++"
    return cls.from_config(config, **extra)


@torch.no_grad()
def scheduler_sample(den: Denoiser, scheduler, cond, num_steps: int, guidance_scale: float,
                     noise: torch.Tensor, progress: bool = False, negative=None, on_step=None) -> torch.Tensor:
    """Teacher sampling with a stock diffusers scheduler; returns x0 in [-1, 1] (B, C, H, W).
    ``on_step(i, n)`` is called after step i of n (1-based), e.g. for a progress display."""
    from tqdm.auto import tqdm

    scheduler.set_timesteps(num_steps, device=noise.device)
    # flow-matching schedulers have neither init_noise_sigma nor scale_model_input (both identity)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    flow = "FlowMatch" in type(scheduler).__name__
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="teacher", leave=False)):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        tt = t.float().expand(x.shape[0]).to(noise.device)
        if flow and hasattr(den.schedule, "t_from_sigma"):
            # flow schedulers' timesteps are the *shifted* sigma * 1000; our t is pre-shift, so undo the
            # shift once (model_timestep re-applies it and the backbone then sees exactly ``t``)
            tt = den.schedule.t_from_sigma(tt.double() / den.schedule.num_train_timesteps).to(noise.device)
        pred = den.raw(x_in, tt, cond, guidance_scale, negative)
        x = scheduler.step(pred, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1, len(scheduler.timesteps))
    return x.clamp(-1, 1)


def subset_timesteps(trained: list[float], steps: int | None, what: str = "steps") -> list[float]:
    """``steps`` of a student's ``trained`` timesteps: all of them (None), or an evenly spaced subset that keeps the
    first (pure-noise) one, as the pipelines' ``timesteps_for`` picks them."""
    ts = [float(t) for t in trained]
    n = steps or len(ts)
    if not 1 <= n <= len(ts):
        raise ValueError(f"{what} must be in 1..{len(ts)} for this student, got {n}")
    if n == len(ts):
        return ts
    return [ts[i] for i in torch.linspace(0, len(ts) - 1, n).round().long().tolist()]


@torch.no_grad()
def student_sample(den: Denoiser, timesteps: list[float], cond, noise: torch.Tensor,
                   generator: torch.Generator | None = None, first_step=None, hybrid_steps: int = 1) -> torch.Tensor:
    """Few-step student chain: x0_k = G(x_{t_k}, t_k); x_{t_{k+1}} = add_noise(x0_k, fresh eps, t_{k+1}).

    ``noise`` is x_{t_0} (pure Gaussian noise). Fresh, uncorrelated noise is drawn for every
    re-noising (DMD2 reports artifacts with correlated noise). ``first_step(x, t) -> x0`` optionally
    replaces the first ``hybrid_steps`` denoising calls (hybrid sampling: a teacher takes the
    high-noise steps, :mod:`stepdistill.pipelines.hybrid`); the re-noising draws are unchanged. It may
    return ``(x0, x_next)``: the chain then continues from ``x_next`` (the state at the next timestep,
    e.g. the teacher's ODE state) instead of re-noising x0 (the eps draw is still made, so later draws
    do not shift).
    """
    if first_step is not None and not 1 <= hybrid_steps <= len(timesteps):
        raise ValueError(f"hybrid steps must be in 1..{len(timesteps)} (the chain's steps), got {hybrid_steps}")
    x = noise
    x0 = None
    for k, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = first_step(x, tt) if (k < hybrid_steps and first_step is not None) else den(x, tt, cond)
        x0, x_next = x0 if isinstance(x0, tuple) else (x0, None)
        if k + 1 < len(timesteps):
            eps = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            x = x_next if x_next is not None else \
                den.schedule.add_noise(x0, eps, torch.full((x.shape[0],), float(timesteps[k + 1]), device=x.device))
    return x0.clamp(-1, 1)


@torch.no_grad()
def grid_sample(student: Denoiser, backbone, timesteps: list[float], cond, shape: tuple, n: int, device,
                seed: int = 1234) -> torch.Tensor:
    """Training sample grids: ``student``'s few-step chain run with ``backbone`` (e.g. its EMA weights) on
    fixed noise (``seed``), so grids of successive checkpoints compare sample for sample."""
    den = Denoiser(backbone, student.schedule, student.prediction_type, student.null_class)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *shape, generator=g).to(device)
    return student_sample(den, timesteps, cond, noise, generator=g)
