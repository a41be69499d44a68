"""The one content-addressed tensor cache (ODE pairs, PSO references, prompt embeddings)."""
from __future__ import annotations

import hashlib
import json

import torch

from stepdistill.tensor_cache import cache_key_digest, cached_tensors


def test_a_key_is_built_once_and_names_the_same_file_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path))
    key = {"w": "abc", "n": 4, "seed": 0, "shape": [1, 8, 8]}
    # the digests the three caches used before they were one: existing cache files stay valid
    assert cache_key_digest(key) == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(6.0).reshape(2, 3).t(), "y": torch.tensor([1, 2])}   # non-contiguous is fine

    a, path, hit = cached_tensors("things", key, build, prefix="t_")
    b, path2, hit2 = cached_tensors("things", key, build, prefix="t_")
    assert (hit, hit2) == (False, True) and len(calls) == 1 and path == path2
    assert path.parent == tmp_path / "things" and path.name == f"t_{cache_key_digest(key)}.safetensors"
    assert torch.equal(a["x"], b["x"]) and torch.equal(b["y"], torch.tensor([1, 2]))
    assert not list(path.parent.glob("*.tmp*"))                       # written atomically
    c, path3, hit3 = cached_tensors("things", {**key, "seed": 1}, build, prefix="t_")
    assert not hit3 and path3 != path and len(calls) == 2
    d, path4, _ = cached_tensors("things", key, build, cache=tmp_path / "elsewhere")
    assert path4.parent == tmp_path / "elsewhere" and len(calls) == 3
