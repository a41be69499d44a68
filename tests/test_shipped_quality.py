"""The shipped students keep the quality BENCHMARKS.md reports (500 class-balanced samples, seed 0, against the
1,000 Animal-MNIST test images). Minutes on 2 cores, so marked slow and left out of CI: the FID / recall /
accuracy code paths are covered fast in test_eval_fid.py, test_coverage.py and test_eval_cli.py, and the
shipped weights' hashes by the model tests. Run with ``pytest -m slow``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("model, steps, record", [
    ("builtin:animal_mnist_dmd2", 1, "eval_dmd2_1step_shipped.json"),
    ("builtin:animal_mnist_dmd2_4step", 4, "eval_dmd2_4step.json"),
])
def test_shipped_student_matches_its_benchmark_row(model, steps, record):
    from stepdistill.eval.generate import evaluate_model

    want = json.loads((DOCS / record).read_text())
    got = evaluate_model(model, steps=steps, num=500, seed=0, progress=False)
    assert abs(got["fid"] - want["fid"]) < 1.0                 # float noise across machines, not a new model
    assert abs(got["recall"] - want["recall"]) <= 0.01
    assert abs(got["class_accuracy"] - want["class_accuracy"]) <= 0.01
