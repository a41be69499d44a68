"""Model cards: front matter, method, steps, config block, metrics; metric updates keep the rest."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from stepdistill.modelcard import (METRICS_END, METRICS_START, NOT_MEASURED, update_model_card_metrics,
                                   write_model_card)

CONFIG = {"method": "dmd2", "dmd": {"teacher": "builtin:animal_mnist", "student_timesteps": [999, 500],
                                    "real_guidance_scale": 2.0}, "train": {"max_steps": 300, "cpu": True}}


def _front_matter(text: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _write(folder, metrics=None):
    return write_model_card(folder, method="dmd2", teacher="builtin:animal_mnist", steps=[999.0, 500.0],
                            config=CONFIG, metrics=metrics, class_names=["cat", "dog"])


def test_card_contents(tmp_path):
    p = _write(tmp_path / "student")
    assert p == tmp_path / "student" / "README.md"
    text = p.read_text()
    fm = _front_matter(text)
    assert fm["library_name"] == "diffusers" and fm["base_model"] == "builtin:animal_mnist"
    assert {"stepdistill", "distillation", "dmd2"} <= set(fm["tags"])
    assert "## Method" in text and "DMD2" in text and "Distribution Matching" in text
    assert "## Teacher" in text and "`builtin:animal_mnist`" in text
    assert "2 step(s) at timesteps `[999, 500]`" in text
    assert "0: `cat`, 1: `dog`" in text
    assert yaml.safe_load(_code_blocks(text, "yaml")[0]) == CONFIG
    usage = "\n".join(_code_blocks(text, "python"))
    assert 'StepDistillPipeline.from_pretrained("student")' in usage
    assert 'UNet2DModel.from_pretrained(folder, subfolder="unet")' in usage and "DDPMScheduler" in usage
    assert "scheduler.set_timesteps(timesteps=[999, 500])" in usage and "add_noise" in usage
    assert METRICS_START in text and METRICS_END in text and NOT_MEASURED in text


def test_card_with_metrics_and_unknown_method(tmp_path):
    text = _write(tmp_path, {"fid": 12.345678, "classifier": {"accuracy": 0.91}, "nfe": 1}).read_text()
    assert "| fid | 12.35 |" in text and "| classifier.accuracy | 0.91 |" in text and "| nfe | 1 |" in text
    assert NOT_MEASURED not in text
    t2 = write_model_card(tmp_path / "x", method="my-method", teacher="t", steps=[999], config={}, metrics={},
                          class_names=[]).read_text()
    assert "my-method" in _front_matter(t2)["tags"] and NOT_MEASURED in t2


def test_update_replaces_metrics_only(tmp_path):
    p = _write(tmp_path)
    p.write_text(p.read_text().replace("## Teacher", "Hand-written note.\n\n## Teacher"))  # a user edit
    before = p.read_text()
    head, tail = before.split(METRICS_START)[0], before.split(METRICS_END)[1]
    update_model_card_metrics(tmp_path, {"fid": 3.5, "kid": 0.001})
    after = p.read_text()
    assert after.startswith(head) and after.endswith(tail) and "Hand-written note." in after
    assert "| fid | 3.5 |" in after and "| kid | 0.001 |" in after and NOT_MEASURED not in after
    update_model_card_metrics(tmp_path, {"fid": 2.0})  # again: replaced, not appended
    after2 = p.read_text()
    assert after2.count("## Metrics") == 1 and "| fid | 2 |" in after2 and "kid" not in after2
    assert after2.startswith(head) and after2.endswith(tail)


def test_update_without_markers(tmp_path):
    p = _write(tmp_path)
    text = p.read_text().replace(METRICS_START + "\n", "").replace(METRICS_END + "\n", "")
    p.write_text(text + "\n## License\n\nApache-2.0\n")
    update_model_card_metrics(tmp_path, {"fid": 1.0})
    out = p.read_text()
    assert out.count("## Metrics") == 1 and "| fid | 1 |" in out and out.rstrip().endswith("Apache-2.0")
    with pytest.raises(FileNotFoundError):
        update_model_card_metrics(tmp_path / "missing", {"fid": 1.0})


def test_stock_diffusers_snippet_reproduces_pipeline(tiny_teacher, tmp_path, monkeypatch):
    """The card's diffusers-only snippet gives the StepDistillPipeline output on a real 2-step student."""
    from conftest import tiny_distill_overrides
    from stepdistill.config import DistillConfig, load_config
    from stepdistill.pipelines.student import StepDistillPipeline
    from stepdistill.trainers.distill import distill

    student = distill(load_config(DistillConfig, None, tiny_distill_overrides(
        tiny_teacher, tmp_path / "run", **{"dmd.student_timesteps": "[999,500]", "train.max_steps": 1})))
    text = write_model_card(student, method="dmd2", teacher=str(tiny_teacher), steps=[999, 500], config=CONFIG,
                            metrics=None, class_names=[str(i) for i in range(10)]).read_text()
    snippet = _code_blocks(text, "python")[1]
    monkeypatch.chdir(student.parent)  # the snippet loads the folder by its name
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - our own generated code
    ref = StepDistillPipeline.from_pretrained(student)(class_labels=[0] * 4, num_inference_steps=2, seed=0,
                                                       output_type="pt").images
    torch.testing.assert_close(ns["images"], ref, atol=1e-4, rtol=1e-4)
