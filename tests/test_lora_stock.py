"""A distilled LoRA that stock diffusers loads: a tiny stock Stable-Diffusion-style teacher (UNet2DConditionModel,
CLIPTextModel / CLIPTokenizer, AutoencoderKL) distilled with ``dmd.lora_rank > 0`` through the CLI; the exported
adapter in diffusers' format goes into ``StableDiffusionPipeline.load_lora_weights`` on the teacher's own weights and
gives our merged student's images at 1 and 4 steps; the kohya / A1111 file goes through diffusers' own converter to
the same images; ``fuse_lora`` / ``unfuse_lora`` round trips."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from test_text_sd_family import sd_teacher  # noqa: F401  (the tiny SD-family teacher fixture)

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_student(sd_teacher, tmp_path_factory):  # noqa: F811
    from stepdistill.frontends.cli import main

    out = tmp_path_factory.mktemp("sd_lora") / "run"
    argv = ["distill", "--config", "configs/dmd2_text_animal_mnist.yaml", *tiny_distill_overrides(
        sd_teacher, out, **{"dmd.student_timesteps": "[999,749,499,249]", "train.max_steps": 2, "train.sample_every": 2,
                            "dmd.critic_updates": 1, "train.batch_size": 4, "dmd.lora_rank": 4, "dmd.lora_alpha": 8,
                            "dmd.optim.lr": 5e-3, "dmd.critic_optim.lr": 5e-3,
                            "dmd.lora_targets": "[to_q,to_k,to_v,to_out.0,conv1,conv2]"})]
    assert main([str(a) for a in argv]) == 0
    return out / "student"


def _stock(teacher, scheduler_from):
    """A stock StableDiffusionPipeline on the teacher's own weights, with the student's exported scheduler."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(teacher, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(teacher, subfolder="unet"),
        scheduler=LCMScheduler.from_pretrained(scheduler_from, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _images(pipe, ts, seed=0):
    return pipe(["a 3", "a 5"], timesteps=ts, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def test_stock_pipeline_loads_the_distilled_lora(sd_teacher, lora_student):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    meta = json.loads((lora_student / "stepdistill.json").read_text())
    files = meta["extra"]["lora"]["files"]
    assert files == {"peft": "adapter_model.safetensors", "diffusers": "pytorch_lora_weights.safetensors",
                     "kohya": "lora_kohya.safetensors"}
    assert all((lora_student / "lora" / f).is_file() for f in files.values())
    merged = StableDiffusionPipeline.from_pretrained(lora_student)   # our export: the merged student
    base = _stock(sd_teacher, lora_student)
    ts_all = [int(t) for t in meta["student_timesteps"]]
    before = {len(ts): _images(base, ts) for ts in ([999], ts_all)}
    base.load_lora_weights(lora_student / "lora", weight_name=files["diffusers"], adapter_name="distilled")
    for ts in ([999], ts_all):
        want = _images(merged, ts)
        got = _images(base, ts)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        assert (want - before[len(ts)]).abs().max() > 1e-3  # the adapter changed the images: the test can fail
    # fuse / unfuse round trip
    base.fuse_lora()
    torch.testing.assert_close(_images(base, [999]), _images(merged, [999]), atol=2e-4, rtol=0)
    base.unfuse_lora()
    base.unload_lora_weights()
    torch.testing.assert_close(_images(base, [999]), before[1], atol=2e-4, rtol=0)


def test_kohya_file_round_trips_through_diffusers_converter(sd_teacher, lora_student):  # noqa: F811
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    kohya = load_file(str(lora_student / "lora" / "lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".lora_down.weight") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    merged = StableDiffusionPipeline.from_pretrained(lora_student)
    base = _stock(sd_teacher, lora_student)
    base.load_lora_weights(lora_student / "lora", weight_name="lora_kohya.safetensors")
    torch.testing.assert_close(_images(base, [999]), _images(merged, [999]), atol=2e-4, rtol=0)


def test_sd3_transformer_lora_loads_with_diffusers_loader(tmp_path):
    """SD3-style transformer (tiny, random): the distilled LoRA in diffusers' format goes into the teacher's own
    transformer through diffusers' loader (``SD3Transformer2DModel.load_lora_adapter``) and equals the merged
    student's output; no kohya file for transformers (kohya's names are the UNet's)."""
    import copy

    from diffusers import SD3Transformer2DModel

    from test_flow_teachers import TEXT, _bank, _cfg, _latents, _teacher
    from stepdistill.trainers.distill import distill

    teacher, bank = _teacher(), _bank()
    base = copy.deepcopy(teacher.backbone)
    (tmp_path / "base").mkdir()
    base.save_pretrained(tmp_path / "base")
    folder = distill(_cfg(tmp_path / "run", **{"dmd.lora_rank": 4, "dmd.lora_alpha": 2, "dmd.optim.lr": 5e-3,
                                              "dmd.lora_targets": "[to_q,to_k,to_v,to_out.0]"}),
                     teacher=teacher, meta=TEXT, data=_latents(), text_bank=bank)
    files = json.loads((folder / "stepdistill.json").read_text())["extra"]["lora"]["files"]
    assert files == {"peft": "adapter_model.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
    merged = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    stock = SD3Transformer2DModel.from_pretrained(tmp_path / "base").eval()
    c = bank.index(torch.tensor([0, 3]))
    x, t = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 500.0])

    def run(net):
        with torch.no_grad():
            return net(hidden_states=x, encoder_hidden_states=c["emb"], pooled_projections=c["pooled"],
                       timestep=t).sample

    plain = run(stock)
    stock.load_lora_adapter(str(folder / "lora" / files["diffusers"]), prefix="transformer", adapter_name="d")
    torch.testing.assert_close(run(stock), run(merged), atol=1e-5, rtol=1e-5)
    assert (run(merged) - plain).abs().max() > 1e-4
