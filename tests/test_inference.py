"""Inference at the floor: a cached denoiser with unchanged images, opt-in variants that revert exactly, honest
speed-up fields and the onnxruntime row in `stepdistill bench`, --compile wiring."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def pipe():
    from stepdistill import StepDistillPipeline

    return StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2_4step")


def test_cached_denoiser_keeps_the_images_bit_for_bit(pipe):
    from stepdistill.denoiser import Denoiser
    from stepdistill.pipelines.sampling import student_sample
    from stepdistill.schedules import schedule_from_config

    out = pipe(class_labels=["cat", "dog", "cow"], seed=3, output_type="pt").images
    again = pipe(class_labels=["cat", "dog", "cow"], seed=3, output_type="pt").images
    # today's computation, written out: a fresh Denoiser per call, noise then one draw per re-noising
    den = Denoiser(pipe.unet, schedule_from_config(dict(pipe.scheduler.config)), pipe.config.prediction_type)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 1, 32, 32, generator=g)
    ref = student_sample(den, pipe.config.student_timesteps, torch.tensor([2, 4, 3]), noise, generator=g)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    d = pipe.denoiser()
    assert d is pipe.denoiser()  # built once
    pipe.scheduler.register_to_config(prediction_type=pipe.scheduler.config.prediction_type)  # a new config dict
    assert pipe.denoiser() is not d  # rebuilt when a component or its config changes


@pytest.mark.parametrize("name", ["channels_last", "bf16", "math_attention"])
def test_variants_apply_and_revert_exactly(pipe, name):
    from stepdistill.eval.variants import applied, image_difference, unavailable

    assert unavailable(name, pipe) is None
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref = pipe(class_labels=[0, 1], seed=0, output_type="pt").images
    with applied(name, pipe):
        got = pipe(class_labels=[0, 1], seed=0, output_type="pt").images
        if name == "bf16":
            assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    diff = image_difference(got, ref)
    assert diff["max_abs_diff"] < (0.3 if name == "bf16" else 1e-4)  # bf16: a few 8-bit levels; others: rounding
    assert 0 < diff["max_abs_diff"] or name != "bf16"  # bf16 really ran in bf16
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and next(pipe.unet.parameters()).dtype == torch.float32
    assert torch.equal(pipe(class_labels=[0, 1], seed=0, output_type="pt").images, ref)
    assert unavailable("fp16", pipe) and unavailable("nope", pipe).startswith("unknown variant")


def test_bench_reports_honest_speedups_variants_and_onnx(capsys):
    from stepdistill.frontends.cli import main

    pytest.importorskip("onnxruntime")
    assert main(["bench", "--student", "builtin:animal_mnist_dmd2", "--batch-sizes", "2", "--teacher-steps", "3",
                 "--repeats", "1", "--warmup", "1", "--variants", "channels_last,fp16", "--onnx", "--no-progress",
                 "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    sp = r["speedup"]
    assert sp["nfe_ratio"] == 6  # 3 steps x 2 (CFG) vs 1
    assert sp["wall_clock"] > 0 and sp["wall_clock_sequential_cfg_teacher"] > 0 and sp["ceiling_from_bare_forwards"] > 0
    assert r["teacher_sequential_cfg"]["latency_s"] > 0 and r["bare_forward_2b"]["batch"] == 4
    cl, fp16 = r["variants"]
    assert cl["variant"] == "channels_last" and cl["max_abs_diff"] < 1e-4 and cl["speedup_vs_eager"] > 0
    assert fp16 == {"variant": "fp16", "skipped": fp16["skipped"]} and "CUDA" in fp16["skipped"]
    assert r["onnxruntime"]["max_abs_diff"] < 1e-4 and r["onnxruntime"]["speedup_vs_pytorch"] > 0


def test_compile_flags_are_wired(monkeypatch, tmp_path, capsys):
    import argparse

    from stepdistill import StepDistillPipeline
    from stepdistill.frontends import demo_ui as D
    from stepdistill.frontends.cli import main

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(type(self).__name__))
    assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "2", "--compile",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert calls == ["UNet2DModel"]
    p = StepDistillPipeline.from_pretrained("builtin:animal_mnist_dmd2")
    assert p.compile() is p and calls == ["UNet2DModel"] * 2
    ap = argparse.ArgumentParser()
    D.add_demo_args(ap)
    assert ap.parse_args(["--compile", "--share"]).compile is True
