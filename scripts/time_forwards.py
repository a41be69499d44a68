"""One-step network forwards of the pruned and full-size students timed interleaved in one process (BENCHMARKS.md
"Smaller one-step students"): the bench JSONs time each pipeline in its own run, and on a shared 2-core machine those
runs differ by up to ~20 %; interleaving the networks round by round compares them under the same load.

    python scripts/time_forwards.py runs/prune/dmd2_full/student runs/prune/dmd2_25/student runs/prune/dmd2_50/student
"""
from __future__ import annotations

import json
import sys
import time

import torch

from stepdistill.models import load_denoiser


def main(folders: list[str], batches=(1, 32), rounds: int = 7) -> dict:
    torch.set_num_threads(1)
    dens = {f: load_denoiser(f)[0] for f in folders}
    out = {}
    for b in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, *next(iter(dens.values())).sample_shape, generator=g)
        t = torch.full((b,), 999.0)
        c = torch.zeros(b, dtype=torch.long)
        times = {f: [] for f in folders}
        with torch.no_grad():
            for d in dens.values():
                d.raw(x, t, c)  # warm-up
            for _ in range(rounds):
                for f, d in dens.items():
                    t0 = time.perf_counter()
                    d.raw(x, t, c)
                    times[f].append((time.perf_counter() - t0) * 1e3)
        out[b] = {f: sorted(v)[len(v) // 2] for f, v in times.items()}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
