"""A non-editable install behaves as the repo does: the wheel carries the shipped configs (package data), so a bare
``stepdistill distill`` trains with the shipped recipe, not with dataclass defaults."""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
from pathlib import Path
import stepdistill
from stepdistill.frontends.cli import CONFIG_DIR, _default_config
from stepdistill.config import DistillConfig, load_config, to_dict
from stepdistill.pairs import SHIPPED_PAIRS_DIR
cfg = load_config(DistillConfig, _default_config("dmd2_animal_mnist.yaml"), [])
print(json.dumps({"package": stepdistill.__file__, "config_dir": str(CONFIG_DIR),
                  "pairs": sorted(p.name for p in SHIPPED_PAIRS_DIR.glob("*.safetensors")),
                  "configs": sorted(p.name for p in CONFIG_DIR.glob("*.yaml")), "cfg": to_dict(cfg)}))
"""


def test_wheel_install_ships_the_configs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("stepdistill-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)  # torch etc. from the system
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"  # not the repo: nothing can be found through the working folder
    work.mkdir()
    r = subprocess.run([str(py), "-c", PROBE], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert str(env_dir) in got["package"] and str(ROOT) not in got["config_dir"]   # the wheel's copy, not the repo
    assert set(got["configs"]) == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    from stepdistill.config import DistillConfig, load_config, to_dict

    repo = to_dict(load_config(DistillConfig, str(ROOT / "configs" / "dmd2_animal_mnist.yaml"), []))
    assert got["cfg"] == json.loads(json.dumps(repo))                               # the same recipe
    assert got["cfg"]["dmd"]["regression_weight"] == 0.25 and got["cfg"]["dmd"]["regression_warmup_steps"] == 300
    shipped = sorted(p.name for p in (ROOT / "stepdistill" / "assets" / "teacher_pairs").glob("*.safetensors"))
    assert shipped and got["pairs"] == shipped                                      # the main job's teacher pairs


def test_a_missing_shipped_config_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    from stepdistill.frontends import cli

    monkeypatch.setattr(cli, "CONFIG_DIR", tmp_path)
    assert cli.main(["distill", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "is missing from this install" in err and "--config" in err and err.count("\n") == 1
