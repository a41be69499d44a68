"""Opt-in inference variants of a student pipeline, applied and reverted in place (``stepdistill bench --variants``).

Each variant is measured against the eager fp32 pipeline: speed-up and the largest difference of the
output images (in [-1, 1] and in 8-bit levels). Names:

* ``channels_last``: the network's weights in NHWC memory format (convolutions pick NHWC kernels);
* ``bf16`` / ``fp16``: the network in bfloat16 / float16, inputs cast by the ``Denoiser``, output in float32
  (``fp16`` only on CUDA: CPU half-precision convolutions are slow or missing);
* ``math_attention``: diffusers' plain attention instead of its default ``scaled_dot_product_attention``
  (SDPA is the default, so this row shows what SDPA buys);
* ``compile``: ``torch.compile`` of the network (``nn.Module.compile``; the first call compiles, minutes on a CPU).
"""
from __future__ import annotations

import contextlib

import torch

VARIANTS = ("channels_last", "bf16", "fp16", "math_attention", "compile")


def unavailable(name: str, pipe) -> str | None:
    """Why ``name`` cannot run on this pipeline / device, or None."""
    if name not in VARIANTS:
        return f"unknown variant {name!r}; known: {', '.join(VARIANTS)}"
    net = pipe.network
    if name == "fp16" and net.device.type != "cuda":
        return "fp16 needs CUDA (CPU half-precision convolutions are slow or unsupported)"
    if name == "bf16" and net.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    if name == "math_attention" and not _attention_modules(net):
        return "the network has no diffusers attention layers"
    if name == "channels_last" and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        return "the network has no convolutions"
    return None


@contextlib.contextmanager
def applied(name: str, pipe):
    """Apply variant ``name`` to ``pipe`` (its network and cached denoiser) for the ``with`` block, then revert."""
    net, den = pipe.network, pipe.denoiser()
    if name == "channels_last":
        net.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            net.to(memory_format=torch.contiguous_format)
    elif name in ("bf16", "fp16"):
        from diffusers.utils import logging as dlogging

        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        before, weights = den.compute_dtype, {k: v.detach().clone() for k, v in net.state_dict().items()}
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # diffusers warns about casting with .to(); the weights are restored below
        net.to(dtype)
        den.compute_dtype = dtype
        try:
            yield
        finally:
            net.to(torch.float32)
            net.load_state_dict(weights)  # the exact fp32 weights, not their half-precision round trip
            den.compute_dtype = before
            dlogging.set_verbosity(level)
    elif name == "math_attention":
        from ..trigflow import math_attention

        with math_attention(net):
            yield
    elif name == "compile":
        net.compile()
        try:
            yield
        finally:
            net._compiled_call_impl = None  # back to eager (nn.Module.compile's own attribute)
    else:
        raise ValueError(f"unknown variant {name!r}")


def _attention_modules(net) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in net.modules() if isinstance(m, Attention)]


def image_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Largest difference of two image batches in [-1, 1], also in 8-bit levels (as saved PNGs would be)."""
    a, b = a.float().cpu(), b.float().cpu()
    q = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    return {"max_abs_diff": float((a - b).abs().max()), "max_pixel_diff_8bit": int((q(a) - q(b)).abs().max())}
