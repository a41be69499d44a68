"""Training memory of a distillation config: full fine-tuning vs LoRA (and the other memory options).

Each mode runs in a fresh Python process (so peaks never mix): build teacher / student / critic,
the trainer (optimizers, EMA), then ``steps`` training steps (each: ``dmd.critic_updates`` critic
updates + one generator update), no sample grids or checkpoints. Reported per mode:

* ``peak_rss_mb``: process peak resident memory (``ru_maxrss``; on CPU this is the number that
  matters), ``baseline_rss_mb``: resident memory after imports, data loading and one throw-away load
  of the teacher (which pays diffusers' import cost), before the models are built, and
  ``train_rss_mb = peak - baseline`` (models, optimizer states, EMA, activations, allocator caches);
* ``peak_cuda_mb``: the CUDA allocator peak when training on a GPU;
* ``param_mb``: distinct parameter storages of teacher, student, critic (+ GAN head) and the EMA
  (a LoRA view counts its shared base once), ``trainable_mb``: parameters the optimizers update,
  ``optimizer_state_mb``: AdamW moments after the steps;
* ``sec_per_step``.

Command line (prints JSON)::

    python -m stepdistill.eval.memory --config configs/dmd2_animal_mnist.yaml --steps 2 \\
        --modes full,lora train.batch_size=8 train.threads=1
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

MODES = {
    "full": ["dmd.lora_rank=0"],
    "lora": ["dmd.lora_rank=8"],
    "full_ckpt": ["dmd.lora_rank=0", "train.gradient_checkpointing=true"],
    "full_bf16_teacher": ["dmd.lora_rank=0", "dmd.teacher_dtype=bfloat16"],
    "lora_bf16_base": ["dmd.lora_rank=8", "dmd.teacher_dtype=bfloat16"],
    "lora_ckpt": ["dmd.lora_rank=8", "train.gradient_checkpointing=true"],
}


def _rss_mb() -> float:
    """Current resident memory (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tensor_mb(ts) -> float:
    seen, total = set(), 0
    for t in ts:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total / 2**20


def measure_in_process(config: str | None, overrides: list[str], steps: int) -> dict:
    """The child's work (call :func:`train_memory` instead: it runs this in a fresh process)."""
    import resource

    import torch

    from ..config import DistillConfig, load_config
    from ..data import load_dataset
    from ..lora import param_storage_mb
    from ..models import load_denoiser
    from ..trainers.core import Trainer
    from ..trainers.distill import build_dmd

    # DMD2 steps are measured: a config's regression warm-up is switched off unless the overrides ask for it
    cfg = load_config(DistillConfig, config, ["dmd.regression_warmup_steps=0"] + list(overrides)
                      + [f"train.max_steps={steps}"])
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels)
    # warm-up: loading a model the first time imports most of diffusers (~300 MB of RSS for a 4 MB model);
    # load the teacher once and drop it, so the baseline holds the libraries and the data but no model
    warm, _ = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    del warm
    gc.collect()
    baseline = _rss_mb()
    obj, data, _ = build_dmd(cfg, data=data)
    trainer = Trainer(obj, cfg, data=data)
    dev = trainer.acc.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.time()
    for _ in range(steps):
        trainer._run_step()
        trainer.step += 1
        trainer.update = 0
    sec = (time.time() - t0) / max(steps, 1)
    mods = [obj.teacher] + [p.module for p in obj.players.values()] + list(trainer.ema.values())
    trainable = [q for o in trainer.opts.values() for g in o.param_groups for q in g["params"]]
    states = [v for o in trainer.opts.values() for s in o.state.values() for v in s.values()
              if torch.is_tensor(v) and v.ndim > 0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
           "train_rss_mb": round(peak - baseline, 1), "param_mb": round(param_storage_mb(*mods), 3),
           "trainable_mb": round(_tensor_mb(trainable), 3), "optimizer_state_mb": round(_tensor_mb(states), 3),
           "sec_per_step": round(sec, 3), "device": str(dev), "steps": steps, "batch_size": cfg.train.batch_size,
           "lora_rank": cfg.dmd.lora_rank, "teacher_dtype": cfg.dmd.teacher_dtype,
           "gradient_checkpointing": cfg.train.gradient_checkpointing, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def train_memory(overrides: list[str] | None = None, steps: int = 2, config: str | None = None,
                 mode: str = "full", timeout: float | None = None) -> dict:
    """Peak memory of ``steps`` training steps of one mode (a key of :data:`MODES`), in a fresh subprocess.

    ``overrides`` are config overrides (``key=value``) applied before the mode's own; ``output_dir``
    defaults to a temporary folder (nothing is written there: no grids, no checkpoints).
    """
    import tempfile

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        ov = [f"output_dir={tmp}"] + list(overrides or []) + MODES[mode]
        cmd = [sys.executable, "-m", "stepdistill.eval.memory", "--child", "--steps", str(steps),
               "--config", config or "", *ov]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory run ({mode}) failed:\n{r.stderr[-3000:]}")
    last = [line for line in r.stdout.splitlines() if line.startswith("{")][-1]
    return {"mode": mode, **json.loads(last)}


def compare_memory(overrides: list[str] | None = None, steps: int = 2, config: str | None = None,
                   modes=("full", "lora")) -> dict:
    """:func:`train_memory` for each mode, plus each mode's peak relative to the first."""
    res = {m: train_memory(overrides, steps, config, m) for m in modes}
    first = res[modes[0]]
    for m in modes[1:]:
        r = res[m]
        r["train_rss_vs_" + modes[0]] = round(r["train_rss_mb"] / max(first["train_rss_mb"], 1e-9), 3)
        r["param_mb_vs_" + modes[0]] = round(r["param_mb"] / max(first["param_mb"], 1e-9), 3)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepdistill.eval.memory", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/dmd2_animal_mnist.yaml")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--modes", default="full,lora", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure_in_process(a.config or None, a.overrides, a.steps)), flush=True)
        return 0
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    print(json.dumps(compare_memory(a.overrides, a.steps, a.config or None, modes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
