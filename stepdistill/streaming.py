"""Chunk-causal and streaming few-step video generation with a per-frame-timestep video backbone.

A clip (B, C, F, H, W) is generated in chunks of ``c`` frames (F = n c). Each chunk runs the student's K-step
chain tau_0 > ... > tau_{K-1} (x0 = G(x_tau, tau), then re-noised to the next tau with fresh noise, as any
few-step student), and the network sees, beside the chunk, the *clean* frames already generated (at timestep 0:
the role of the KV cache of CausVid / Self-Forcing, recomputed over a bounded window instead of cached). Every
frame of the window carries its own timestep (Wan's per-token timesteps, ``timestep`` (B, tokens)).

Two schedules of the same network:

* ``chunked`` (CausVid, Yin et al. 2025; Self-Forcing, Huang et al. 2025): chunk k runs all K steps before
  chunk k+1 starts. Chunk k depends on the noise of chunks <= k only: the model is causal over chunks.
* ``pipelined`` (StreamDiT, Kodaira et al. 2025; rolling / diffusion-forcing buffers): a moving buffer holds K
  chunks at increasing noise levels (the oldest at tau_{K-1}, the newest at tau_0). One network call on
  [context, buffer] advances every chunk by one step; the oldest leaves clean, a fresh noise chunk enters. Frames
  stream out at a fixed cost: one forward per chunk instead of K. Chunk k then depends on the noise of chunks
  < k + K (those sharing its buffer), never on later ones.

:func:`rollout` is a generator that yields every chunk as soon as it is final, so a pipeline can show frames while
the next ones are computed; training (Self-Forcing: DMD on the student's own rollouts) and sampling run the same
code. The context is the last ``context`` clean frames (0: all of them), so a stream may run past the training
length with a bounded window.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .denoiser import Denoiser

MODES = ("chunked", "pipelined")


def frame_x0(den: Denoiser, x: torch.Tensor, t_frames: torch.Tensor, cond) -> torch.Tensor:
    """x0 (B, C, F, H, W) of a flow-matching video backbone whose frame f sits at training time ``t_frames[:, f]``
    (B, F): the model timestep sigma_f * T is given to every token of frame f, and x0 = x - sigma_f v."""
    sched = den.schedule
    if sched.kind != "flow":
        raise ValueError("per-frame timesteps need a flow-matching video backbone (Wan); got a "
                         f"{sched.kind} schedule")
    p_t, p_h, p_w = den.backbone.config.patch_size
    if p_t != 1:
        raise ValueError(f"per-frame timesteps need patch_size[0] == 1 (one frame per token), got {p_t}")
    B, _, F, H, W = x.shape
    sig = sched.sigma_of(t_frames.to(torch.float64)).float().to(x.device)       # (B, F)
    tm = (sig * sched.num_train_timesteps).repeat_interleave((H // p_h) * (W // p_w), dim=1)   # (B, F h w)
    v = den.backbone_at(x, tm, cond)                                             # eps - x0
    return x - sig.view(B, 1, F, 1, 1) * v.float()


def rollout(den: Denoiser, noise: torch.Tensor, cond, timesteps: list[float], chunk: int, mode: str = "chunked",
            context: int = 0, randn: Callable[[tuple], torch.Tensor] | None = None, exit_step: int | None = None,
            grad: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(k, x0 of chunk k)`` (B, C, c, H, W) in order (module docstring).

    ``noise``: the starting noise of the whole clip (B, C, n c, H, W); ``randn(shape)``: the fresh noise of each
    re-noising, drawn in a fixed order (default ``torch.randn``); ``exit_step`` j: chunks end at step j of the
    chain (Self-Forcing's random exit step in training; default K - 1); ``grad``: keep the graph of the exit
    step's network call (earlier steps and the context are detached, as in Self-Forcing)."""
    if mode not in MODES:
        raise ValueError(f"mode must be {' | '.join(MODES)}, got {mode!r}")
    B, C, F, H, W = noise.shape
    if chunk < 1 or F % chunk:
        raise ValueError(f"the clip's {F} frames do not split into chunks of {chunk}")
    randn = randn or (lambda shape: torch.randn(shape))
    ts = [float(t) for t in timesteps][: (len(timesteps) if exit_step is None else exit_step + 1)]
    K, n = len(ts), F // chunk
    active: list[list] = []              # [chunk index, x at its current step, step]
    ctx: list[torch.Tensor] = []         # clean frames (B, C, 1, H, W) generated so far
    nxt = 0
    while nxt < n or active:
        if nxt < n and (len(active) < (K if mode == "pipelined" else 1)):
            active.append([nxt, noise[:, :, nxt * chunk:(nxt + 1) * chunk], 0])
            nxt += 1
        window = ctx[-context:] if context else ctx
        xs = window + [a[1] for a in active]
        x = torch.cat(xs, 2)
        t = torch.tensor([0.0] * len(window) + [ts[a[2]] for a in active for _ in range(chunk)])
        exiting = any(a[2] == K - 1 for a in active)
        with torch.set_grad_enabled(grad and exiting):
            x0 = frame_x0(den, x, t.expand(B, -1), cond)
        pos, keep = len(window), []
        for a in active:
            out = x0[:, :, pos:pos + chunk]
            pos += chunk
            if a[2] == K - 1:
                yield a[0], out
                ctx.extend(out.detach().split(1, dim=2))
            else:
                nxt_t = torch.full((B,), ts[a[2] + 1], device=out.device)
                a[1] = den.schedule.add_noise(out.detach(), randn(tuple(out.shape)).to(out.device), nxt_t)
                a[2] += 1
                keep.append(a)
        active = keep


def generate_clip(den: Denoiser, noise: torch.Tensor, cond, timesteps: list[float], chunk: int,
                  mode: str = "chunked", context: int = 0, randn=None, exit_step: int | None = None,
                  grad: bool = False) -> torch.Tensor:
    """The whole clip (B, C, F, H, W) of :func:`rollout`."""
    return torch.cat([x for _, x in rollout(den, noise, cond, timesteps, chunk, mode, context, randn, exit_step,
                                            grad)], 2)

