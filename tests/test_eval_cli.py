"""`stepdistill eval` and the generation wrapper (stepdistill.eval.generate) on the tiny digits teacher.

FID runs the 2015 Inception network on CPU (~0.15 s per image), so the FID tests use 16 generated
images against a 32-image digits reference (cached after the first run) at 16x16.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.eval.generate import (
    StudentModel,
    TeacherModel,
    TextModelsNotSupported,
    load_any,
    load_reference,
)
from stepdistill.models import ModelLoadError


@pytest.fixture(scope="module")
def student2(tiny_teacher, tmp_path_factory):
    """A tiny two-step student (timesteps 999, 499) distilled from the tiny teacher (4 steps, ~2 s)."""
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("eval_student")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **{"dmd.student_timesteps": "[999,499]"}))
    return distill(cfg)


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


EVAL_FAST = ["--ref", "digits", "--ref-num", "32", "--no-progress", "--threads", "1"]


# ---------------------------------------------------------------------------- generation wrapper

def test_load_any_detects_teacher_and_student(tiny_teacher, student2):
    from stepdistill.models import read_folder

    assert read_folder(tiny_teacher).kind == "teacher" and read_folder(student2).kind == "student"
    t, s = load_any(tiny_teacher, device="cpu"), load_any(student2, device="cpu")
    assert isinstance(t, TeacherModel) and isinstance(s, StudentModel)
    assert s.max_steps == 2 and s.image_shape == t.image_shape == (1, 16, 16)
    assert t.nfe_per_sample(7, 2.0) == 14 and t.nfe_per_sample(7, 1.0) == 7
    assert s.nfe_per_sample(1) == 1 and s.nfe_per_sample(2) == 2
    assert s.default_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_generate_is_deterministic_and_batch_size_independent(tiny_teacher, student2):
    s, t = load_any(student2, device="cpu"), load_any(tiny_teacher, device="cpu")
    a = s.generate(n=6, steps=1, seed=3, batch_size=6, progress=False)
    b = s.generate(n=6, steps=1, seed=3, batch_size=4, progress=False)
    c = s.generate(n=6, steps=1, seed=4, batch_size=6, progress=False)
    assert a.shape == (6, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c)
    x2 = s.generate(n=6, steps=2, seed=3, batch_size=4, progress=False)
    torch.testing.assert_close(x2, s.generate(n=6, steps=2, seed=3, batch_size=4, progress=False))
    y = t.generate(torch.tensor([5, 5, 1]), steps=3, guidance_scale=2.0, seed=3, progress=False)
    torch.testing.assert_close(y, t.generate(torch.tensor([5, 5, 1]), steps=3, guidance_scale=2.0, seed=3, progress=False))
    # teacher and student start from the same noise for the same seed
    torch.testing.assert_close(t.noise(4, 3), s.noise(4, 3))


def test_generate_rejects_bad_requests(student2):
    s = load_any(student2, device="cpu")
    with pytest.raises(ConfigError, match="1..2"):
        s.generate(n=2, steps=3, progress=False)
    with pytest.raises(ConfigError, match="0..9"):
        s.generate(torch.tensor([0, 10]), steps=1, progress=False)
    with pytest.raises(NotImplementedError, match="text"):
        s.generate(n=2, steps=1, prompts=["a cat"], progress=False)
    with pytest.raises(ModelLoadError, match="no such"):
        load_any(student2.parent / "nope")


def test_text_models_are_rejected_clearly(tiny_teacher, tmp_path):
    import shutil

    folder = tmp_path / "text_teacher"
    shutil.copytree(tiny_teacher, folder)
    meta = json.loads((folder / "stepdistill.json").read_text())
    meta["conditioning"] = "text"
    (folder / "stepdistill.json").write_text(json.dumps(meta))
    with pytest.raises(TextModelsNotSupported, match="text-conditioned"):
        load_any(folder, device="cpu")


def test_reference_subset_is_class_balanced():
    images, labels, key = load_reference("digits", 16, 1, "test", 20)
    assert images.shape == (20, 1, 16, 16) and sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    assert key == "digits-16-test-sub20"


# ---------------------------------------------------------------------------- stepdistill eval

def test_eval_prints_finite_metrics_and_is_reproducible(student2, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, err = _run(capsys, "eval", "--model", student2, "--num", 16, "--seed", 1, "--out", out, *EVAL_FAST)
    assert rc == 0
    assert "warning: FID from 16 samples is dominated by its small-sample bias" in err
    res = json.loads(stdout)
    assert json.loads(out.read_text()) == res
    for k in ("fid", "kid", "kid_std", "diversity"):
        assert isinstance(res[k], float) and math.isfinite(res[k]), k
    assert res["fid"] > 0 and res["diversity"] >= 0
    for k in ("precision", "recall", "coverage"):  # mode coverage (eval/coverage.py), same Inception features
        assert 0.0 <= res[k] <= 1.0, k
    assert res["prc_neighbours"] == 3
    assert "per_class_recall" not in res  # 16 samples over 10 classes: no class has more than k = 3
    assert res["kind"] == "student" and res["steps"] == 2 and res["nfe_per_sample"] == 2 and res["n_gen"] == 16
    assert res["reference"]["cache_key"] == "digits-16-test-sub32" and res["reference"]["n"] == 32
    assert res["class_accuracy"] is None  # digits: the Animal-MNIST classifier does not apply
    # same seed -> same samples -> same FID (reference statistics now come from the cache)
    rc, stdout, _ = _run(capsys, "eval", "--model", student2, "--num", 16, "--seed", 1,
                         "--diversity-extractor", "pixel", *EVAL_FAST)
    again = json.loads(stdout)
    assert rc == 0 and again["ref_cache_hit"] is True
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-6, abs=1e-6)
    assert again["diversity_extractor"] == "pixel"


@pytest.mark.parametrize("args, message", [
    (["--num", "1"], "--num must be >= 2"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "3"], "steps must be in 1..2"),
    (["--ref", "imagenet"], "unknown reference 'imagenet'"),
])
def test_eval_bad_inputs_exit_2(student2, capsys, args, message):
    rc, stdout, err = _run(capsys, "eval", "--model", student2, "--num", 4, *EVAL_FAST, *args)  # later flags win
    assert rc == 2 and stdout == ""
    assert err.startswith("error: ") and message in err


def test_eval_missing_model_and_prompts_exit_2(student2, tmp_path, capsys):
    rc, _, err = _run(capsys, "eval", "--model", tmp_path / "missing", "--num", 4, *EVAL_FAST)
    assert rc == 2 and "error: " in err and "no such folder" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    rc, _, err = _run(capsys, "eval", "--model", student2, "--num", 4, "--prompts", prompts, *EVAL_FAST)
    assert rc == 2 and "error: " in err and "text" in err
    rc, _, err = _run(capsys, "eval", "--model", student2, "--num", 4, "--prompts", tmp_path / "none.txt", *EVAL_FAST)
    assert rc == 2 and "prompt file" in err


def test_every_eval_model_is_one_interface():
    """Class teachers, students and text models share eval/model.py's EvalModel: same shape, cost and summary."""
    from stepdistill.eval.generate import load_any
    from stepdistill.eval.model import EvalModel

    t = load_any("builtin:animal_mnist", device="cpu")
    s = load_any("builtin:animal_mnist_dmd2_4step", device="cpu")
    x = load_any("builtin:animal_mnist_text", device="cpu")
    for m in (t, s, x):
        assert isinstance(m, EvalModel) and m.image_shape == (1, 32, 32) and m.channels == 1 and m.resolution == 32
        assert m.num_params() == sum(p.numel() for p in m.network.parameters()) > 0
        assert m.describe()["image_shape"] == [1, 32, 32]
    assert (t.nfe_per_sample(25, 2.0), t.nfe_per_sample(25, 1.0)) == (50, 25)
    assert (s.nfe_per_sample(), s.nfe_per_sample(2)) == (4, 2)
    assert x.is_text and x.describe()["conditioning"] == "text" and x.num_classes == 0
    assert x.nfe_per_sample(10, 3.0) == (20 if x.kind == "teacher" else 10)
