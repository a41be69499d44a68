"""A newcomer's first steps: shipped models from Python, the README's stock-diffusers loop, helpful errors."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_import_is_light_and_exports_the_pipelines():
    code = ("import sys, stepdistill; assert 'torch' not in sys.modules, 'import stepdistill pulled in torch'; "
            "from stepdistill import StepDistillPipeline; print(StepDistillPipeline.__module__, stepdistill.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "stepdistill.pipelines.student" and re.match(r"\d+\.\d+", out[1])
    import stepdistill

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        stepdistill.Nope  # noqa: B018


def test_builtin_names_in_from_pretrained():
    from stepdistill import StepDistillPipeline, StepDistillTeacherPipeline
    from stepdistill.errors import ModelLoadError

    pipe = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")
    assert pipe.config.student_timesteps == [999.0] and pipe.config.class_names[2] == "cat"
    x = pipe(class_labels=["cat", "dog"], seed=0, output_type="pt").images
    assert x.shape == (2, 1, 32, 32) and x.std() > 0.1
    teacher = StepDistillTeacherPipeline.from_pretrained("builtin:animal_mnist")  # metadata from stepdistill.json
    assert teacher.config.null_class == 10 and teacher.config.class_names == pipe.config.class_names
    with pytest.raises(ModelLoadError, match="builtin:animal_mnist_dmd2_4step"):
        StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd3")


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_stock_diffusers_loop_equals_the_pipeline(monkeypatch):
    """The README's 10-line loop (stock UNet2DModel + DDPMScheduler, set_timesteps(1)) gives our pipeline's images."""
    from stepdistill import StepDistillPipeline

    monkeypatch.chdir(REPO)
    ns: dict = {}
    exec(compile(_readme_block("## With stock diffusers only"), "README.md", "exec"), ns)  # noqa: S102 - our README
    assert [int(t) for t in ns["scheduler"].timesteps] == [999]
    ref = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")(class_labels=[2, 4, 2, 4], seed=0,
                                                                           output_type="pt").images
    torch.testing.assert_close(ns["images"], (ref + 1) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, steps", [("animal_mnist_dmd2_student", [999]),
                                         ("animal_mnist_dmd2_4step_student", [999, 749, 499, 249])])
def test_shipped_students_use_trailing_spacing_and_name_themselves(name, steps):
    from diffusers import DDPMScheduler

    folder = REPO / "stepdistill" / "assets" / name
    s = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    s.set_timesteps(len(steps))
    assert [int(t) for t in s.timesteps] == steps  # a stock loop lands on the student's own timesteps
    card = (folder / "README.md").read_text()
    assert f"# {name}: {len(steps)}-step student" in card and ".tmp_" not in card
    assert "| fid |" in card and "| recall |" in card  # measured, not "Not measured yet"


def test_missing_run_folder_points_to_the_shipped_student(tmp_path, monkeypatch, capsys):
    from stepdistill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "runs/dmd2_animal_mnist/student", "--num", "2"]) == 2
    err = capsys.readouterr().err
    assert "make run" in err and "builtin:animal_mnist_dmd2" in err and err.count("\n") == 1
