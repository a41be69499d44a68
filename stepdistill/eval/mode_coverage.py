"""Which one-step objectives keep a minority mode? Every objective distils the exact 2-D Gaussian-mixture teacher
(:mod:`stepdistill.toy_gmm`: weights 0.55 / 0.25 / 0.15 / 0.05) on equal terms and the student's mode weights are
compared with the true ones. Prints JSON::

    python -m stepdistill.eval.mode_coverage [--steps 600] [--seeds 0 1 2] [--out FILE]

Per objective and seed: each mode's share of 4,000 one-step samples, the share "on a mode" (within 4 std), the
total variation to the true weights and the worst mode's share over its true weight (1 = kept in full, 0 = lost).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

#: objective name -> (method, overrides): the rows of BENCHMARKS.md "Every one-step objective on equal terms"
OBJECTIVES = {
    "dmd2 (reverse KL + GAN)": ("dmd2", {"dmd.gan": "true"}),
    "dmd2 + regression (ODE pairs)": ("dmd2", {"dmd.gan": "true", "dmd.regression_weight": 0.25,
                                               "dmd.regression_pairs": 512}),
    "dmd (reverse KL, no GAN)": ("dmd2", {"dmd.gan": "false"}),
    "f-distill JS": ("dmd2", {"dmd.gan": "true", "dmd.divergence": "js"}),
    "f-distill forward KL": ("dmd2", {"dmd.gan": "true", "dmd.divergence": "forward_kl"}),
    "SiD (alpha 1.2)": ("sid", {"dmd.gan": "false"}),
    "SiD (alpha 0.5, exact Fisher)": ("sid", {"dmd.gan": "false", "sid.alpha": 0.5}),
    "Uni-Instruct JS": ("uni_instruct", {"dmd.gan": "true", "dmd.divergence": "js"}),
    "Uni-Instruct forward KL": ("uni_instruct", {"dmd.gan": "true", "dmd.divergence": "forward_kl"}),
    "BOOT": ("boot", {}),
}


def needs(name: str) -> str:
    """What objective ``name`` needs beside the teacher, read from its overrides: real data for the GAN (and its
    density ratio), teacher ODE pairs for the regression loss, else nothing."""
    extra = OBJECTIVES[name][1]
    parts = (["real data (GAN)"] if extra.get("dmd.gan") == "true" else []) + (
        ["teacher ODE pairs"] if float(extra.get("dmd.regression_weight", 0)) > 0 else [])
    return " + ".join(parts) or "nothing"


def base_overrides(out: str, steps: int, seed: int) -> dict:
    """The shared training settings: batch 128, lr 1e-3 for every network, 2 critic updates per step."""
    return {"output_dir": out, "dmd.student_timesteps": "[999]", "dmd.real_guidance_scale": 1.0,
            "dmd.critic_updates": 2, "dmd.optim.lr": 1e-3, "dmd.critic_optim.lr": 1e-3, "train.batch_size": 128,
            "train.max_steps": steps, "train.ema_decay": 0.95, "train.log_every": 50, "train.sample_every": 10 * steps,
            "train.checkpoint_every": steps, "train.threads": 1, "train.cpu": "true", "train.seed": seed,
            "train.guard_every": 0}


def run_objective(name: str, steps: int = 600, seed: int = 0, n: int = 4000) -> dict:
    """Distil the mixture teacher with objective ``name`` (:data:`OBJECTIVES`) and score its one-step samples."""
    import warnings

    from ..config import DistillConfig, load_config
    from ..denoiser import Denoiser
    from ..toy_gmm import gmm_samples, gmm_teacher, mode_weights
    from ..trainers.core import Trainer
    from ..trainers.distill import build_method

    method, extra = OBJECTIVES[name]
    teacher, meta = gmm_teacher()
    data = gmm_samples(20000, seed=1000 + seed)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DMD-only keys in BOOT's config are ignored with a warning
        over = {**base_overrides(tmp, steps, seed), "method": method, **extra}
        cfg = load_config(DistillConfig, None, [f"{k}={v}" for k, v in over.items()])
        t0 = time.time()
        obj, data, _ = build_method(cfg, teacher=teacher, meta=meta, data=data)
        trainer = Trainer(obj, cfg, data=data)
        trainer.train()
        secs = time.time() - t0
        gen = trainer.plain_ema()["generator"]
    den = Denoiser(gen, teacher.schedule, "sample")
    noise = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        x = den(noise, torch.full((n,), 999.0))
    return {"objective": name, "method": method, "needs": needs(name), "seed": seed, "steps": steps, "train_seconds": round(secs, 1),
            **mode_weights(x)}


def teacher_modes(n: int = 4000, steps: int = 50) -> dict:
    """The exact teacher sampled with 50 deterministic DDIM steps (x0 prediction, no clamping)."""
    from ..toy_gmm import gmm_teacher, mode_weights

    den, _ = gmm_teacher()
    x = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(999, 0, steps + 1).round()
    with torch.no_grad():
        for i in range(steps):
            t, s = torch.full((n,), float(ts[i])), torch.full((n,), float(ts[i + 1]))
            x0 = den(x, t)
            (a, sg), (a2, s2) = den.schedule.alpha_sigma(t.double()), den.schedule.alpha_sigma(s.double())
            eps = (x - a.view(-1, 1, 1, 1) * x0) / sg.view(-1, 1, 1, 1)
            x = a2.view(-1, 1, 1, 1) * x0 + s2.view(-1, 1, 1, 1) * eps
    return {"objective": f"teacher ({steps} DDIM steps)", **mode_weights(x)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="objective names (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [teacher_modes()]
    for name in a.only or list(OBJECTIVES):
        for seed in a.seeds:
            rows.append(run_objective(name, a.steps, seed))
            print(json.dumps(rows[-1]), flush=True)
    report = {"teacher_weights": rows[0]["true"], "rows": rows,
              "needs": {k: needs(k) for k in a.only or OBJECTIVES}, "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(report, indent=1)
    print(text, flush=True)  # first: nothing is lost when --out cannot be written
    if a.out:
        from ..utils import atomic_write_text

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
