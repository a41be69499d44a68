"""The one-step (and K-step) student as an ONNX graph under onnxruntime: parity with the PyTorch pipeline,
and the model card's torch-free serving snippet."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "stepdistill" / "assets"


@pytest.mark.parametrize("name, inputs", [("builtin:animal_mnist_dmd2", ["noise", "class_labels"]),
                                          ("builtin:animal_mnist_dmd2_4step", ["noise", "class_labels", "step_noise"])])
def test_onnx_matches_the_pytorch_pipeline(name, inputs, tmp_path, capsys):
    from stepdistill.frontends.cli import main

    out = tmp_path / "student.onnx"
    assert main(["onnx", "--model", name, "--out", str(out), "--check", "--threads", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == inputs and info["sample_shape"] == [1, 32, 32]
    assert info["max_abs_diff_vs_pytorch"] <= 1e-4  # the bound; measured ~4e-6
    assert json.loads(out.with_suffix(".json").read_text())["class_names"][2] == "cat"
    if name.endswith("4step"):
        return
    # our own pair is replaced without asking; a user's file of the same name needs --overwrite, and is kept
    assert main(["onnx", "--model", name, "--out", str(out)]) == 0
    capsys.readouterr()
    mine = tmp_path / "mine.onnx"
    mine.with_suffix(".json").write_text('{"my": "notes"}')
    assert main(["onnx", "--model", name, "--out", str(mine)]) == 2
    assert "--overwrite" in capsys.readouterr().err and not mine.exists()
    assert mine.with_suffix(".json").read_text() == '{"my": "notes"}'
    # a pair that does not belong together (a kill between the two renames) is refused by its readers
    from stepdistill.errors import ModelLoadError
    from stepdistill.onnx_export import read_onnx_info

    assert read_onnx_info(out)["onnx_sha256"]
    out.write_bytes(out.read_bytes() + b"x")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        read_onnx_info(out)


def test_onnx_refuses_teachers_and_bad_names(tmp_path, capsys):
    from stepdistill.frontends.cli import main

    assert main(["onnx", "--model", "builtin:animal_mnist", "--out", str(tmp_path / "t.onnx")]) == 2
    assert "not a distilled student" in capsys.readouterr().err
    assert main(["onnx", "--model", "builtin:animal_mnist_dmd2", "--out", str(tmp_path / "t.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_model_card_serves_the_graph_without_torch(tmp_path):
    """The card's snippet runs in a process where torch and stepdistill cannot be imported."""
    from stepdistill.onnx_export import export_onnx

    export_onnx("builtin:animal_mnist_dmd2_4step", tmp_path / "student.onnx")
    card = (ASSETS / "animal_mnist_dmd2_4step_student" / "README.md").read_text()
    section = card[card.index("## Serving without torch"):]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    guard = ("import sys\nfor m in ('torch', 'stepdistill', 'diffusers'):\n    sys.modules[m] = None\n")
    code = guard + snippet + "\nprint(images.shape, float(images.min()), float(images.max()), images.std())\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shape, lo, hi, std = r.stdout.split(")")[0] + ")", *map(float, r.stdout.split(")")[1].split())
    assert shape == "(4, 1, 32, 32" + ")" and -1 <= lo < hi <= 1 and std > 0.3  # images, not noise or a blank
    assert (tmp_path / "sample.png").stat().st_size > 100
