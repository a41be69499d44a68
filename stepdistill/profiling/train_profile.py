"""``stepdistill bench --train``: where one training step's time goes.

Runs a few steps of a distillation config exactly as ``stepdistill distill`` would (same builder,
same :class:`~stepdistill.trainers.core.Trainer` step) and splits each step into

* the forward passes of every network (teacher, student, critic, GAN head, ...), timed by forward
  hooks on the networks themselves, with the number of calls per step;
* the backward passes (``loss.backward()`` of every update);
* bookkeeping: optimizer steps, EMA, and ``other`` (everything else: noise and batch drawing,
  loss arithmetic, Python).

``step_over_passes = step_s / (forwards + backwards)`` says how close the loop is to its floor (1.0):
on the shipped 1.1M-parameter UNet a DMD2 step is compute-bound; on a tiny custom module the
loop's own overhead shows. ``--tiny`` profiles such a module (:class:`TinyConvNet`) on 16x16 digits.
Prints JSON; no file is written unless ``--out`` is given.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch
import torch.nn as nn

from ..denoiser import Denoiser


class TinyConvNet(nn.Module):
    """A custom ``nn.Module`` denoiser: forward(x_t (B,1,H,W), t (B,), labels (B,)) -> eps, with a
    ``bottleneck`` for the GAN head. About 10k parameters: its passes take well under a millisecond."""

    sample_shape = (1, 16, 16)  # what it denoises: data-free methods (BOOT) draw noise of this shape

    def __init__(self, num_classes: int = 10, ch: int = 16):
        super().__init__()
        self.emb = nn.Embedding(num_classes + 1, ch)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.bottleneck = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.SiLU())  # (B, ch, H/2, W/2)
        self.bottleneck_channels = ch
        self.out = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x_t, t, cond):
        h = self.inp(x_t) + self.emb(cond)[:, :, None, None] + (t / 1000.0)[:, None, None, None]
        return self.out(self.bottleneck(h))


def tiny_teacher():
    """(Denoiser, ModelMeta) of a random :class:`TinyConvNet` on a linear-beta VP schedule (10 classes)."""
    from ..models import ModelMeta
    from ..schedules import VPSchedule

    torch.manual_seed(0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    teacher = Denoiser(TinyConvNet(), VPSchedule(torch.cumprod(1 - betas, 0)), "epsilon", null_class=10)
    meta = ModelMeta(prediction_type="epsilon", conditioning="class", class_names=[str(i) for i in range(10)],
                     null_class=10)
    return teacher, meta


def _networks(obj) -> dict[str, nn.Module]:
    """The objective's networks by role: Denoiser attributes (their backbones) and other modules (heads)."""
    nets = {}
    for name, v in vars(obj).items():
        if isinstance(v, Denoiser):
            nets[name] = v.backbone
        elif isinstance(v, nn.Module):
            nets[name] = v
        elif isinstance(v, (list, tuple)) and v and all(isinstance(d, Denoiser) for d in v):
            nets.update({f"{name}_{i}": d.backbone for i, d in enumerate(v)})
    return nets


class _ForwardClock:
    """Forward hooks: wall seconds and calls per network (nested calls of one network count once)."""

    def __init__(self, nets: dict[str, nn.Module]):
        self.seconds = {n: 0.0 for n in nets}
        self.calls = {n: 0 for n in nets}
        self._t0: dict[str, float] = {}
        self._handles = []
        for n, m in nets.items():
            self._handles.append(m.register_forward_pre_hook(lambda mod, inp, n=n: self._start(n)))
            # always_call: a pass that Denoiser.features ends early at the bottleneck still counts
            self._handles.append(m.register_forward_hook(lambda mod, inp, out, n=n: self._stop(n), always_call=True))

    def _start(self, n):
        self._t0.setdefault(n, time.perf_counter())

    def _stop(self, n):
        t0 = self._t0.pop(n, None)
        if t0 is not None:
            self.seconds[n] += time.perf_counter() - t0
            self.calls[n] += 1

    def reset(self):
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def remove(self):
        for h in self._handles:
            h.remove()


def profile_training(config: str | None = None, overrides: list[str] | None = None, steps: int = 3,
                     warmup: int = 1, tiny: bool = False) -> dict:
    """Profile ``steps`` training steps (after ``warmup`` untimed ones) of a distill config; see the module
    docstring for the fields. ``tiny``: a :class:`TinyConvNet` teacher on 16x16 digits instead of the
    config's teacher."""
    from ..config import DistillConfig, load_config
    from ..trainers.core import StepTimer, Trainer
    from ..trainers.distill import build_method

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    # DMD2 steps are profiled: a config's regression warm-up is switched off unless the overrides ask for it
    over = ["dmd.regression_warmup_steps=0"] + list(overrides or [])
    teacher = meta = None
    if tiny:
        teacher, meta = tiny_teacher()
        over = ["data.name=digits", "data.resolution=16", "dmd.teacher=custom"] + over
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(DistillConfig, config, over + [f"output_dir={tmp}", f"train.max_steps={steps + warmup}"])
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        obj, data, _ = build_method(cfg, teacher=teacher, meta=meta)
        trainer = Trainer(obj, cfg, data=data)
        clock = _ForwardClock(_networks(obj))
        step_times, fwd, calls, timers = [], [], [], []
        try:
            for i in range(warmup + steps):
                clock.reset()
                trainer.timer = StepTimer()
                t0 = time.perf_counter()
                trainer._run_step()
                dt = time.perf_counter() - t0
                trainer.step += 1
                trainer.update = 0
                if i >= warmup:
                    step_times.append(dt)
                    fwd.append(dict(clock.seconds))
                    calls.append(dict(clock.calls))
                    timers.append(dict(trainer.timer.seconds))
        finally:
            clock.remove()
            trainer.timer = None

    def mean(rows, key):
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    step_s = sum(step_times) / steps
    forwards = {n: mean(fwd, n) for n in fwd[0]}
    backward = mean(timers, "backward")
    passes = sum(forwards.values()) + backward
    opt, ema = mean(timers, "optimizer"), mean(timers, "ema")
    return {
        "config": config, "model": "tiny_custom" if tiny else cfg.dmd.teacher, "method": cfg.method,
        "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "device": str(trainer.acc.device),
        "steps_timed": steps, "updates_per_step": len(obj.updates(warmup)),
        "step_s": step_s, "step_s_median": statistics.median(step_times),
        "passes_s": {**{f"forward.{n}": v for n, v in forwards.items()}, "backward": backward},
        "forward_calls_per_step": {n: calls[0][n] for n in calls[0]},
        "sum_of_passes_s": passes,
        "step_over_passes": step_s / passes if passes > 0 else None,
        "bookkeeping_s": {"optimizer": opt, "ema": ema, "other": step_s - passes - opt - ema},
    }
