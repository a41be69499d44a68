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
    from stepdistill.frontends.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", "runs/dmd2_animal_mnist/student", "--num", "2"]) == 2
    err = capsys.readouterr().err
    assert "make run" in err and "builtin:animal_mnist_dmd2" in err and err.count("\n") == 1


def _parser():
    import argparse

    from stepdistill.frontends import cli

    box = {}

    def grab(self, argv=None, namespace=None):
        box["ap"] = self
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(SystemExit):
            cli.main([])
    return box["ap"]


def test_every_flag_has_plain_help_and_version(capsys):
    import argparse

    from stepdistill.frontends.cli import main

    ap = _parser()
    assert "``" not in ap.description
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings or a.dest) for name, p in sub.choices.items() for a in p._actions
               if not a.help or "``" in a.help]
    assert missing == []
    assert not any("--resume" in a.option_strings for a in sub.choices["export"]._actions)  # nothing to resume
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"stepdistill \d+\.\d+", capsys.readouterr().out)


def test_sample_classes_give_num_images_in_labelled_columns(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from stepdistill.frontends.cli import main

    assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--classes", "cat,dog,cow", "--num", "20",
                 "--guidance-scale", "3", "--out", str(tmp_path / "g.png")]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["n"] == 20 and out["columns"] == 3  # 7 + 7 + 6: all 20, one column per class
    assert "--guidance-scale ignored" in cap.err  # a student's guidance is distilled in
    g = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    cell = 2 * 33  # 32 px + 1 px padding, --scale 2
    assert g.shape[1] == 3 * cell + 2 and g.shape[0] > 7 * cell + 2  # 7 rows plus the header strip
    header = g[: g.shape[0] - (7 * cell + 2)]
    assert (header < 128).sum() > 20  # the class names are drawn
    assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--out", str(tmp_path / "all.png"),
                 "--num", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["columns"] == 10  # the same layout without --classes
    assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--classes", "cat,dog,cow", "--num", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--num 2 is fewer than the 3 classes" in capsys.readouterr().err


def test_sample_labels_cycle_through_the_classes():
    from types import SimpleNamespace

    from stepdistill.frontends.cli import _parse_labels

    meta = SimpleNamespace(class_names=["a", "b", "c", "d"])
    assert _parse_labels("c,a", meta, 5).tolist() == [2, 0, 2, 0, 2]
    assert _parse_labels(None, meta, 6).tolist() == [0, 1, 2, 3, 0, 1]


def test_class_accuracy_of_the_shipped_student():
    """eval's class accuracy on Animal-MNIST samples (the shipped classifier): per-class entries, a sane value."""
    from stepdistill import StepDistillPipeline
    from stepdistill.eval.metrics import classifier_accuracy

    pipe = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")
    labels = torch.arange(20) % 10
    x = pipe(class_labels=labels.tolist(), seed=0, output_type="pt").images
    r = classifier_accuracy(x, labels, pipe.config.class_names)
    assert 0.7 <= r["class_accuracy"] <= 1.0
    assert set(r["per_class_accuracy"]) == set(pipe.config.class_names)
