"""``PhasedDMDPipeline``: a Phased DMD student (one expert network per phase) as a diffusers pipeline.

Phased DMD (SenseNova 2025) splits the training-time axis at boundaries
``b_0 > b_1 > ... > b_K = 0`` into K phases; phase k starts at ``s_k = b_k`` (the student
timesteps) and its expert maps ``x_{s_k}`` to ``x_{s_{k+1}}`` (the last one to x0). Sampling::

    x = noise                                          # x_{s_0}
    for k in 0..K-1:                                   # expert chosen by the timestep s_k (route)
        x0_k, eps_k = pred_to_x0_eps(expert_k(x, s_k))  # the expert's native prediction
        x = alpha_{s_{k+1}} x0_k + sigma_{s_{k+1}} eps_k  # k < K-1: deterministic DDIM step
    return x0_{K-1}

The transport between phases is a DDIM step with the expert's *own* predicted eps (for flow
matching schedules this is exactly the Euler step to sigma_{s_{k+1}} of the reference trainer),
not a re-noising with fresh noise: the chain is deterministic given the starting noise. See
:mod:`stepdistill.trainers.phased_dmd` for why.

Folder layout (all stock diffusers parts)::

    model_index.json      _class_name PhasedDMDPipeline, unet (or transformer), expert_1..expert_{K-1}, scheduler
    unet/                 expert 0 (UNet2DModel; kept as ``unet`` so tools that read unet/ still work);
                          ``transformer/`` instead for transformer experts (SD3, Flux, DiT, PixArt)
    expert_1/ ...         experts 1..K-1 (same class)
    scheduler/            stock DDPMScheduler (or FlowMatchEulerDiscreteScheduler) config
    stepdistill.json      student_timesteps (phase starts), extra.experts = [{name, subfolder,
                          timesteps, phase}, ...], extra.phase_boundaries

Imports only diffusers, torch and the lightweight denoiser / schedules modules (no training code).
"""
from __future__ import annotations

import time

import torch

from .base import StepDistillPipelineBase, image_output

from ..denoiser import Denoiser, sample_shape
from ..schedules import schedule_from_config

MAX_EXPERTS = 8  # expert_0 (= unet) plus the optional components expert_1..expert_7


def expert_subfolder(k: int) -> str:
    """Component / subfolder name of expert k (expert 0 lives in ``unet/``)."""
    return "unet" if k == 0 else f"expert_{k}"


def route(t: float, boundaries: list[float]) -> int:
    """Index of the expert owning training time ``t``: phase k owns ``(b_{k+1}, b_k]``, the first
    phase also everything above ``b_0`` and the last phase everything down to (and below) 0.

    Total: every real ``t`` maps to exactly one expert in ``0..K-1``; the phase start ``s_k = b_k``
    maps to k (so the boundary ``b_k``, k >= 1, belongs to the *later* phase that starts there).
    """
    inner = boundaries[1:-1]
    return sum(1 for b in inner if float(t) <= float(b))


def expert_step(den: Denoiser, x: torch.Tensor, t: float, t_next: float | None, cond, x0: torch.Tensor | None = None):
    """One phase: ``x_t -> (x0_hat, x_{t_next})`` with a DDIM step on the predicted eps.

    ``t_next=None`` ends the chain (the output is x0_hat). ``x0`` optionally replaces the expert's
    prediction (hybrid sampling: a teacher takes the step); eps is then implied by x0 and x_t.
    Differentiable when called under grad (used by the trainer for the active expert).
    """
    sched = den.schedule
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if x0 is None:
        pred = den.raw(x, tt, cond)
        x0, eps = sched.pred_to_x0_eps(pred.float(), x.float(), tt, den.prediction_type)
    else:
        eps = sched.eps_from_x0(x0.float(), x.float(), tt)
    if t_next is None:
        return x0, x0
    return x0, sched.add_noise(x0, eps, torch.full((x.shape[0],), float(t_next), device=x.device))


@torch.no_grad()
def phased_sample(experts: list[Denoiser], timesteps: list[float], boundaries: list[float], cond,
                  noise: torch.Tensor, first_step=None, trace: list | None = None) -> torch.Tensor:
    """The Phased DMD chain (module docstring); each step's expert is routed by its timestep.

    ``first_step(x, t) -> x0`` optionally replaces the first denoising call (hybrid sampling).
    ``trace`` (a list) receives the expert index used at each step. Returns x0 clamped to [-1, 1].
    """
    x, x0 = noise, None
    for k, t in enumerate(timesteps):
        e = route(t, boundaries)
        if trace is not None:
            trace.append(e)
        t_next = timesteps[k + 1] if k + 1 < len(timesteps) else None
        given = None
        if k == 0 and first_step is not None:
            given = first_step(x, torch.full((x.shape[0],), float(t), device=x.device))
        x0, x = expert_step(experts[e], x, t, t_next, cond, x0=given)
    return x0.clamp(-1, 1)


class PhasedDMDPipeline(StepDistillPipelineBase):
    """K-step sampling of a Phased DMD student: step k runs the expert that owns timestep s_k.

    Loads with ``PhasedDMDPipeline.from_pretrained(folder)``. ``__call__`` has the signature of
    :class:`~stepdistill.pipelines.student.StepDistillPipeline`; ``num_inference_steps`` must be K
    (each expert is trained for its own phase only). After a call, ``last_latency_s`` holds the
    sampling time and ``last_experts`` the expert name used at each step.
    """

    _optional_components = ["unet", "transformer"] + [expert_subfolder(k) for k in range(1, MAX_EXPERTS)]

    #: first steps a teacher may take (pipelines/hybrid.py): the first step only (re-noised hand-off)
    max_hybrid_steps: int | None = 1

    def __init__(self, unet, scheduler, expert_1=None, expert_2=None, expert_3=None, expert_4=None,
                 expert_5=None, expert_6=None, expert_7=None, student_timesteps: list[float] | None = None,
                 class_names: list[str] | None = None, prediction_type: str | None = None,
                 phase_boundaries: list[float] | None = None, transformer=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("PhasedDMDPipeline needs exactly one expert-0 network: unet or transformer")
        rest = [expert_1, expert_2, expert_3, expert_4, expert_5, expert_6, expert_7]
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler,
                              **{expert_subfolder(k + 1): m for k, m in enumerate(rest)})
        ts = [float(t) for t in (student_timesteps or [999.0])]
        bounds = [float(b) for b in (phase_boundaries or [*ts, 0.0])]
        if bounds[:-1] != ts:
            raise ValueError(f"phase_boundaries {bounds} must be the student timesteps {ts} followed by the end (0)")
        n = 1 + sum(1 for m in rest if m is not None)
        if any(m is None for m in rest[:n - 1]) or n != len(ts):
            raise ValueError(f"{len(ts)} phases need experts unet, expert_1..expert_{len(ts) - 1}; got {n} expert(s)")
        self.register_to_config(student_timesteps=ts, class_names=list(class_names or []),
                                prediction_type=prediction_type or scheduler.config.prediction_type,
                                phase_boundaries=bounds)
        self.last_latency_s: float | None = None
        self.last_experts: list[str] = []

    # -- experts --------------------------------------------------------------------------------
    @property
    def network(self):
        """Expert 0: the ``unet`` component, or ``transformer`` for transformer students."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def num_experts(self) -> int:
        return len(self.config.student_timesteps)

    @property
    def expert_names(self) -> list[str]:
        return [f"expert_{k}" for k in range(self.num_experts)]

    def experts(self) -> list:
        """The expert networks in phase order (expert 0 is ``self.network``)."""
        return [self.network] + [getattr(self, expert_subfolder(k)) for k in range(1, self.num_experts)]

    def denoisers(self) -> list[Denoiser]:
        sched = schedule_from_config(dict(self.scheduler.config))
        return [Denoiser(m, sched, self.config.prediction_type) for m in self.experts()]

    def expert_for(self, t: float) -> int:
        """Routing by timestep (total: see :func:`route`)."""
        return route(t, self.config.phase_boundaries)

    def timesteps_for(self, num_inference_steps: int | None) -> list[float]:
        ts = list(self.config.student_timesteps)
        n = len(ts) if num_inference_steps is None else int(num_inference_steps)
        if n != len(ts):
            raise ValueError(f"num_inference_steps must be {len(ts)} for this phased student "
                             f"(one step per expert), got {n}")
        return ts

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels=None, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, first_step=None, hybrid_steps: int = 1) -> torch.Tensor:
        """x0 in [-1, 1] from the starting noise x_{s_0} (B, C, H, W); ``labels`` (B,) long or None.

        ``generator`` is accepted for interface parity and unused: the chain is deterministic.
        Sets ``last_experts``.
        """
        if hybrid_steps != 1:
            raise ValueError(f"hybrid_steps must be 1 for {type(self).__name__}: a teacher may take the first step "
                             "only (re-noised hand-off)")
        trace: list[int] = []
        x = phased_sample(self.denoisers(), self.timesteps_for(num_inference_steps), self.config.phase_boundaries,
                          labels, noise, first_step=first_step, trace=trace)
        self.last_experts = [f"expert_{e}" for e in trace]
        return x

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 output_type: str = "pil", return_dict: bool = True, first_step=None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None):
        """Sample ``batch_size`` images (or one per entry of ``class_labels``: names or indices; or one per
        row of ``prompt_embeds`` (B, L, D) (+ ``pooled_prompt_embeds`` (B, P) for SD3 / Flux), text students)."""
        net = self.network
        dev = net.device
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        steps = self.timesteps_for(num_inference_steps)  # validate before drawing noise
        labels, batch_size = self.conditions(class_labels, batch_size, prompt_embeds, pooled_prompt_embeds)
        noise = torch.randn(batch_size, *sample_shape(net), generator=generator).to(dev)
        t0 = time.perf_counter()
        x = self.sample(noise, labels, len(steps), first_step=first_step)
        self.last_latency_s = time.perf_counter() - t0
        return image_output(x, output_type, return_dict)
