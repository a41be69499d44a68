"""scripts/gpu_check.sh in its CPU dry-run mode: the four parts run and one JSON file records them."""
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
