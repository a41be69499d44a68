"""The one-command GPU check behind ``scripts/gpu_check.sh``: five parts, one JSON file, 10 minutes or less
on one NVIDIA GPU.

1. ``tests``: the suite's device-relevant files (training placement, bf16 / memory options, LoRA, FSDP,
   bench, the Denoiser and the planner), run where accelerate places training on the GPU;
2. ``memory``: one DMD2 step on a random SD 1.5-size UNet at 64x64 latents in bf16, full and LoRA: seconds
   per step and ``torch.cuda.max_memory_allocated`` (:mod:`stepdistill.profiling.memory`), next to the planner's
   estimate of the same configuration;
3. ``bench``: ``stepdistill bench`` of the shipped one-step student against its teacher;
4. ``attention``: ``stepdistill bench --attention`` with sdpa, math and (when installed) xformers;
5. ``fsdp``: a 2-process FSDP2 smoke run when two GPUs are visible.

Each part has its own timeout; a failing part is recorded (rc, the end of its stderr) and the next one runs.
``--dry-run`` runs the same parts on the CPU at toy size (what the test suite checks).

    bash scripts/gpu_check.sh                      # writes gpu_check.json
    python -m stepdistill.profiling.gpu_check --dry-run --out /tmp/gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CUDA_TESTS = ["tests/test_denoiser.py", "tests/test_memory_options.py", "tests/test_lora.py", "tests/test_fsdp.py",
              "tests/test_bench_report.py", "tests/test_trainer_core.py", "tests/test_plan.py"]
DRY_TESTS = ["tests/test_plan.py::test_plan_arithmetic"]


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"timed out after {timeout:.0f} s"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "stdout": out,
            "stderr_tail": err[-2000:] if rc else ""}


def _last_json(text: str):
    """The last JSON document printed (pretty-printed objects allowed)."""
    start = text.rfind("\n{")
    start = 0 if text.startswith("{") and start < 0 else start + 1
    try:
        return json.loads(text[start:])
    except ValueError:
        return None


def failed_tests(stdout: str) -> list[str]:
    """The test ids pytest's short summary (``-rfE``) names as FAILED or ERROR, in its order."""
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, re.M)


def part_tests(dry: bool, timeout: float) -> dict:
    import importlib.util

    # four workers on the GPU machine (16 cores; each file on one worker, as `make test` does)
    workers = [] if dry or not importlib.util.find_spec("xdist") else ["-n", "4", "--dist", "loadfile"]
    r = _run([sys.executable, "-m", "pytest", "-m", "not slow", "-p", "no:cacheprovider", "-rfE", "--tb=short",
              *workers, *(DRY_TESTS if dry else CUDA_TESTS)], timeout)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", r["stdout"])}
    return {"rc": r["rc"], "seconds": r["seconds"], **counts, "failed_tests": failed_tests(r["stdout"]),
            "stdout_tail": "" if r["rc"] == 0 else r["stdout"][-6000:], "stderr_tail": r["stderr_tail"]}


def part_memory(dry: bool, timeout: float) -> dict:
    if dry:   # the toy teacher through the same command (full and LoRA), one step
        cmd = [sys.executable, "-m", "stepdistill.profiling.memory", "--modes", "full,lora", "--steps", "1",
               "train.batch_size=2", "train.threads=1", "dmd.critic_updates=1"]
    else:
        cmd = [sys.executable, "-m", "stepdistill.profiling.memory", "--arch", "sd15", "--side", "64", "--steps", "3",
               "--modes", "full_bf16,lora_bf16"]
    r = _run(cmd, timeout)
    res = {"rc": r["rc"], "seconds": r["seconds"], "stderr_tail": r["stderr_tail"]}
    data = _last_json(r["stdout"]) if r["rc"] == 0 else None
    if data is not None:
        res["modes"] = data
        if not dry:
            res["planner"] = _planner_for(data)
    return res


def _planner_for(modes: dict) -> dict:
    """The planner's total for each measured mode (same architecture, dtype, batch, resolution)."""
    from .plan import PlanRequest, plan

    out = {}
    for name, m in modes.items():
        if not m.get("fits", True):
            continue
        p = plan(PlanRequest.from_measurement(m))
        measured = m.get("peak_cuda_mb", m.get("train_rss_mb"))
        out[name] = {"planned_gib": p["total_gib"], "measured_gib": round(measured / 1024, 3) if measured else None}
    return out


def part_bench(dry: bool, timeout: float) -> dict:
    cmd = ["stepdistill", "bench", "--student", "builtin:animal_mnist_dmd2"]
    cmd += (["--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--teacher-steps", "2", "--threads", "1"] if dry
            else ["--batch-sizes", "1,8,32", "--repeats", "5"])
    r = _run(cmd, timeout)
    return {"rc": r["rc"], "seconds": r["seconds"], "result": _last_json(r["stdout"]) if r["rc"] == 0 else None,
            "stderr_tail": r["stderr_tail"]}


def part_attention(dry: bool, timeout: float) -> dict:
    """``stepdistill bench --attention K`` of the shipped student and teacher for sdpa, math and (installed)
    xformers: the teacher's and the one-step student's latency per backend."""
    import importlib.util

    out = {}
    kinds = ["sdpa", "math"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    if "xformers" not in kinds:
        out["xformers"] = {"skipped": "xformers is not installed"}
    for k in kinds:
        cmd = ["stepdistill", "bench", "--student", "builtin:animal_mnist_dmd2", "--attention", k]
        cmd += (["--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--teacher-steps", "2", "--threads", "1"]
                if dry else ["--batch-sizes", "32", "--repeats", "5"])
        r = _run(cmd, timeout / len(kinds))
        data = _last_json(r["stdout"]) if r["rc"] == 0 else None
        rows = (data or {}).get("results") or []
        out[k] = {"rc": r["rc"], "seconds": r["seconds"], "stderr_tail": r["stderr_tail"],
                  "latency_s": [{"batch": row.get("batch_size"), "teacher": row.get("teacher", {}).get("latency_s"),
                                 "student": (row.get("student") or [{}])[0].get("latency_s")} for row in rows]}
    return {"rc": max(v.get("rc", 0) for v in out.values()), "backends": out}


def part_fsdp(dry: bool, timeout: float) -> dict:
    import torch

    n = torch.cuda.device_count()
    if dry or n < 2:
        return {"skipped": "dry run" if dry else f"{n} GPU visible (needs 2)"}
    with tempfile.TemporaryDirectory() as tmp:
        r = _run(["accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2",
                  "-m", "stepdistill", "distill", "--config", "configs/dmd2_animal_mnist.yaml", "train.fsdp=true",
                  "train.max_steps=3", "dmd.regression_warmup_steps=0", "train.sample_every=1000",
                  "train.checkpoint_every=3", f"output_dir={tmp}", "--overwrite"], timeout)
    return {"rc": r["rc"], "seconds": r["seconds"], "stderr_tail": r["stderr_tail"]}


def run_check(out: str, dry: bool = False, budget_s: float = 600) -> dict:
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --dry-run for the CPU plumbing check)")
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "dry_run": dry,
           "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count()}
    parts = [("tests", part_tests, 0.3), ("memory", part_memory, 0.3), ("bench", part_bench, 0.15),
             ("attention", part_attention, 0.1), ("fsdp", part_fsdp, 0.15)]
    for name, fn, share in parts:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        left = budget_s - (time.time() - t0)
        res[name] = fn(dry, max(30.0, min(budget_s * share * 2, left)))
    res["seconds"] = round(time.time() - t0, 1)
    res["ok"] = all(res[n].get("rc", 0) == 0 for n, _, _ in parts)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"gpu_check: {'ok' if res['ok'] else 'FAILED'} in {res['seconds']} s -> {out}", file=sys.stderr)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepdistill.profiling.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at toy size")
    p.add_argument("--budget", type=float, default=600, help="seconds for all parts (default %(default)s)")
    a = p.parse_args(argv)
    return 0 if run_check(a.out, a.dry_run, a.budget)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
