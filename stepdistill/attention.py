"""Attention backends of diffusers networks (``train.attention``, ``stepdistill bench --attention``).

* ``sdpa`` (default): diffusers' own default processor, ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels where PyTorch has them). Networks are left as loaded.
* ``math``: the plain matmul + softmax processor (``AttnProcessor``): slower, but every op has forward-mode AD
  (rCM's JVP tangent uses it inside :func:`stepdistill.trigflow.math_attention`) and it is the reference.
* ``xformers``: ``enable_xformers_memory_efficient_attention`` (xFormers' memory-efficient kernel, CUDA); when the
  package is not installed, one line says so.

Custom ``nn.Module`` backbones without diffusers ``Attention`` layers are left alone (0 layers switched).
"""
from __future__ import annotations

import torch.nn as nn

from .config import ATTENTION
from .errors import ConfigError


def attention_layers(module: nn.Module) -> list:
    """The diffusers ``Attention`` layers inside ``module`` (none when diffusers has no such class)."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, Attention)]


def set_attention(module: nn.Module, kind: str, key: str = "train.attention") -> int:
    """Switch every diffusers attention layer of ``module`` to backend ``kind``; returns how many were switched
    (``sdpa``: 0, the networks keep diffusers' default)."""
    if kind not in ATTENTION:
        raise ConfigError(f"{key}: must be one of {' | '.join(ATTENTION)}, got {kind!r}")
    layers = attention_layers(module)
    if kind == "sdpa" or not layers:
        return 0
    if kind == "math":
        from diffusers.models.attention_processor import AttnProcessor

        for m in layers:
            m.set_processor(AttnProcessor())
        return len(layers)
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{key}=xformers needs the xformers package, which is not installed "
                          "(pip install 'stepdistill[gpu]' on a CUDA machine); use sdpa") from e
    for m in layers:
        m.set_use_memory_efficient_attention_xformers(True)
    return len(layers)


def processor_names(module: nn.Module) -> set[str]:
    """The processor class names in use (for logs and tests)."""
    return {type(m.processor).__name__ for m in attention_layers(module)}
