"""scripts/gpu_check.sh in its CPU dry-run mode: the five parts run and one JSON file records them; failed tests
are named; the memory part keeps the first step apart."""
from __future__ import annotations

import json
import subprocess


def test_gpu_check_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["ok"] is True and res["device"] == "cpu"
    assert res["tests"]["rc"] == 0 and res["tests"]["passed"] >= 1 and "failed" not in res["tests"]
    modes = res["memory"]["modes"]
    assert set(modes) == {"full", "lora"}
    assert modes["lora"]["trainable_mb"] < 0.5 * modes["full"]["trainable_mb"]
    assert modes["full"]["sec_per_step"] > 0 and modes["full"]["peak_rss_mb"] > 0
    b = res["bench"]["result"]
    assert res["bench"]["rc"] == 0 and b is not None and "speedup" in json.dumps(b)
    assert res["fsdp"] == {"skipped": "dry run"}
    # a real run refuses a machine without a GPU instead of pretending
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "x.json")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr and not (tmp_path / "x.json").exists()


def test_failed_tests_are_named_from_pytests_summary():
    from stepdistill.profiling.gpu_check import failed_tests

    out = ("....F\n=== short test summary info ===\nFAILED tests/test_a.py::test_x - AssertionError: boom\n"
           "ERROR tests/test_b.py::test_y - RuntimeError\n  FAILED not at the line start\n2 failed, 3 passed\n")
    assert failed_tests(out) == ["tests/test_a.py::test_x", "tests/test_b.py::test_y"]
    assert failed_tests("5 passed in 1.0s\n") == []


def test_memory_step_time_keeps_the_first_step_apart():
    """``sec_per_step`` is the mean of the steps after the first (one-time set-up in the first), ``first_step_s``
    the first; with one step both are that step."""
    import time
    from types import SimpleNamespace

    import torch

    from stepdistill.profiling.memory import _run_steps

    class Fake:
        def __init__(self, costs):
            self.costs, self.step, self.update = list(costs), 0, 0
            self.acc = SimpleNamespace(device=torch.device("cpu"))

        def _run_step(self):
            time.sleep(self.costs.pop(0))

    timing, cuda_mb, _ = _run_steps(Fake([0.3, 0.05, 0.05]), 3, reset_cpu_peak=False)
    assert cuda_mb is None and timing["first_step_s"] >= 0.3
    assert 0.05 <= timing["sec_per_step"] < 0.2
    timing, _, _ = _run_steps(Fake([0.1]), 1, reset_cpu_peak=False)
    assert timing["sec_per_step"] == timing["first_step_s"] >= 0.1
