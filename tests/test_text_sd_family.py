"""An SD-family text teacher (latent UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + AutoencoderKL, all tiny
and random, built offline) distilled with DMD2 from its folder; the exported student loads into the *stock*
``diffusers.StableDiffusionPipeline`` (LCMScheduler, explicit ``timesteps``) and gives the same images as our
own ``StepDistillTextPipeline`` for the same generator."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config

MAX_LEN = 12


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stepdistill.eval.clip_score import tiny_tokenizer
    from stepdistill.models import ModelMeta
    from stepdistill.text import PromptEncoder
    from stepdistill.text_models import TEXT_TEACHER_PIPELINE, save_text_folder

    root = tmp_path_factory.mktemp("sd_family")
    tok = tiny_tokenizer(root / "tok")
    tok.model_max_length = MAX_LEN
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=MAX_LEN,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval()
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4, layers_per_block=1)
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    meta = ModelMeta(prediction_type="epsilon", conditioning="text",
                     extra={"text": {"class_names": [str(i) for i in range(10)], "templates": ["a {name}"]}})
    return save_text_folder(root / "teacher", unet, sched, meta, TEXT_TEACHER_PIPELINE,
                            PromptEncoder(tok, enc, MAX_LEN), vae=vae)


@pytest.fixture(scope="module")
def sd_student(sd_teacher, tmp_path_factory):
    from stepdistill.trainers.distill import distill

    out = tmp_path_factory.mktemp("sd_student")
    cfg = load_config(DistillConfig, "configs/dmd2_text_animal_mnist.yaml", tiny_distill_overrides(
        sd_teacher, out, **{"dmd.student_timesteps": "[999,499]", "train.max_steps": 1, "train.sample_every": 1,
                            "dmd.critic_updates": 1, "train.batch_size": 4, "dmd.real_guidance_scale": 2.0}))
    return distill(cfg)


def test_latent_text_teacher_distills_on_vae_latents(sd_teacher, sd_student):
    from stepdistill.trainers.distill import build_method

    cfg = load_config(DistillConfig, None, tiny_distill_overrides(sd_teacher, sd_student.parent / "x"))
    obj, data, _ = build_method(cfg)
    assert data.images.shape[1:] == (4, 8, 8)             # VAE latents of the 16x16 digits
    assert int(data.labels.max()) < len(obj.conds) == 10  # bank-aligned: caption index per image
    log = [json.loads(s) for s in (sd_student.parent / "log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(v)) for r in log for k, v in r.items() if k.endswith("loss"))


def test_stock_stable_diffusion_pipeline_matches_ours(sd_student):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from stepdistill.pipelines.loading import load_text_pipeline

    from stepdistill.pipelines.text import StepDistillTextPipeline

    index = json.loads((sd_student / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    stock = StableDiffusionPipeline.from_pretrained(sd_student)
    assert isinstance(stock.scheduler, LCMScheduler) and stock.safety_checker is None
    ours = load_text_pipeline(sd_student)
    assert isinstance(ours, StepDistillTextPipeline) and ours.vae is not None
    prompts = ["a 3", "a 5"]
    ts_all = [int(t) for t in json.loads((sd_student / "stepdistill.json").read_text())["student_timesteps"]]
    assert ts_all == [999, 499]
    for ts in ([999], ts_all):
        a = stock(prompts, timesteps=ts, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images                                     # [0, 1]
        b = ours(prompts, num_inference_steps=len(ts), generator=torch.Generator().manual_seed(0),
                 output_type="pt").images                                      # [-1, 1]
        assert a.shape == b.shape == (2, 1, 16, 16)
        torch.testing.assert_close(a, (b + 1) / 2, atol=2e-4, rtol=0)
    card = (sd_student / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in card and "timesteps=[999, 499]" in card
    c = ours(prompts, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert (c - b).abs().max() > 1e-3                     # and the comparison can fail: other noise, other images
