"""A phased student goes through eval, bench, report, the demo's pipeline lookup and `stepdistill export`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.distill import distill

PHASED = {"method": "phased_dmd", "phased.boundaries": "[999,500,0]", "train.max_steps": 2,
          "phased.steps_per_phase": "[1,1]", "dmd.critic_updates": 1, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def phased_student(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("phased")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **PHASED))
    return distill(cfg), out


def test_eval_loader_uses_the_phased_pipeline(phased_student):
    from stepdistill.config import ConfigError
    from stepdistill.eval.generate import load_any
    from stepdistill.pipelines.phased import PhasedDMDPipeline

    folder, _ = phased_student
    m = load_any(folder)
    assert m.kind == "student" and isinstance(m.pipe, PhasedDMDPipeline) and m.min_steps == m.max_steps
    assert (m.min_steps, m.max_steps) == (2, 2)
    with pytest.raises(ConfigError, match="one step per expert"):
        m.resolve_steps(1)
    labels = torch.tensor([0, 1, 2])
    x = m.generate(labels, steps=2, seed=3, batch_size=3, progress=False)
    ref = m.pipe(class_labels=[0, 1, 2], num_inference_steps=2, seed=3, output_type="pt").images
    torch.testing.assert_close(x, ref)
    assert m.pipe.last_experts == ["expert_0", "expert_1"]


def test_bench_and_report_on_a_phased_student(phased_student, tiny_teacher, tmp_path):
    from stepdistill.eval.bench import benchmark
    from stepdistill.eval.report import make_report

    folder, _ = phased_student
    r = benchmark(str(tiny_teacher), str(folder), batch_sizes=[2], teacher_steps=2, repeats=1, warmup=0,
                  progress=False)
    row = r["results"][0]
    assert [s["steps"] for s in row["student"]] == [2] and row["student"][0]["nfe_per_sample"] == 2
    assert row["pipeline_overhead"] > 0
    rep = make_report(str(folder), tmp_path / "rep", teacher=str(tiny_teacher), num=4, teacher_steps=2,
                      diversity_extractor="pixel", progress=False)
    assert set(rep["runs"]) == {"teacher", "student_2"}
    assert (tmp_path / "rep" / "report.md").exists()


def test_export_cli_handles_phased_runs(phased_student, tiny_teacher, tmp_path):
    from stepdistill.frontends.cli import main

    folder, out = phased_student
    overrides = tiny_distill_overrides(tiny_teacher, out, **PHASED)
    assert main(["export", "--config", "", *overrides, "--out", str(tmp_path / "again")]) == 0
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "PhasedDMDPipeline"
    from safetensors.torch import load_file

    for sub in ("unet", "expert_1"):
        a = load_file(folder / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "again" / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_finds_the_phased_pipeline_class(phased_student):
    from stepdistill.frontends import demo
    from stepdistill.pipelines.phased import PhasedDMDPipeline

    folder, _ = phased_student
    info = demo.read_model_info(str(folder))
    assert demo._student_pipeline_class(info) is PhasedDMDPipeline


def test_sample_cli_runs_every_expert_of_a_phased_folder(phased_student, tmp_path, capsys, monkeypatch):
    """`stepdistill sample` goes through the folder's own pipeline (the one sampling route): a Phased DMD folder
    samples with all its experts (PhasedDMDPipeline.sample), not with its first network alone."""
    from stepdistill.frontends.cli import main
    from stepdistill.pipelines.phased import PhasedDMDPipeline

    seen = []
    orig = PhasedDMDPipeline.sample

    def spy(self, noise, labels=None, num_inference_steps=None, **kw):
        x = orig(self, noise, labels, num_inference_steps, **kw)
        seen.append((noise.shape[0], num_inference_steps, list(self.last_experts)))
        return x

    monkeypatch.setattr(PhasedDMDPipeline, "sample", spy)
    folder, _ = phased_student
    assert main(["sample", "--model", str(folder), "--num", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert seen == [(3, 2, ["expert_0", "expert_1"])]
    assert main(["sample", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "h.png")]) == 2
    assert "num_inference_steps must be 2" in capsys.readouterr().err
