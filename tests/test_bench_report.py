"""`stepdistill bench` and `stepdistill report` on the tiny digits teacher and a tiny 2-step student."""
from __future__ import annotations

import json
import math
import re

import pytest

from conftest import tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.config import DistillConfig, load_config


@pytest.fixture(scope="module")
def student2(tiny_teacher, tmp_path_factory):
    """A two-step student (timesteps 999, 499) in a run folder (so ../loss.png exists)."""
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("bench_run")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **{"dmd.student_timesteps": "[999,499]"}))
    return distill(cfg)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---------------------------------------------------------------------------- bench

def test_bench_json_keys_and_exact_nfe(tiny_teacher, student2, capsys):
    rc, out, _ = _run(capsys, "bench", "--teacher", tiny_teacher, "--student", student2, "--batch-sizes", "1,4",
                      "--teacher-steps", 3, "--repeats", 2, "--guidance-scale", 2, "--no-progress", "--threads", 1)
    assert rc == 0
    res = json.loads(out)
    assert set(res) >= {"machine", "config", "memory_method", "results"}
    m = res["machine"]
    assert {"cpu_count", "torch", "device", "device_name", "date"} <= set(m) and m["cpu_count"] >= 1
    assert res["memory_method"] in ("rss_peak_delta_sampled", "ru_maxrss_delta", "cuda_max_memory_allocated_delta")
    assert res["config"]["student_steps"] == [1, 2]
    assert [r["batch_size"] for r in res["results"]] == [1, 4]
    for r in res["results"]:
        t = r["teacher"]
        assert t["nfe_per_sample"] == 6 and t["cfg"] is True and t["steps"] == 3
        assert len(t["latencies_s"]) == 2
        assert [s["steps"] for s in r["student"]] == [1, 2]
        assert [s["nfe_per_sample"] for s in r["student"]] == [1, 2]
        for row in [t, *r["student"]]:
            assert row["latency_s"] > 0 and math.isfinite(row["throughput_img_s"])
            assert row["throughput_img_s"] == pytest.approx(r["batch_size"] / row["latency_s"])
            assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= 0
        for s in r["student"]:
            assert s["speedup"] == pytest.approx(t["latency_s"] / s["latency_s"])
        assert r["bare_forward"]["latency_s"] > 0
        # the fewest-step pipeline's time over its one bare forward (no bound on wall-clock noise: no timed asserts)
        assert r["pipeline_overhead"] == pytest.approx(r["student"][0]["latency_s"] / r["bare_forward"]["latency_s"])


def test_bench_without_cfg_and_step_subset(tiny_teacher, student2, capsys):
    rc, out, _ = _run(capsys, "bench", "--teacher", tiny_teacher, "--student", student2, "--batch-sizes", "2",
                      "--teacher-steps", 2, "--student-steps", "2", "--repeats", 1, "--guidance-scale", 1,
                      "--no-progress", "--threads", 1)
    assert rc == 0
    r = json.loads(out)["results"][0]
    assert r["teacher"]["nfe_per_sample"] == 2 and r["teacher"]["cfg"] is False
    assert [s["steps"] for s in r["student"]] == [2] and r["pipeline_overhead"] > 0


@pytest.mark.parametrize("args, message", [
    (["--student-steps", "3"], "--student-steps must lie in 1..2"),
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    (["--batch-sizes", "a,b"], "comma-separated list"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bench_bad_inputs_exit_2(tiny_teacher, student2, capsys, args, message):
    rc, out, err = _run(capsys, "bench", "--teacher", tiny_teacher, "--student", student2, *args, "--no-progress")
    assert rc == 2 and out == "" and err.startswith("error: ") and message in err


def test_bench_swapped_models_exit_2(tiny_teacher, student2, capsys):
    rc, _, err = _run(capsys, "bench", "--teacher", student2, "--student", student2, "--no-progress")
    assert rc == 2 and "not a teacher" in err
    rc, _, err = _run(capsys, "bench", "--teacher", student2, "--student", tiny_teacher, "--no-progress")
    assert rc == 2 and "not a distilled student" in err


def test_bench_defaults_to_the_recorded_teacher(tiny_teacher, student2, capsys):
    rc, out, _ = _run(capsys, "bench", "--student", student2, "--batch-sizes", "1", "--teacher-steps", 1,
                      "--student-steps", "1", "--repeats", 1, "--no-progress")
    assert rc == 0 and json.loads(out)["config"]["teacher"] == str(tiny_teacher)


# ---------------------------------------------------------------------------- report

def test_report_writes_markdown_json_and_pngs(tiny_teacher, student2, tmp_path, capsys):
    from PIL import Image

    from stepdistill.eval.features import WeightsIntegrityError, fidhelper_weights_path

    try:   # `make install` installs them; a bare GPU machine (scripts/gpu_check.sh) may not have them
        fidhelper_weights_path()
    except WeightsIntegrityError as e:
        pytest.skip(f"--fid needs the offline Inception weights: {e}")
    out = tmp_path / "report"
    rc, stdout, err = _run(capsys, "report", "--student", student2, "--out", out, "--num", 20, "--teacher-steps", 3,
                         "--fid", "--fid-num", 10, "--ref", "digits", "--ref-num", 32,
                         "--diversity-extractor", "pixel", "--no-progress", "--threads", 1)
    assert rc == 0, err[-2000:]
    assert json.loads(stdout)["report"] == str(out / "report.md")
    for name in ("report.md", "report.json", "samples_grid.png", "loss.png", "fid_vs_steps.png"):
        assert (out / name).is_file(), name
    # 3 blocks (teacher | student 1 step | student 2 steps) of 2 rows x 10 class columns of 16x16 images,
    # 1-pixel borders, scale 2, separated by 4*2 white rows
    block_h, width = (2 * 17 + 1) * 2, (10 * 17 + 1) * 2
    assert Image.open(out / "samples_grid.png").size == (width, 3 * block_h + 2 * 8)

    rep = json.loads((out / "report.json").read_text())
    assert list(rep["runs"]) == ["teacher", "student_1", "student_2"]
    assert rep["teacher"]["path"] == str(tiny_teacher)  # taken from the student's stepdistill.json
    t, s1, s2 = rep["runs"]["teacher"], rep["runs"]["student_1"], rep["runs"]["student_2"]
    assert (t["nfe_per_sample"], s1["nfe_per_sample"], s2["nfe_per_sample"]) == (6, 1, 2)
    for r in (t, s1, s2):
        assert r["latency_per_image_s"] > 0 and math.isfinite(r["fid"]) and r["diversity"] >= 0
        assert 0 <= r["recall"] <= 1 and 0 <= r["precision"] <= 1
        assert r["class_accuracy"] is None  # not Animal-MNIST
    assert rep["fid"]["num_samples"] == 10 and [p["steps"] for p in rep["fid"]["student"]] == [1, 2]
    assert rep["fid"]["teacher"]["fid"] == t["fid"]

    md = (out / "report.md").read_text()
    assert "| FID | KID | precision | recall | worst-class recall |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"samples_grid.png", "loss.png", "fid_vs_steps.png"}
    for link in links:
        assert (out / link).is_file()
    assert "| teacher, 3 steps (ddim, CFG 2) | 6 |" in md and "| student, 1 step | 1 |" in md


def test_report_needs_a_teacher_and_enough_samples(student2, tmp_path, capsys):
    rc, _, err = _run(capsys, "report", "--student", student2, "--out", tmp_path / "r", "--num", 1, "--no-progress")
    assert rc == 2 and "--num must be >= 2" in err
    rc, _, err = _run(capsys, "report", "--student", student2, "--teacher", tmp_path / "gone", "--out", tmp_path / "r",
                      "--num", 4, "--no-progress")
    assert rc == 2 and "no such folder" in err


def test_teacher_metrics_must_share_the_report_protocol(tmp_path):
    from stepdistill.config import ConfigError
    from stepdistill.eval.report import _teacher_metrics

    ev = {"kind": "teacher", "num": 500, "seed": 0, "steps": 50, "nfe_per_sample": 100, "fid": 70.0,
          "reference": {"n": 1000, "cache_key": "animal_mnist-32-test"}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(ev))
    assert _teacher_metrics(p, 500, 0, 1000, "animal_mnist-32-test")["fid"] == 70.0
    with pytest.raises(ConfigError, match=r"num 500 \(report: 200\)"):
        _teacher_metrics(p, 200, 0, 1000, "animal_mnist-32-test")
    p.write_text(json.dumps({**ev, "kind": "student"}))
    with pytest.raises(ConfigError, match="kind 'student'"):
        _teacher_metrics(p, 500, 0, 1000, "animal_mnist-32-test")
