"""PSO demonstration numbers (BENCHMARKS.md, "Tuning a distilled model: PSO"): prints one JSON object.

For each model folder (the distilled student before tuning, PSO-tuned, naively tuned) it draws ``--num``
class-balanced one-step samples (same noise for every model) and reports, against the Animal-MNIST test
split:

* FID to the *target* set (the test split under ``--transform``, e.g. bold) and FID to the original data
  (Inception features of the samples are computed once and compared with both reference sets);
* class accuracy (shipped domain classifier) and within-class diversity (its features);
* ``stroke``: fraction of foreground pixels (> 0), the style statistic (real test: 0.219, bold: 0.335);
* ``grey``: fraction of pixels with |x| < 0.5, a blur statistic (real silhouettes are almost binary).

    python scripts/pso_benchmark.py --models base=builtin:animal_mnist_dmd2 pso=runs/pso/student \\
        naive=runs/pso_naive/student --transform bold --num 500 --out docs/benchmarks/pso_bold.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def stats(x: torch.Tensor) -> dict:
    return {"stroke": float((x > 0).float().mean()), "grey": float((x.abs() < 0.5).float().mean())}


def _ref_stats(name: str, images: torch.Tensor, cache: str | None):
    """Inception (mu, sigma) of a reference set, optionally cached as ``<cache>/pso_ref_<name>.npz``."""
    from pathlib import Path

    from stepdistill.eval.fid import feature_statistics, features

    f = Path(cache) / f"pso_ref_{name}.npz" if cache else None
    if f is not None and f.exists():
        d = np.load(f)
        return d["mu"], d["sigma"]
    mu, sigma = feature_statistics(features(images))
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, mu=mu, sigma=sigma)
    return mu, sigma


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="name=folder pairs")
    p.add_argument("--transform", default="bold", help="target transform of the test split (pso.target_transform)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--cache", default=None, help="folder caching the reference feature statistics (.npz)")
    p.add_argument("--grid", default=None, help="also save a grid (rows: models, 10 samples each, one per class)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from stepdistill.data import load_dataset
    from stepdistill.eval.classifier import class_accuracy, load_default_classifier
    from stepdistill.eval.diversity import diversity
    from stepdistill.eval.fid import feature_statistics, features, frechet_distance
    from stepdistill.models import load_denoiser
    from stepdistill.pipelines.sampling import student_sample
    from stepdistill.trainers.pso_data import apply_transform
    from stepdistill.utils import class_balanced_labels, save_grid

    test = load_dataset("animal_mnist", 32, "test", 1)
    refs = {"original": test.images, "target": apply_transform(test.images, a.transform)}
    ref_stats = {k: _ref_stats(k if k == "original" else a.transform, v, a.cache) for k, v in refs.items()}
    clf = load_default_classifier()
    out = {"transform": a.transform, "num": a.num, "seed": a.seed, "reference": "animal_mnist test split (1000)",
           "data": {k: stats(v) for k, v in refs.items()}, "models": {}}
    rows = []
    for spec in a.models:
        name, path = spec.split("=", 1)
        den, meta = load_denoiser(path)
        den.eval()
        labels = class_balanced_labels(a.num, len(meta.class_names))
        g = torch.Generator().manual_seed(a.seed)
        noise = torch.randn(a.num, 1, 32, 32, generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.cat([student_sample(den, meta.student_timesteps[:1], labels[i:i + 100], noise[i:i + 100],
                                          generator=g) for i in range(0, a.num, 100)])
        mu, sig = feature_statistics(features(x))
        acc, _ = class_accuracy(clf, x, labels)
        out["models"][name] = {
            "path": path, "steps": 1,
            "fid_target": frechet_distance(mu, sig, *ref_stats["target"]),
            "fid_original": frechet_distance(mu, sig, *ref_stats["original"]),
            "class_accuracy": acc, "diversity": diversity(x, labels, extractor=clf), **stats(x),
            "seconds": time.perf_counter() - t0}
        rows.append(x[:10] if len(meta.class_names) else x[:10])
    if a.grid:
        save_grid(torch.cat(rows), a.grid, nrow=10)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
