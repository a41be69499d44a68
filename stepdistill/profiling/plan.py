"""Per-GPU memory of DMD2 training, planned from the real architecture and one measured constant.

    stepdistill plan --teacher sdxl --mode lora --gpus 8 --fsdp --dtype bf16 --batch 1 --resolution 1024

Nothing here is a hard-coded figure. Parameters are counted on the meta device (no memory) from the
architecture (:mod:`stepdistill.architectures`, or a diffusers folder); LoRA adapters are injected there
too (peft), so their count is exact. Activations come from a *trace*: one student forward at batch 1 on
the meta device under ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps
for the backward pass (distinct storages, parameters excluded; attention as the fused kernels every
current backend picks, which keep q, k, v, the output and the log-sum-exp, not the score matrix).
With gradient checkpointing the trace keeps each checkpointed block's inputs plus the largest block's
own tensors (what its recomputation holds). One DMD2 step keeps several such graphs alive at once
(student + critic in the generator update; the critic's denoising and GAN branches in its own), and
allocators keep slack; the ratio of measured peak activations to the trace is the measured constant
``activation_factor`` (``assets/memory_calibration.json``, written by ``python -m
stepdistill.profiling.memory --arch ... --calibrate``; it says which measurement it came from). Checkpointing
has its own constant, ``activation_factor_checkpointed``: its backward recomputes one block at a time and
holds that block's gradients too, so its peak is a larger multiple of a smaller trace.

Per GPU, with P backbone parameters, P_l LoRA parameters of one role, N GPUs, b bytes of ``--dtype``:

=============  ==========================================  ===================
teacher        P * b (LoRA: the shared frozen base)         / N with --shard-teacher
student        weights 4P, gradients 4P, AdamW moments 8P   / N with --fsdp
critic         the same, plus the GAN head                  / N with --fsdp
EMA            4P of the student                            / N with --fsdp
activations    factor * trace(R, b) * batch                 per GPU, never sharded
=============  ==========================================  ===================

(LoRA: the trainable 4 / 4 / 8 bytes apply to P_l; the master weights of trainable parameters stay
float32 under bf16 autocast, as in our trainer and FSDP2's mixed precision.)
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

CALIBRATION = Path(__file__).resolve().parents[1] / "assets" / "memory_calibration.json"
GIB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "sd3": 333, "flux": 512,   # prompt tokens the family's encoders give
               "wan-1.3b": 512, "wan-14b": 512}                   # (Wan: UMT5, 512)
LATENT_FACTOR = {"sd15": 8, "sdxl": 8, "sd3": 8, "flux": 8,       # VAE downsampling: pixels -> latent side
                 "wan-1.3b": 8, "wan-14b": 8}
TEMPORAL_FACTOR = {"wan-1.3b": 4, "wan-14b": 4}                   # video VAE: frames 1 + 4 k -> latent frames 1 + k


def latent_frames(teacher: str, frames: int) -> int:
    """Latent frames of a ``frames``-frame clip for a video teacher (Wan's causal VAE: 1 + (F - 1) / 4); 0 for
    image teachers."""
    f = TEMPORAL_FACTOR.get(teacher)
    return 0 if f is None else 1 + (max(frames, 1) - 1) // f


@dataclass
class PlanRequest:
    teacher: str = "sd15"          # sd15 | sdxl | sd3 | flux | wan-1.3b | wan-14b | a diffusers folder
    mode: str = "full"             # full | lora
    gpus: int = 1
    fsdp: bool = False
    shard_teacher: bool = False
    dtype: str = "bf16"            # fp32 | bf16: frozen teacher weights and activations
    batch: int = 1                 # per-GPU micro-batch
    resolution: int = 512          # pixels (latent side = resolution / VAE factor)
    frames: int = 81               # video teachers: frames per clip (Wan's default 81 -> 21 latent frames)
    lora_rank: int = 64
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    gradient_checkpointing: bool = False
    ema: bool = True
    gpu_gib: float = 80.0          # per-GPU memory to compare against

    @classmethod
    def from_measurement(cls, m: dict) -> "PlanRequest":
        """The request describing one ``python -m stepdistill.profiling.memory --arch`` measurement (for validation)."""
        return cls(teacher=m["arch"], mode="lora" if m["lora_rank"] > 0 else "full",
                   dtype="bf16" if m["teacher_dtype"] == "bfloat16" else "fp32", batch=m["batch_size"],
                   resolution=LATENT_FACTOR[m["arch"]] * m["latent_side"], lora_rank=max(m["lora_rank"], 1),
                   gradient_checkpointing=m["gradient_checkpointing"], gpu_gib=1e9)

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ConfigError(f"--mode must be full | lora, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for k in ("gpus", "batch", "resolution", "frames"):
            if getattr(self, k) < 1:
                raise ConfigError(f"--{k} must be >= 1, got {getattr(self, k)}")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 with --mode lora, got {self.lora_rank}")
        if self.shard_teacher and not self.fsdp:
            raise ConfigError("--shard-teacher needs --fsdp")


# -- the network on the meta device --------------------------------------------------------------------------
def meta_network(teacher: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, int, int]:
    """(backbone on the meta device, latent-side factor, prompt tokens) of a named architecture or a folder."""
    from ..architectures import ARCHITECTURES, build_architecture

    if teacher in ARCHITECTURES:
        return build_architecture(teacher, "meta", dtype), LATENT_FACTOR[teacher], TEXT_TOKENS[teacher]
    if teacher.startswith("builtin:"):
        from ..shipped import resolve_shipped

        teacher = str(resolve_shipped(teacher))
    folder = Path(teacher)
    if not folder.is_dir():
        raise ConfigError(f"--teacher {teacher!r} is neither a known architecture ({', '.join(ARCHITECTURES)}) "
                          "nor a folder")
    import diffusers

    from ..denoiser import BACKBONE_KINDS

    for sub in ("unet", "transformer", ""):
        cfg_path = folder / sub / "config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("_class_name") in BACKBONE_KINDS:
                with torch.device("meta"):
                    net = getattr(diffusers, cfg["_class_name"]).from_config(
                        {k: v for k, v in cfg.items() if not k.startswith("_")})
                factor = 8 if (folder / "vae").is_dir() else 1
                return _cast(net, dtype), factor, 77
    raise ConfigError(f"--teacher {teacher}: no diffusers backbone config (unet/, transformer/ or config.json) "
                      f"with a class in {sorted(BACKBONE_KINDS)}")


def _cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net.to(dtype)`` without diffusers' warning about modules kept in float32 (a meta network holds no values)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return net.to(dtype)
    finally:
        dlog.set_verbosity(level)


def example_inputs(den, batch: int, side: int, tokens: int, device="meta", dtype=torch.float32, frames: int = 0):
    """(x_t, model timestep, condition) of the right shapes for ``den``'s family (random values); ``frames``:
    latent frames of a video backbone (x_t (B, C, frames, side, side))."""
    b, kind = den.backbone, den.kind
    c = b.config
    opts = {"device": device, "dtype": dtype}
    channels = c.in_channels // 4 if kind == "flux" else c.in_channels
    if kind == "wan":
        x = torch.randn(batch, channels, max(frames, 1), side, side, **opts)
    else:
        x = torch.randn(batch, channels, side, side, **opts)
    tm = torch.full((batch,), 500.0, device=device)
    cond = None
    if kind in ("unet2d", "dit") and (getattr(c, "num_class_embeds", None) or getattr(c, "num_embeds_ada_norm", None)):
        cond = torch.zeros(batch, dtype=torch.long, device=device)
    elif kind == "unet2d_cond":
        emb = torch.randn(batch, tokens, c.cross_attention_dim, **opts)
        if c.addition_embed_type == "text_time":   # SDXL: pooled text + six micro-conditioning ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            cond = {"emb": emb, "pooled": torch.randn(batch, pooled, **opts)}
        else:
            cond = emb
    elif kind == "pixart":
        cond = torch.randn(batch, tokens, c.caption_channels, **opts)
    elif kind == "wan":
        cond = torch.randn(batch, tokens, c.text_dim, **opts)
    elif kind in ("sd3", "flux"):
        cond = {"emb": torch.randn(batch, tokens, c.joint_attention_dim, **opts),
                "pooled": torch.randn(batch, c.pooled_projection_dim, **opts)}
        if kind == "flux" and c.guidance_embeds:
            cond["guidance"] = torch.full((batch,), 3.5, device=device)
    return x, tm, cond


# -- the activation trace ------------------------------------------------------------------------------------
def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """SDPA as the fused kernel (what a backend runs on real tensors); the meta device would otherwise trace
    the math path and keep the (L x L) score matrix."""
    if attn_mask is not None or enable_gqa:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                        scale=scale)[0]


_SDPA = F.scaled_dot_product_attention


class _SavedBytes:
    """Bytes of distinct non-parameter tensors autograd saves; checkpointed blocks go to their own bucket."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.total: dict[int, int] = {}
        self.stack: list[dict[int, int]] = []
        self.block_peak = 0

    def _add(self, t: torch.Tensor, into: dict) -> None:
        base = t._base if t._base is not None else t
        if id(base) in self.params or id(t) in self.params:
            return
        into[id(base)] = base.numel() * base.element_size()

    def pack(self, t):
        self._add(t, self.stack[-1] if self.stack else self.total)
        return t

    def checkpoint(self, module, *args):
        """diffusers' checkpoint function: keep the block's inputs, measure what its recomputation holds."""
        bucket: dict[int, int] = {}
        self.stack.append(bucket)
        try:
            out = module(*args)
        finally:
            self.stack.pop()
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point():
                self._add(a, self.stack[-1] if self.stack else self.total)
        self.block_peak = max(self.block_peak, sum(bucket.values()))
        return out

    @property
    def bytes(self) -> int:
        return sum(self.total.values()) + self.block_peak


def trace_activations(den, batch: int, side: int, tokens: int = 77, dtype=torch.float32,
                      gradient_checkpointing: bool = False, trainable: str = "full",
                      fused_attention: bool = True, frames: int = 0) -> dict:
    """Bytes autograd keeps for one forward of ``den`` (a Denoiser on the meta device, or on the CPU for checks).

    ``trainable``: ``full`` (every parameter requires grad), ``lora`` (only LoRA adapters: the frozen base
    keeps no inputs for its own weight gradients). ``fused_attention=False`` leaves SDPA to the backend (on
    real CPU tensors it picks the fused kernel itself; the tests compare the two). Returns
    ``{"bytes", "feature_shape"}``.
    """
    b = den.backbone
    params = list(b.parameters())
    for n, p in b.named_parameters():
        p.requires_grad_(trainable == "full" or "lora_" in n)
    tracer = _SavedBytes(params)
    feats = {}

    def shape_of(module, inputs, output):  # the GAN head's input (returns None: the output is left alone)
        feats.setdefault("shape", tuple((output[-1] if isinstance(output, tuple) else output).shape))

    hook = den._hook_module.register_forward_hook(shape_of) if den._hook_module is not None else None
    if gradient_checkpointing:
        b.enable_gradient_checkpointing(tracer.checkpoint)
    device = params[0].device
    x, tm, cond = example_inputs(den, batch, side, tokens, device, dtype, frames)
    if fused_attention:
        F.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            x = x.requires_grad_(True)  # the generator's gradient reaches its input chain
            out = den.backbone_at(x, tm, cond)
    finally:
        F.scaled_dot_product_attention = _SDPA
        if hook is not None:
            hook.remove()
        if gradient_checkpointing:
            b.disable_gradient_checkpointing()
    del out
    return {"bytes": tracer.bytes, "feature_shape": feats.get("shape")}


# -- parameter counts ----------------------------------------------------------------------------------------
def count_parameters(teacher: str, lora_rank: int = 0, lora_targets=("to_q", "to_k", "to_v", "to_out.0")) -> dict:
    """Backbone parameters, LoRA adapter parameters of one role (peft on the meta device) and the GAN head's."""
    net, factor, tokens = meta_network(teacher)
    out = {"backbone": sum(p.numel() for p in net.parameters())}
    if lora_rank > 0:
        out["lora"] = _lora_params(net, lora_rank, tuple(lora_targets))
    den = _denoiser(net)
    out["feature_channels"] = den.feature_channels if den._hook_module is not None else 0
    return out


def _lora_params(net: nn.Module, rank: int, targets: tuple) -> int:
    """Parameters of one LoRA role on ``net`` (peft injects it in place, on the meta device: exact, no memory)."""
    from ..lora import SharedLoRA

    shared = SharedLoRA(net, rank, targets=targets)
    shared.add_adapter("student")
    return sum(p.numel() for p in shared.adapter_params("student").values())


def _denoiser(net: nn.Module):
    """``net`` in our adapter (the schedule plays no part in memory: a default VP one)."""
    from ..denoiser import Denoiser
    from ..schedules import schedule_from_config

    return Denoiser(net, schedule_from_config({"kind": "vp", "num_train_timesteps": 1000}), "epsilon")


@functools.lru_cache(maxsize=64)
def _measure_architecture(teacher: str, dtype: str, mode: str, rank: int, targets: tuple, ckpt: bool,
                          resolution: int, frames: int = 0) -> tuple[int, int, int, int, int]:
    """(P, P_l, GAN head params, latent side, traced bytes per sample): everything the plan takes from the
    architecture (cached: the GPU count and sharding do not change it)."""
    dt = DTYPES[dtype]
    net, factor, tokens = meta_network(teacher, dt)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} is not a multiple of the VAE factor {factor}")
    side = resolution // factor
    P = sum(p.numel() for p in net.parameters())
    P_l = _lora_params(net, rank, targets) if mode == "lora" else 0
    tr = trace_activations(_denoiser(net), 1, side, tokens, dt, ckpt, mode, frames=latent_frames(teacher, frames))
    fshape = tr["feature_shape"]
    head = 0
    if fshape and len(fshape) == 4:      # (B, C', h, w) feature map
        head = _gan_head_params(fshape[1], fshape[-1])
    elif fshape and len(fshape) == 3 and type(net).__name__ == "WanTransformer3DModel":
        # video tokens (B, F'h'w', D): the Denoiser folds them to (B, D, F'h', w'), the head's side is w'
        head = _gan_head_params(fshape[2], side // net.config.patch_size[2])
    elif fshape and len(fshape) == 3:    # transformer tokens (B, N, D): the Denoiser folds them to (B, D, h, w)
        head = _gan_head_params(fshape[2], int(round(fshape[1] ** 0.5)))
    return P, P_l, head, side, tr["bytes"]


def _gan_head_params(channels: int, spatial: int) -> int:
    if not channels:
        return 0
    from ..trainers.dmd import GANHead

    with torch.device("meta"):
        return sum(p.numel() for p in GANHead(channels, spatial).parameters())


def load_calibration(path: Path = CALIBRATION) -> dict:
    if not Path(path).exists():
        raise ConfigError(f"no activation calibration at {path}: run python -m stepdistill.profiling.memory --arch sd15 "
                          "--calibrate (it measures one DMD2 step and writes the constant)")
    return json.loads(Path(path).read_text())


# -- the plan ------------------------------------------------------------------------------------------------
def plan(req: PlanRequest, calibration: dict | None = None) -> dict:
    """Per-GPU bytes of each part for ``req`` (see the module docstring), the total and whether it fits."""
    req.validate()
    cal = calibration if calibration is not None else load_calibration()
    k = float(cal["activation_factor_checkpointed"] if req.gradient_checkpointing and
              "activation_factor_checkpointed" in cal else cal["activation_factor"])
    wb = torch.finfo(DTYPES[req.dtype]).bits // 8
    P, P_l, head, side, traced = _measure_architecture(req.teacher, req.dtype, req.mode, req.lora_rank,
                                                       tuple(req.lora_targets), req.gradient_checkpointing,
                                                       req.resolution, req.frames)
    tr = {"bytes": traced}
    n_shard = req.gpus if req.fsdp else 1
    trainable = P if req.mode == "full" else P_l
    parts = {
        "teacher_weights": P * wb / (req.gpus if req.shard_teacher else 1),
        "student_weights": (4 * P / n_shard) if req.mode == "full" else 4 * P_l / n_shard,
        "student_gradients": 4 * trainable / n_shard,
        "student_optimizer": 8 * trainable / n_shard,
        "critic_weights": (4 * trainable + 4 * head) / n_shard,
        "critic_gradients": 4 * (trainable + head) / n_shard,
        "critic_optimizer": 8 * (trainable + head) / n_shard,
        "ema": (4 * trainable / n_shard) if req.ema else 0.0,
        "activations": k * tr["bytes"] * req.batch,
    }
    total = sum(parts.values())
    return {
        "request": asdict(req),
        "parameters": {"backbone": P, "lora_per_role": P_l, "gan_head": head},
        "latent_side": side,
        "activations_traced_per_sample_gib": round(tr["bytes"] / GIB, 4),
        "activation_factor": k,
        "per_gpu_gib": {n: round(v / GIB, 3) for n, v in parts.items()},
        "total_gib": round(total / GIB, 3),
        "fits": bool(total / GIB <= req.gpu_gib),
        "calibration": cal.get("source", ""),
    }


def format_table(res: dict) -> str:
    r = res["request"]
    head = (f"{r['teacher']} {r['mode']} x{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}"
            f"{' fsdp' if r['fsdp'] else ''}{' shard-teacher' if r['shard_teacher'] else ''}"
            f"{' ckpt' if r['gradient_checkpointing'] else ''} {r['dtype']} batch {r['batch']} @ {r['resolution']}px")
    mib = res["total_gib"] < 1   # small models: MiB, so that the parts are not all 0.00
    unit, scale = ("MiB", 1024) if mib else ("GiB", 1)
    lines = [head, f"{'part':<20}{unit + ' / GPU':>12}"]
    lines += [f"{n:<20}{v * scale:>12.2f}" for n, v in res["per_gpu_gib"].items()]
    lines.append(f"{'total':<20}{res['total_gib'] * scale:>12.2f}   {'fits' if res['fits'] else 'does NOT fit'} in "
                 f"{r['gpu_gib']:g} GiB")
    return "\n".join(lines)


def fit_grid(teacher: str, gpus=(1, 8, 64), resolution: int = 1024, batch: int = 1, gpu_gib: float = 80.0,
             calibration: dict | None = None) -> list[dict]:
    """The first configuration, in order of preference, that fits each GPU count: full fine-tuning before LoRA;
    within each, no sharding, FSDP, FSDP + sharded teacher, each without then with checkpointing. One row per
    GPU count, with every configuration's per-GPU total (``tried``)."""
    cal = calibration if calibration is not None else load_calibration()
    ladder = []
    for mode in ("full", "lora"):
        for fsdp, shard in ((False, False), (True, False), (True, True)):
            for ckpt in (False, True):
                ladder.append(dict(mode=mode, fsdp=fsdp, shard_teacher=shard, gradient_checkpointing=ckpt))
    rows = []
    for n in gpus:
        best, tried = None, []
        for opt in ladder:
            if n == 1 and opt["fsdp"]:
                continue
            res = plan(PlanRequest(teacher=teacher, gpus=n, batch=batch, resolution=resolution, gpu_gib=gpu_gib,
                                   **opt), cal)
            tried.append({**opt, "total_gib": res["total_gib"], "fits": res["fits"]})
            if res["fits"] and best is None:
                best = res
        rows.append({"gpus": n, "fits": best is not None, "tried": tried,
                     **({"config": {k: best["request"][k] for k in ("mode", "fsdp", "shard_teacher",
                                                                     "gradient_checkpointing")},
                         "total_gib": best["total_gib"]} if best else {})})
    return rows

