"""One content-addressed tensor cache: teacher ODE pairs (DMD's regression loss), PSO reference samples and
prompt embeddings all go through :func:`cached_tensors`.

The key is any JSON-able value (what the tensors depend on: weight digests, counts, seeds, shapes); its
SHA-256 names a safetensors file under ``$STEPDISTILL_CACHE/<folder>/`` (``~/.cache/stepdistill``). Writes are
atomic (a temporary file, then ``os.replace``), so an interrupted build leaves no half file behind and two
processes building the same entry end with one whole file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch


def cache_key_digest(key, chars: int = 20) -> str:
    """The hex digest naming ``key``'s entry (``key``: a string, or JSON-able, serialised with sorted keys)."""
    text = key if isinstance(key, str) else json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def cached_tensors(folder: str, key, build: Callable[[], dict[str, torch.Tensor]], prefix: str = "",
                   chars: int = 20, cache: Path | None = None) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """``build()`` (a dict of CPU tensors), stored once per ``key``. Returns (tensors, file, cache hit).

    ``cache``: the folder to use instead of ``$STEPDISTILL_CACHE/<folder>``."""
    from safetensors.torch import load_file, save_file

    from .data import cache_dir

    path = Path(cache or cache_dir() / folder) / f"{prefix}{cache_key_digest(key, chars)}.safetensors"
    if path.is_file():
        return load_file(str(path)), path, True
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return tensors, path, False
