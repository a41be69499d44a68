"""Noise schedules: discrete VP (DDPM) and rectified flow / flow matching, behind one API.

Both write the forward process as ``x_t = alpha_t * x0 + sigma_t * eps`` with a continuous
training time ``t`` in ``[0, T)`` (``T = num_train_timesteps``, usually 1000):

* VP (Ho et al. 2020): ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``.
  ``alphas_cumprod`` comes from any diffusers scheduler config (beta_schedule, betas, ...).
  Non-integer ``t`` interpolates ``log alphas_cumprod`` linearly (exact at integers).
* Flow matching (Lipman et al. 2023; SD3, Esser et al. 2024, Eq. 3 and the shift of Sec. 5.3.2):
  ``sigma = shift * s / (1 + (shift - 1) * s)`` with ``s = t / T``; ``alpha = 1 - sigma``.

Predictions convert exactly through (x0, eps), valid for any (alpha, sigma):

* ``epsilon``: eps;  ``sample``: x0;
* ``v_prediction`` (Salimans & Ho 2022, Eq. 5 generalised): ``v = alpha*eps - sigma*x0``
  so ``x0 = (alpha*x_t - sigma*v) / (alpha^2 + sigma^2)``, ``eps = (sigma*x_t + alpha*v) / (alpha^2 + sigma^2)``;
* ``flow_prediction`` (velocity ``dx_t/dsigma`` of the flow path): ``u = eps - x0``
  so ``x0 = (x_t - sigma*u) / (alpha + sigma)``, ``eps = (x_t + alpha*u) / (alpha + sigma)``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``like``'s rank."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    """Base class: subclasses define ``alpha_sigma(t)`` and ``model_timestep(t)``."""

    kind: str = "base"
    num_train_timesteps: int = 1000

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,), (B,)
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the backbone network is conditioned on."""
        raise NotImplementedError

    def to_config(self) -> dict:
        raise NotImplementedError

    # -- shared math ------------------------------------------------------------------
    def _t(self, t, batch: int | None = None, device=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim == 0:
            t = t.repeat(batch or 1)
        return t

    def alpha(self, t) -> torch.Tensor:
        return self.alpha_sigma(self._t(t))[0]

    def sigma(self, t) -> torch.Tensor:
        return self.alpha_sigma(self._t(t))[1]

    def snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(self._t(t))
        return a**2 / s**2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Forward process ``x_t = alpha_t x0 + sigma_t eps``. ``t``: scalar or (B,)."""
        a, s = self.alpha_sigma(self._t(t, x0.shape[0], x0.device))
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    def pred_to_x0_eps(self, pred, x_t, t, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Any prediction -> (x0, eps), exact (see module docstring)."""
        a, s = self.alpha_sigma(self._t(t, x_t.shape[0], x_t.device))
        a, s = _bcast(a, x_t), _bcast(s, x_t)
        if prediction_type == "epsilon":
            return (x_t - s * pred) / a, pred
        if prediction_type == "sample":
            return pred, (x_t - a * pred) / s
        if prediction_type == "v_prediction":
            n = a**2 + s**2
            return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
        if prediction_type == "flow_prediction":
            n = a + s
            return (x_t - s * pred) / n, (x_t + a * pred) / n
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def x0_eps_to_pred(self, x0, eps, t, prediction_type: str) -> torch.Tensor:
        """(x0, eps) -> the given prediction type (the regression target of a denoising loss)."""
        a, s = self.alpha_sigma(self._t(t, x0.shape[0], x0.device))
        a, s = _bcast(a, x0), _bcast(s, x0)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return a * eps - s * x0
        if prediction_type == "flow_prediction":
            return eps - x0
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def convert(self, pred, x_t, t, from_type: str, to_type: str) -> torch.Tensor:
        x0, eps = self.pred_to_x0_eps(pred, x_t, t, from_type)
        return self.x0_eps_to_pred(x0, eps, t, to_type)

    def eps_from_x0(self, x0, x_t, t) -> torch.Tensor:
        return self.pred_to_x0_eps(x0, x_t, t, "sample")[1]

    def sample_t(self, n: int, t_min: float, t_max: float, generator=None, device=None) -> torch.Tensor:
        """Uniform training times. VP schedules draw integers in [t_min, t_max] like DDPM."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return t_min + u * (t_max - t_min)


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule built from a diffusers scheduler config."""

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, config: dict | None = None):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(alphas_cumprod)
        self._log_ac = torch.log(self.alphas_cumprod)
        ac = self._log_ac.exp()  # alpha_sigma's values at integer t, computed by the same ops (bit-identical)
        self._alpha_tab, self._sigma_tab = ac.sqrt().float(), (1 - ac).clamp_min(0).sqrt().float()
        self.config = dict(config or {})

    @classmethod
    def from_scheduler_config(cls, config: dict | str | Path) -> "VPSchedule":
        """Any DDPM-family diffusers scheduler config (dict, json file or folder)."""
        from diffusers import DDPMScheduler

        if not isinstance(config, dict):
            p = Path(config)
            p = p / "scheduler_config.json" if p.is_dir() else p
            config = json.loads(p.read_text())
        sched = DDPMScheduler.from_config(config)
        return cls(sched.alphas_cumprod.clone(), {k: v for k, v in config.items() if not k.startswith("_")})

    def alpha_sigma(self, t):
        t = self._t(t).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().cpu()
        if bool((t.cpu() == lo).all()):  # integer times (training draws them): a table look-up
            return self._alpha_tab[lo].to(t.device), self._sigma_tab[lo].to(t.device)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = (t.cpu() - lo.double())
        log_ac = self._log_ac[lo] * (1 - w) + self._log_ac[hi] * w
        ac = log_ac.exp().to(t.device)
        return ac.sqrt().float(), (1 - ac).clamp_min(0).sqrt().float()

    def model_timestep(self, t):
        return self._t(t).float()

    def sample_t(self, n, t_min, t_max, generator=None, device=None):
        # DDPM trains on integer timesteps; keep that so losses match diffusers' add_noise exactly.
        lo, hi = int(math.ceil(t_min)), int(math.floor(t_max))
        return torch.randint(lo, hi + 1, (n,), generator=generator, device=device).double()

    def to_config(self) -> dict:
        return {"kind": "vp", **self.config}


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps`` with SD3-style shifted sigmas."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "FlowMatchSchedule":
        return cls(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))

    def sigma_of(self, t):
        s = self._t(t) / self.num_train_timesteps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def t_from_sigma(self, sigma) -> torch.Tensor:
        """Inverse of :meth:`sigma_of`: the training time ``t`` whose (shifted) sigma is ``sigma``."""
        sig = torch.as_tensor(sigma, dtype=torch.float64)
        return sig / (self.shift - (self.shift - 1) * sig) * self.num_train_timesteps

    def alpha_sigma(self, t):
        sig = self.sigma_of(t)
        return (1 - sig).float(), sig.float()

    def model_timestep(self, t):
        # SD3 / Flux pipelines feed sigma * 1000 to the transformer.
        return (self.sigma_of(t) * self.num_train_timesteps).float()

    def to_config(self) -> dict:
        return {"kind": "flow", "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}


def schedule_from_config(config: dict) -> NoiseSchedule:
    """Pick the schedule family from a diffusers scheduler config (or our own ``kind`` key)."""
    name = config.get("_class_name", "")
    # ``dict(scheduler.config)`` of a live diffusers scheduler carries no ``_class_name``: recognise
    # flow-matching configs by their ``shift`` key (DDPM-family configs have betas instead).
    flow_keys = "shift" in config and "beta_schedule" not in config and "trained_betas" not in config
    if config.get("kind") == "flow" or "FlowMatch" in name or (config.get("kind") != "vp" and flow_keys):
        return FlowMatchSchedule.from_scheduler_config(config)
    return VPSchedule.from_scheduler_config({k: v for k, v in config.items() if k != "kind"})
