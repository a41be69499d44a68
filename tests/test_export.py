"""Export round trip: pipeline == stock diffusers reproduction == training-time sampler."""
from __future__ import annotations

import json

import torch

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.distill import distill


def _student(tiny_teacher, out, **extra):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **extra))
    return distill(cfg), cfg


def test_pipeline_equals_stock_diffusers_reproduction(tiny_teacher, tmp_path):
    folder, _ = _student(tiny_teacher, tmp_path, **{"dmd.student_timesteps": "[999,499]"})
    from stepdistill.pipelines.student import StepDistillPipeline

    pipe = StepDistillPipeline.from_pretrained(folder)
    assert pipe.config.student_timesteps == [999.0, 499.0]
    labels = [0, 3, 7]
    out = pipe(class_labels=labels, num_inference_steps=2, seed=5, output_type="pt").images

    # stock diffusers only: UNet2DModel + DDPMScheduler, v-prediction conversion written out
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    ac = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 16, 16, generator=g)
    y = torch.tensor(labels)
    for k, t in enumerate([999, 499]):
        a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
        with torch.no_grad():
            v = unet(x, torch.full((3,), float(t)), class_labels=y).sample
        x0 = (a * x - s * v) / (a**2 + s**2)
        if k == 0:
            n = torch.randn(3, 1, 16, 16, generator=g)
            x = ac[499].sqrt() * x0 + (1 - ac[499]).sqrt() * n
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_pipeline_matches_training_sampler_and_step_subsets(tiny_teacher, tmp_path):
    folder, cfg = _student(tiny_teacher, tmp_path, **{"dmd.student_timesteps": "[999,749,499,249]"})
    from stepdistill.pipelines.student import StepDistillPipeline

    pipe = StepDistillPipeline.from_pretrained(folder)
    a = pipe(class_labels=["1", "2"], num_inference_steps=4, seed=0, output_type="pt").images
    b = pipe(class_labels=[1, 2], num_inference_steps=4, seed=0, output_type="pt").images
    c = pipe(class_labels=[1, 2], num_inference_steps=1, seed=0, output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert pipe.timesteps_for(2) == [999.0, 249.0] and pipe.timesteps_for(1) == [999.0]
    pil = pipe(class_labels=[1], seed=0).images
    assert pil[0].size == (16, 16)
    import pytest

    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(class_labels=[1], num_inference_steps=5)
    with pytest.raises(ValueError, match="unknown class"):
        pipe(class_labels=["cat"])


def test_export_cli_from_checkpoint_matches_final_export(tiny_teacher, tmp_path):
    from stepdistill.frontends.cli import main
    from safetensors.torch import load_file

    folder, cfg = _student(tiny_teacher, tmp_path)
    overrides = tiny_distill_overrides(tiny_teacher, tmp_path)
    assert main(["export", "--config", "", *overrides, "--out", str(tmp_path / "again")]) == 0
    w1 = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["method"] == "dmd2" and meta["student_timesteps"] == [999.0]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StepDistillPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    # --weights raw: the generator's own (un-averaged) weights of the same checkpoint, not the EMA
    assert main(["export", "--config", "", *overrides, "--weights", "raw", "--out", str(tmp_path / "raw")]) == 0
    raw = load_file(tmp_path / "raw" / "unet" / "diffusion_pytorch_model.safetensors")
    ckpt = load_file(tmp_path / "checkpoints" / "step_000004" / "models.safetensors")
    assert all(torch.equal(raw[k], ckpt[f"player.generator.{k}"]) for k in raw)
    assert any(not torch.equal(raw[k], w1[k]) for k in raw)      # EMA 0.95 over 4 steps differs from raw


def test_student_init_starts_the_generator_from_a_trained_student(tiny_teacher, tmp_path):
    """dmd.student_init: the generator starts from an exported student, the critic from the teacher; a
    student of another architecture is refused with the key named."""
    import pytest

    from stepdistill.errors import ConfigError
    from stepdistill.models import load_denoiser
    from stepdistill.trainers.distill import build_method

    folder, _ = _student(tiny_teacher, tmp_path / "first")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "second",
                                                                  **{"dmd.student_init": folder}))
    obj, _, _ = build_method(cfg)
    trained, _ = load_denoiser(folder)
    teacher, _ = load_denoiser(tiny_teacher)
    for got, want in ((obj.student, trained), (obj.critic, teacher), (obj.teacher, teacher)):
        sd, ref = got.backbone.state_dict(), want.backbone.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    bad = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "third",
                                                                  **{"dmd.student_init": "builtin:animal_mnist_dmd2"}))
    with pytest.raises(ConfigError, match="dmd.student_init builtin:animal_mnist_dmd2: its network does not match"):
        build_method(bad)


def test_sample_cli_grids_and_errors(tiny_teacher, tmp_path, capsys):
    from PIL import Image

    from stepdistill.frontends.cli import main

    out = tmp_path / "t.png"
    assert main(["sample", "--model", str(tiny_teacher), "--scheduler", "euler", "--steps", "3", "--num", "6",
                 "--nrow", "3", "--scale", "1", "--out", str(out)]) == 0
    # 2 rows x 3 columns of 16x16 images with 1-pixel borders; classes 0..5 mix in a column: a caption strip per row
    assert Image.open(out).size == (3 * 17 + 1, 2 * 17 + 1 + 2 * 12)
    assert main(["sample", "--model", str(tiny_teacher), "--classes", "unicorn", "--out", str(out)]) == 2
    assert "unknown class 'unicorn'" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
