"""Training memory of a distillation config: full fine-tuning vs LoRA (and the other memory options).

Each mode runs in a fresh Python process (so peaks never mix): build teacher / student / critic,
the trainer (optimizers, EMA), then ``steps`` training steps (each: ``dmd.critic_updates`` critic
updates + one generator update), no sample grids or checkpoints. Reported per mode:

* ``peak_rss_mb``: process peak resident memory (the kernel's high-water mark of the child's own memory, VmHWM;
  ``ru_maxrss`` without /proc, which on Linux would carry over the parent's size at the fork; on CPU this is the number that
  matters), ``baseline_rss_mb``: resident memory after imports, data loading and one throw-away load
  of the teacher (which pays diffusers' import cost), before the models are built, and
  ``train_rss_mb = peak - baseline`` (models, optimizer states, EMA, activations, allocator caches);
* ``peak_cuda_mb``: the CUDA allocator peak when training on a GPU;
* ``param_mb``: distinct parameter storages of teacher, student, critic (+ GAN head) and the EMA
  (a LoRA view counts its shared base once), ``trainable_mb``: parameters the optimizers update,
  ``optimizer_state_mb``: AdamW moments after the steps;
* ``sec_per_step``: the mean of the steps after the first, and ``first_step_s`` (one-time set-up: CUDA kernel
  selection, allocator growth, optimizer states). With ``--steps 1`` both are the first step.

Command line (prints JSON)::

    python -m stepdistill.profiling.memory --config configs/dmd2_animal_mnist.yaml --steps 2 \\
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
from pathlib import Path

from ..meter import peak_rss_mb, proc_kb_field, process_peak, reset_peak, rss_mb

MODES = {
    "as_given": [],  # the overrides alone (a setting chosen by train.memory_budget_gib: profiling/budget.py)
    "full": ["dmd.lora_rank=0"],
    "lora": ["dmd.lora_rank=8"],
    "full_ckpt": ["dmd.lora_rank=0", "train.gradient_checkpointing=true"],
    "full_bf16_teacher": ["dmd.lora_rank=0", "dmd.teacher_dtype=bfloat16"],
    "lora_bf16_base": ["dmd.lora_rank=8", "dmd.teacher_dtype=bfloat16"],
    "lora_ckpt": ["dmd.lora_rank=8", "train.gradient_checkpointing=true"],
    "lora_bf16_ckpt": ["dmd.lora_rank=8", "dmd.teacher_dtype=bfloat16", "train.gradient_checkpointing=true"],
    # bf16 end to end (GPU check): autocast players plus a bf16 teacher / LoRA base
    "full_bf16": ["dmd.lora_rank=0", "dmd.teacher_dtype=bfloat16", "train.mixed_precision=bf16"],
    "lora_bf16": ["dmd.lora_rank=8", "dmd.teacher_dtype=bfloat16", "train.mixed_precision=bf16"],
}
ARCH_BANK = 8   # prompts in the random embedding bank of a real-size measurement (and real latents)


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
    import torch

    from ..config import DistillConfig, load_config
    from ..data import load_dataset
    from ..models import load_denoiser
    from ..trainers.core import Trainer
    from ..trainers.distill import build_method

    # DMD2 steps are measured: a config's regression warm-up and loss (and the teacher ODE pairs they would
    # sample first, minutes on a CPU) are switched off unless the overrides ask for them
    cfg = load_config(DistillConfig, config, ["dmd.regression_warmup_steps=0", "dmd.regression_weight=0"]
                      + list(overrides)
                      + [f"train.max_steps={steps}"])
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    data = load_dataset(cfg.data.name, cfg.data.resolution, cfg.data.split, cfg.data.channels, cfg.data.frames)
    # warm-up: loading a model the first time imports most of diffusers (~300 MB of RSS for a 4 MB model);
    # load the teacher once and drop it, so the baseline holds the libraries and the data but no model
    warm, _ = load_denoiser(cfg.dmd.teacher, allow_pickle=cfg.dmd.allow_pickle)
    del warm
    gc.collect()
    baseline = rss_mb()
    obj, data, _ = build_method(cfg, data=data)
    trainer = Trainer(obj, cfg, data=data)
    dev = trainer.acc.device
    timing, cuda_mb, _ = _run_steps(trainer, steps, reset_cpu_peak=False)
    param_mb, trainable_mb, state_mb = _inventory(obj, trainer)
    # the process-lifetime peak (building the method counts too), from the kernel's high-water mark of this
    # process's own memory (VmHWM): ru_maxrss survives fork + exec on Linux, so a child started by a large parent
    # (a long pytest session) would report the parent's resident set at the fork
    peak = peak_rss_mb()
    out = {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
           "train_rss_mb": round(peak - baseline, 1), "param_mb": round(param_mb, 3),
           "trainable_mb": round(trainable_mb, 3), "optimizer_state_mb": round(state_mb, 3),
           "sec_per_step": round(timing["sec_per_step"], 3),
           "first_step_s": round(timing["first_step_s"], 3), "device": str(dev), "steps": steps,
           "batch_size": cfg.train.batch_size,
           "lora_rank": cfg.dmd.lora_rank, "teacher_dtype": cfg.dmd.teacher_dtype,
           "gradient_checkpointing": cfg.train.gradient_checkpointing, "threads": torch.get_num_threads()}
    if cuda_mb is not None:
        out["peak_cuda_mb"] = round(cuda_mb, 1)
    return out


def _run_steps(trainer, steps: int, reset_cpu_peak: bool) -> tuple[dict, float | None, bool]:
    """``steps`` training steps after a fresh peak (the CUDA allocator's; the CPU high-water mark too when
    ``reset_cpu_peak``). Returns (timing, CUDA peak MiB or None on CPU, whether the CPU mark was reset). ``timing``
    holds ``first_step_s`` (kernel selection, allocator and optimizer-state set-up included) and ``sec_per_step``:
    the mean of the steps after the first (the first alone when ``steps`` is 1)."""
    import torch

    dev = trainer.acc.device
    reset = reset_peak(dev, cpu=reset_cpu_peak)
    times = []
    for _ in range(steps):
        t0 = time.time()
        trainer._run_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.time() - t0)
        trainer.step += 1
        trainer.update = 0
    cuda_mb = process_peak(dev)["peak_memory_mb"] if dev.type == "cuda" else None
    later = times[1:] or times[:1]
    timing = {"first_step_s": times[0] if times else 0.0, "sec_per_step": sum(later) / max(len(later), 1)}
    return timing, cuda_mb, reset


def _inventory(obj, trainer) -> tuple[float, float, float]:
    """MiB of parameters (teacher, players, EMA copies; shared storage once), trainable parameters (their gradients
    take as much) and optimizer states."""
    import torch

    from ..lora import param_storage_mb

    mods = [obj.teacher] + [p.module for p in obj.players.values()] + list(trainer.ema.values())
    trainable = [q for o in trainer.opts.values() for g in o.param_groups for q in g["params"]]
    states = [v for o in trainer.opts.values() for s in o.state.values() for v in s.values()
              if torch.is_tensor(v) and v.ndim > 0]
    return param_storage_mb(*mods), _tensor_mb(trainable), _tensor_mb(states)


def _plan_request(cfg, arch: str, side: int):
    """The planner request (stepdistill/profiling/plan.py) describing the measured configuration."""
    from .plan import LATENT_FACTOR, PlanRequest

    return PlanRequest(teacher=arch, mode="lora" if cfg.dmd.lora_rank > 0 else "full",
                       dtype="bf16" if cfg.dmd.teacher_dtype == "bfloat16" else "fp32", batch=cfg.train.batch_size,
                       resolution=side * LATENT_FACTOR[arch], lora_rank=max(cfg.dmd.lora_rank, 1),
                       lora_targets=list(cfg.dmd.lora_targets),
                       gradient_checkpointing=cfg.train.gradient_checkpointing, gpu_gib=1e9)


def _mem_available_mb() -> float:
    """Free memory of the device a run will train on: CUDA's free bytes on a GPU, else the host's MemAvailable."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / 2**20
    avail = proc_kb_field("/proc/meminfo", "MemAvailable:")
    return float("inf") if avail is None else avail


def measure_arch_in_process(arch: str, side: int, config: str | None, overrides: list[str], steps: int) -> dict:
    """One DMD2 step (critic updates + generator update) on a random-weight real-size teacher (``arch``, e.g.
    ``sd15``) at ``side`` x ``side`` latents, text conditioning from random embeddings of the family's shape.

    Before building anything, the planner's estimate of the weights, gradients and optimizer states alone is
    compared with the memory available: a mode that cannot fit reports that estimate (``"fits": false``)
    instead of being killed by the kernel. The peak is the resident high-water mark of the training steps
    (reset after the build: a bfloat16 teacher is built in float32 first)."""
    import torch

    from ..architectures import architecture_denoiser
    from ..conditioning import TextEmbeddingBank
    from ..config import DistillConfig, load_config
    from ..data import ArrayDataset
    from ..models import ModelMeta
    from .plan import TEXT_TOKENS, example_inputs, plan, trace_activations
    from ..trainers.core import Trainer
    from ..trainers.distill import build_method

    cfg = load_config(DistillConfig, config, ["dmd.regression_warmup_steps=0", "dmd.regression_weight=0",
                                              "train.batch_size=1"] + list(overrides) + [f"train.max_steps={steps}"])
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    req = _plan_request(cfg, arch, side)
    states = plan(req, {"activation_factor": 0.0, "source": "states only"})
    out = {"arch": arch, "latent_side": side, "batch_size": cfg.train.batch_size, "lora_rank": cfg.dmd.lora_rank,
           "teacher_dtype": cfg.dmd.teacher_dtype, "gradient_checkpointing": cfg.train.gradient_checkpointing,
           "critic_updates": cfg.dmd.critic_updates, "states_estimate_gib": states["total_gib"]}
    avail = _mem_available_mb() / 1024
    if states["total_gib"] > 0.9 * avail:
        return {**out, "fits": False, "available_gib": round(avail, 2),
                "note": f"weights + gradients + optimizer states alone need {states['total_gib']:.1f} GiB, "
                        f"{avail:.1f} GiB available: not run (see the planner's estimate)"}
    baseline = rss_mb()
    teacher = architecture_denoiser(arch, device="cpu")
    x, _, cond = example_inputs(teacher, ARCH_BANK, side, TEXT_TOKENS[arch], "cpu")
    bank = TextEmbeddingBank(cond["emb"], cond["pooled"]) if isinstance(cond, dict) else TextEmbeddingBank(cond)
    data = ArrayDataset(x, torch.arange(ARCH_BANK), [])   # latents paired with bank entries (GAN real branch)
    meta = ModelMeta(prediction_type=teacher.prediction_type, conditioning="text")
    obj, data, _ = build_method(cfg, teacher=teacher, meta=meta, data=data, text_bank=bank)
    trainer = Trainer(obj, cfg, data=data)
    dev = trainer.acc.device
    # the teacher is built in float32: its transient must not set the peak
    timing, cuda_mb, out["peak_reset"] = _run_steps(trainer, steps, reset_cpu_peak=True)
    if cuda_mb is not None:
        out["peak_cuda_mb"] = round(cuda_mb, 1)
    out["device"] = str(dev)
    peak = peak_rss_mb()
    param_mb, grad_mb, opt_mb = _inventory(obj, trainer)
    train_mb = out["peak_cuda_mb"] if "peak_cuda_mb" in out else peak - baseline  # GPU: everything allocated there
    # the trace the planner scales, on the meta device, for this configuration
    from ..architectures import architecture_denoiser as _meta
    from ..lora import SharedLoRA

    den = _meta(arch, "meta", torch.bfloat16 if req.dtype == "bf16" else torch.float32)
    if req.mode == "lora":
        SharedLoRA(den.backbone, req.lora_rank, targets=tuple(req.lora_targets)).add_adapter("student")
    traced = trace_activations(den, 1, side, TEXT_TOKENS[arch], den.backbone.dtype, req.gradient_checkpointing,
                               req.mode)["bytes"] / 2**20
    act_mb = train_mb - param_mb - grad_mb - opt_mb
    return {**out, "fits": True, "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "train_rss_mb": round(train_mb, 1), "param_mb": round(param_mb, 1), "gradient_mb": round(grad_mb, 1),
            "optimizer_state_mb": round(opt_mb, 1), "activation_mb": round(act_mb, 1),
            "traced_activation_mb_per_sample": round(traced, 1),
            "activation_factor": round(act_mb / (traced * cfg.train.batch_size), 3),
            "sec_per_step": round(timing["sec_per_step"], 2),
            "first_step_s": round(timing["first_step_s"], 2), "steps": steps, "threads": torch.get_num_threads(),
            "planner_states_gib": states["total_gib"]}


def arch_memory(arch: str, side: int, modes=("lora",), config: str | None = None, overrides=None, steps: int = 1,
                timeout: float | None = None) -> dict:
    """:func:`measure_arch_in_process` for each mode, each in a fresh process."""
    import tempfile

    res = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "stepdistill.profiling.memory", "--child", "--arch", arch, "--side", str(side),
                   "--steps", str(steps), "--config", config or "", f"output_dir={tmp}", *(overrides or []),
                   *MODES[mode]]
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"memory run ({arch}, {mode}) failed:\n{r.stderr[-3000:]}")
        res[mode] = {"mode": mode, **json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])}
    return res


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
        cmd = [sys.executable, "-m", "stepdistill.profiling.memory", "--child", "--steps", str(steps),
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
    p = argparse.ArgumentParser(prog="python -m stepdistill.profiling.memory", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "dmd2_animal_mnist.yaml"))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--modes", default="full,lora", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--arch", default="", help="a real-size architecture (sd15, sdxl, sd3, flux) with random "
                   "weights and text embeddings instead of the config's teacher")
    p.add_argument("--side", type=int, default=64, help="latent side with --arch (64: SD 1.5 at 512 px)")
    p.add_argument("--calibrate", default="", help="with --arch: PLAIN,CHECKPOINTED modes whose measurements set the "
                   "planner's two activation constants (e.g. lora,lora_bf16_ckpt); written, with every mode's numbers, "
                   "to stepdistill/assets/memory_calibration.json")
    p.add_argument("--record", action="store_true", help="with --arch: add this run's numbers to the calibration "
                   "file's measurements (the planner's validation set) without changing its constants")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.child:
        res = (measure_arch_in_process(a.arch, a.side, a.config or None, a.overrides, a.steps) if a.arch
               else measure_in_process(a.config or None, a.overrides, a.steps))
        print(json.dumps(res), flush=True)
        return 0
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if a.arch:
        res = arch_memory(a.arch, a.side, modes, a.config or None, a.overrides, a.steps)
        if a.calibrate:
            write_calibration(res, *a.calibrate.split(","))
        elif a.record:
            write_calibration(res, None)
    else:
        res = compare_memory(a.overrides, a.steps, a.config or None, modes)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


def write_calibration(res: dict, plain: str | None, checkpointed: str | None = None) -> dict:
    """The planner's activation constants from measured modes ``plain`` (no checkpointing) and ``checkpointed``
    (``None``: keep the file's); every mode's numbers are kept (keyed arch_side_mode) beside those already in
    the file: the measurements the planner is validated against (tests/test_plan.py)."""
    from .plan import CALIBRATION

    prev = json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else {}
    if plain is None:
        cal = {**prev, "measurements": {**prev.get("measurements", {}),
                                        **{f"{v.get('arch')}_{v.get('latent_side')}_{k}": v for k, v in res.items()}}}
        CALIBRATION.write_text(json.dumps(cal, indent=2) + "\n")
        return cal
    factors = {}
    for key, mode in (("activation_factor", plain), ("activation_factor_checkpointed", checkpointed)):
        if mode is None:
            continue
        m = res.get(mode)
        if m is None or not m.get("fits", True) or "activation_factor" not in m:
            raise ValueError(f"mode {mode} has no measurement to calibrate from")
        if m["gradient_checkpointing"] != (key == "activation_factor_checkpointed"):
            raise ValueError(f"mode {mode}: {key} needs a mode with gradient checkpointing "
                             f"{'on' if key.endswith('checkpointed') else 'off'}")
        factors[key] = m["activation_factor"]
    m = res[plain]
    old = prev.get("measurements", {})
    cal = {**factors,
           "source": f"{m['arch']} {' / '.join(x for x in (plain, checkpointed) if x)}, latent {m['latent_side']}, "
                     f"batch {m['batch_size']}, {m['critic_updates']} critic update(s), {m.get('device', 'cpu')}: "
                     f"python -m stepdistill.profiling.memory --arch {m['arch']} --side {m['latent_side']}",
           "measurements": {**old, **{f"{v.get('arch')}_{v.get('latent_side')}_{k}": v for k, v in res.items()}}}
    CALIBRATION.write_text(json.dumps(cal, indent=2) + "\n")
    return cal


if __name__ == "__main__":
    sys.exit(main())
