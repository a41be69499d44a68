"""docs/your_teacher.md, followed literally: every ```python and ```bash block of the guide runs, in order, in an
empty folder (the demo's server command excepted: its Python twin runs), and each step leaves what the guide says."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "your_teacher.md"


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(python|bash)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_runs_as_written(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    ran = []
    for lang, code in _blocks():
        if lang == "bash" and code.strip().startswith("stepdistill demo"):
            continue  # a server; the Python block after it runs what the page runs
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"guide block failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
        ran.append((lang, code, r.stdout))
    assert len(ran) >= 8
    # each step left what the guide says
    for folder in ("my_teacher", "my_uncond_teacher", "my_custom_teacher"):
        assert (tmp_path / folder / "scheduler" / "scheduler_config.json").exists()
    for run in ("run_mine", "run_uncond", "run_custom"):
        assert (tmp_path / run / "student" / "model_index.json").exists() and (tmp_path / run / "loss.png").exists()
    meta = json.loads((tmp_path / "my_student" / "stepdistill.json").read_text())
    assert meta["student_timesteps"] == [999.0] and len(meta["class_names"]) == 10
    for png, cols in (("my_student.png", 10), ("my_teacher.png", 10), ("my_uncond_student.png", 10),
                      ("my_custom_student.png", 10)):
        with Image.open(tmp_path / png) as im:
            assert im.width >= cols * 16  # a grid of 10 images of 16 px (x2 scale)
    for ev in ("my_student_eval.json", "my_custom_eval.json"):
        r = json.loads((tmp_path / ev).read_text())
        assert r["fid"] > 0 and r["num"] == 20
    custom = json.loads((tmp_path / "run_custom" / "student" / "unet" / "config.json").read_text())
    assert custom == {"_class_name": "custom", "module": "my_denoiser.TinyEpsNet", "init": {"num_classes": 10, "ch": 16}}
    assert "NFE" in ran[-1][2] and "|" in ran[-1][2]  # the demo's comparison printed both summaries
