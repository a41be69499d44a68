"""Causal and streaming video students: DMD on the student's own chunk-by-chunk rollouts (``method: self_forcing``).

Self-Forcing (Huang et al. 2025, "Self Forcing: Bridging the Train-Test Gap in Autoregressive Video Diffusion"):
an autoregressive few-step student is trained on what it generates at inference, not on teacher-forced
context. Each generator step rolls the student out chunk by chunk (:func:`stepdistill.streaming.rollout`: every
chunk conditioned on the clean frames it produced before), with one random exit step j ~ U{0..K-1} for the
chain (Sec. 3.2: the rollout stops at step j and only that network call keeps its graph; the context is
detached), and the whole clip gets DMD2's distribution-matching gradient from the bidirectional teacher and the
critic (DMD Eq. 7; the critic, GAN head and two time-scale updates are DMD2's, :class:`DMDObjective`).

Initialisation (CausVid, Yin et al. 2025, Sec. 3.3, "ODE initialisation"): the student first regresses the
teacher's ODE pairs chunk-wise with teacher forcing: for a random chunk k, the teacher's own clean frames of
chunks < k as context and the pair's noise for chunk k, ``|| G([y_{<k}, z_k], tau_0)_k - y_k ||^2``
(``dmd.regression_warmup_steps`` on ``dmd.regression_pairs`` pairs, as DMD2's warm-up).

``causal.mode: pipelined`` trains and samples the StreamDiT-style moving buffer (Kodaira et al. 2025): the
K chunks in the buffer sit at increasing noise levels and one network call advances them all, so frames stream
out at one forward per chunk. Its rollouts are what it is trained on (self forcing again).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..streaming import MODES, frame_x0, generate_clip
from .dmd import DMDConfig, DMDObjective, check_dmd_section
from .objective import Ctx


@dataclass
class CausalConfig:
    """``method: self_forcing``: chunk-causal (or pipelined streaming) video students (trainers/causal.py)."""
    chunk_frames: int = 2          # frames generated together (a chunk); the clip's frames must split into chunks
    mode: str = "chunked"          # chunked (Self-Forcing / CausVid) | pipelined (StreamDiT's moving buffer)
    context_frames: int = 0        # clean frames the network sees beside its chunk(s); 0 = all earlier frames


class CausalDMDObjective(DMDObjective):
    """DMD2 whose generator is the causal rollout (module docstring)."""

    def __init__(self, *args, causal: CausalConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal = causal
        if self.student.kind != "wan" or self.student.schedule.kind != "flow":
            raise ValueError("method self_forcing needs a flow-matching video teacher (WanTransformer3DModel); got a "
                             f"{self.student.kind} backbone with a {self.student.schedule.kind} schedule")
        frames = self.shape[1]
        if frames % causal.chunk_frames:
            raise ValueError(f"causal.chunk_frames: {causal.chunk_frames} does not divide the clip's {frames} frames")

    def _rollout(self, den: Denoiser, noise, cond, randn, exit_step=None, grad=False) -> torch.Tensor:
        c = self.causal
        return generate_clip(den, noise, cond, self.timesteps, c.chunk_frames, c.mode, c.context_frames, randn,
                             exit_step, grad)

    def generate(self, ctx: Ctx, cond, grad: bool) -> tuple[torch.Tensor, int]:
        """The student's own rollout of the whole clip, ending every chunk at one random step j (Self-Forcing)."""
        K = len(self.timesteps)
        j = ctx.scalar_randint(0, K) if K > 1 else 0
        noise = ctx.randn(*self.shape)                                   # (B, C, F, H, W)
        x = self._rollout(self.student, noise, cond, lambda s: ctx.randn(*s[1:]), exit_step=j, grad=grad)
        return x, j

    def regression_loss(self, ctx: Ctx) -> torch.Tensor:
        """CausVid's ODE initialisation: one random chunk, teacher-forced context (module docstring)."""
        z, y, cond = self.pair_batch(ctx)                                    # (B, C, F, H, W) each
        c = self.causal.chunk_frames
        k = ctx.scalar_randint(0, self.shape[1] // c)
        context = y[:, :, :k * c]
        if self.causal.context_frames:
            context = context[:, :, max(0, k * c - self.causal.context_frames):]
        window = torch.cat([context, z[:, :, k * c:(k + 1) * c]], 2)
        t = torch.tensor([0.0] * context.shape[2] + [self.timesteps[0]] * c).expand(z.shape[0], -1)
        pred = frame_x0(self.student, window, t, cond)[:, :, -c:]
        return F.mse_loss(pred.float(), y[:, :, k * c:(k + 1) * c].float())

    @torch.no_grad()
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor:
        den = Denoiser(ema["generator"], self.student.schedule, self.student.prediction_type)
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(n, *self.shape, generator=g).to(device)
        return self._rollout(den, noise, self.conds.grid(n, device), lambda s: torch.randn(s, generator=g))


def build_causal(cfg, teacher=None, meta=None, data=None, text_bank=None):
    from .dmd_method import build_dmd_family

    return build_dmd_family(cfg, teacher, meta, data, text_bank,
                            make_objective=lambda *a, **k: CausalDMDObjective(*a, causal=cfg.causal, **k))


def export_causal(ema: dict[str, nn.Module], obj, cfg, meta, out):
    """The student folder (as DMD2's) with the chunking it was trained for: ``stepdistill.json`` ``extra.causal``
    and ``model_index.json`` ``causal``, read by :class:`~stepdistill.pipelines.video.StepDistillVideoPipeline`."""
    from .export import ExportParts, export_student

    causal = asdict(cfg.causal)
    return export_student(ema["generator"], cfg, meta, out, schedule=obj.student.schedule,
                          parts=ExportParts(meta={"causal": causal}, index={"causal": causal},
                                            pipeline="StepDistillVideoPipeline"))


def check_causal(cfg, check) -> None:
    c = cfg.causal
    check_dmd_section(cfg, check)
    check(c.chunk_frames >= 1, "causal.chunk_frames", f"must be >= 1, got {c.chunk_frames}")
    check(c.mode in MODES, "causal.mode", f"must be {' | '.join(MODES)}, got {c.mode!r}")
    check(c.context_frames >= 0, "causal.context_frames", f"must be >= 0 (0 = all earlier frames), got "
                                                          f"{c.context_frames}")
    check(cfg.data.frames % c.chunk_frames == 0, "causal.chunk_frames",
          f"must divide data.frames ({cfg.data.frames}), got {c.chunk_frames}")


CARD = ("Self-Forcing (causal few-step video; Huang et al. 2025) with CausVid's ODE initialisation",
    "An autoregressive student that generates a video chunk by chunk, each chunk conditioned on the clean frames "
    "it generated before, trained with DMD on its own rollouts (self forcing) after a teacher-forced regression "
    "on the teacher's ODE pairs. In the pipelined mode (StreamDiT) a moving buffer of chunks at increasing noise "
    "levels is advanced by one network call per emitted chunk.")


def _method():
    from ..methods import Method
    from .dmd_method import describe_dmd_run, generator_ema

    return Method("self_forcing", build=build_causal, ema_modules=generator_ema, export=export_causal,
                  pipeline="StepDistillVideoPipeline", curve=False,
                  description="Self-Forcing (Huang et al. 2025): causal chunk-wise video student, DMD on its own "
                              "rollouts; causal.mode=pipelined: StreamDiT's moving buffer",
                  sections={"dmd": DMDConfig, "causal": CausalConfig}, checks=check_causal, card=CARD,
                  describe_run=describe_dmd_run)


METHOD = _method()
