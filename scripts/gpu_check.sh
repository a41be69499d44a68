#!/usr/bin/env bash
# One-command GPU check (10 minutes or less on one NVIDIA GPU); writes one JSON file.
#   bash scripts/gpu_check.sh [--out gpu_check.json]      on a GPU machine
#   bash scripts/gpu_check.sh --dry-run --out /tmp/x.json  the same parts on the CPU at toy size
# Installs nothing beyond the project itself (skipped when it is importable already). On a GPU machine without
# internet, carry the wheels it lacks (`pip download --no-deps -d wheels diffusers torch-fidelity importlib_metadata
# animal-mnist==0.4` here) and run `WHEELS=wheels bash scripts/gpu_check.sh`: they are installed with --no-index and
# the project without its dependencies (the machine's torch is used as it is). The parts:
# the suite's device-relevant tests, one SD 1.5-size DMD2 step in bf16 (full and LoRA: step time and
# max_memory_allocated, next to the planner), `stepdistill bench` of the shipped student vs its teacher,
# and a 2-process FSDP smoke run when two GPUs are visible. See stepdistill/profiling/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  $PY -c "import stepdistill" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e .
  export PATH="$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$PATH"   # the `stepdistill` command
elif ! $PY -c "import stepdistill" 2>/dev/null; then
  $PY -m pip install -q -e ".[dev,lora]"
fi
exec $PY -m stepdistill.profiling.gpu_check "$@"
