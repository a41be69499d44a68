"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", Sec. 2)
view of any :class:`~stepdistill.denoiser.Denoiser`: the adapter layer between our schedules and sCM / rCM.

TrigFlow writes the forward process as ``x_s = cos(s) x0 + sin(s) eps``, ``s in [0, pi/2]`` (sigma_data = 1),
and a model by its velocity parametrisation ``F`` with ``x0 = cos(s) x_s - sin(s) F(x_s, s)``; the
probability-flow ODE is ``dx_s/ds = F``. Our schedules write ``x_t = alpha_t x0 + sigma_t eps``, so

    s(t) = atan2(sigma_t, alpha_t),     x_s = x_t / sqrt(alpha_t^2 + sigma_t^2)

* VP (DDPM): alpha^2 + sigma^2 = 1, so x_s = x_t, alpha = cos s, sigma = sin s and, for v-prediction
  networks, F is exactly the network's v. The inverse t(s) interpolates log alphas_cumprod linearly, as
  :class:`~stepdistill.schedules.VPSchedule` does, so it is differentiable in s.
* Flow matching: alpha = 1 - sigma_f, so tan s = sigma_f / (1 - sigma_f), sigma_f = sin s / (sin s + cos s)
  and x_t = x_s / (sin s + cos s); the network sees sigma_f * T.

Everything here is written with differentiable torch ops in ``s`` and ``x_s``, so ``torch.func.jvp`` gives
the tangent dF/ds along a direction (:func:`tangent`). Diffusers' default attention on CPU
(``scaled_dot_product_attention``'s flash kernel) has no forward-mode derivative: :func:`tangent` then runs
the network with plain attention (:func:`math_attention`), and if another op lacks forward mode it falls
back to a central finite difference, once with a warning naming the error.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .denoiser import Denoiser
from .schedules import FlowMatchSchedule, VPSchedule

HALF_PI = math.pi / 2


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


class TrigFlow:
    """TrigFlow time, state and velocity F of a :class:`Denoiser` (see the module docstring)."""

    def __init__(self, den: Denoiser):
        self.den = den
        sched = den.schedule
        if not isinstance(sched, (VPSchedule, FlowMatchSchedule)):
            raise TypeError(f"TrigFlow needs a VP or flow-matching schedule, got {type(sched).__name__}")
        self.vp = isinstance(sched, VPSchedule)
        if self.vp:  # -log alphas_cumprod is increasing in t: the table for t(s)
            self._neg_log_ac = (-sched._log_ac).clone()

    # -- time ---------------------------------------------------------------------------------
    def s_of_t(self, t) -> torch.Tensor:
        """TrigFlow time of the schedule's training time ``t`` (B,), float64."""
        a, s = self.den.schedule.alpha_sigma(self.den.schedule._t(t))
        return torch.atan2(s.double(), a.double())

    def t_of_s(self, s: torch.Tensor) -> torch.Tensor:
        """The schedule's training time of TrigFlow time ``s`` (differentiable in s)."""
        s = s.double()
        if self.vp:
            target = -2 * torch.log(torch.cos(s))  # -log alpha^2
            tab = self._neg_log_ac.to(s.device)
            hi = torch.searchsorted(tab, target.detach()).clamp(1, len(tab) - 1)
            lo = hi - 1
            w = (target - tab[lo]) / (tab[hi] - tab[lo])
            return lo.double() + w
        sig_f = torch.sin(s) / (torch.sin(s) + torch.cos(s))
        return self.den.schedule.t_from_sigma(sig_f)

    def s_range(self, t_min: float, t_max: float) -> tuple[float, float]:
        return float(self.s_of_t(torch.tensor([float(t_min)]))[0]), float(self.s_of_t(torch.tensor([float(t_max)]))[0])

    def model_time(self, s: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at TrigFlow time s (differentiable)."""
        if self.vp:
            return self.t_of_s(s)
        return torch.sin(s.double()) / (torch.sin(s.double()) + torch.cos(s.double())) \
            * self.den.schedule.num_train_timesteps

    def alpha_sigma(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule's (alpha, sigma) at s, in closed form (differentiable)."""
        c, n = torch.cos(s.double()), torch.sin(s.double())
        if self.vp:
            return c, n
        k = c + n
        return c / k, n / k

    # -- state and velocity ----------------------------------------------------------------------
    def to_model_space(self, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a, n = self.alpha_sigma(s)
        return x_s * _b(torch.sqrt(a**2 + n**2), x_s)

    def x0(self, x_s: torch.Tensor, s: torch.Tensor, cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """The denoiser's x0 at (x_s, s); CFG combines the native predictions (linear in them)."""
        den = self.den
        x_t = self.to_model_space(x_s, s)
        tm = self.model_time(s).to(x_s.device, x_s.dtype)  # float32 for float32 inputs, as the networks expect
        if guidance_scale == 1.0 or cond is None:
            pred = den.backbone_at(x_t, tm, cond)
        else:
            unc = den._uncond_like(cond, x_t.shape[0])
            from .denoiser import _cat_cond

            p_u, p_c = den.backbone_at(torch.cat([x_t, x_t]), torch.cat([tm, tm]), _cat_cond(unc, cond)).chunk(2)
            pred = p_u + guidance_scale * (p_c - p_u)
        a, n = self.alpha_sigma(s)
        a, n = _b(a, x_t), _b(n, x_t)
        pt, x_t, pred = den.prediction_type, x_t.to(pred.dtype), pred
        if pt == "epsilon":
            return (x_t - n * pred) / a
        if pt == "sample":
            return pred
        if pt == "v_prediction":
            return (a * x_t - n * pred) / (a**2 + n**2)
        if pt == "flow_prediction":
            return (x_t - n * pred) / (a + n)
        raise ValueError(f"unknown prediction type {pt!r}")

    def F(self, x_s: torch.Tensor, s: torch.Tensor, cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """TrigFlow velocity F = (cos(s) x_s - x0) / sin(s)."""
        x0 = self.x0(x_s, s, cond, guidance_scale)
        return (_b(torch.cos(s), x_s) * x_s - x0) / _b(torch.sin(s), x_s)


@contextlib.contextmanager
def math_attention(module: torch.nn.Module):
    """Run diffusers attention layers with the plain (matmul + softmax) processor inside the block."""
    from .attention import attention_layers, set_attention

    layers = attention_layers(module)
    before = [m.processor for m in layers]
    set_attention(module, "math")
    try:
        yield
    finally:
        for m, p in zip(layers, before):
            m.set_processor(p)


_FD_WARNED: set[str] = set()


def tangent(fn, x: torch.Tensor, s: torch.Tensor, tx: torch.Tensor, ts: torch.Tensor, mode: str = "auto",
            fd_size: float = 1e-3, module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(fn(x, s), d fn(x + h tx, s + h ts)/dh at h = 0, how)`` without building a graph.

    ``mode``: ``jvp`` (``torch.func.jvp``; errors propagate), ``fd`` (central difference with step ``fd_size``)
    or ``auto`` (jvp with plain attention in ``module``; on an op without forward-mode support, fd with one
    warning). ``how`` says which ran."""
    if mode not in ("auto", "jvp", "fd"):
        raise ValueError(f"tangent mode must be auto | jvp | fd, got {mode!r}")
    with torch.no_grad():
        if mode in ("auto", "jvp"):
            try:
                ctx = math_attention(module) if module is not None else contextlib.nullcontext()
                with ctx:
                    out, tan = torch.func.jvp(fn, (x, s), (tx, ts))
                return out, tan, "jvp"
            except (NotImplementedError, RuntimeError) as e:
                if mode == "jvp":
                    raise
                key = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if key not in _FD_WARNED:
                    _FD_WARNED.add(key)
                    warnings.warn(f"forward-mode AD failed ({key}); using a finite-difference tangent "
                                  f"(step {fd_size:g})", RuntimeWarning, stacklevel=2)
        h = fd_size
        out = fn(x, s)
        tan = (fn(x + h * tx, s + h * ts) - fn(x - h * tx, s - h * ts)) / (2 * h)
        return out, tan, "fd"
