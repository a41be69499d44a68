"""Text-to-image path: captions, prompt encoding, text teacher training, DMD2 of a text teacher from a config,
export with text encoder, sampling from prompts (CLI), eval with prompts and CLIP score.

Tiny models throughout: a 1-layer 32-d BERT with the shipped MiniLM tokenizer, UNet2DConditionModel on 16x16
digits (captions "a {digit}", ...). The shipped MiniLM itself is checked for shapes and the empty prompt."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.config import ConfigError, DistillConfig, TeacherConfig, load_config
from stepdistill.text import (CAPTION_TEMPLATES, CaptionConditioner, PromptEncoder, bank_aligned, caption_bank,
                              caption_classes, caption_set, minilm_dir)

TEMPLATES = ["a {name}", "a drawing of a {name}"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BertModel (1 layer, 32-d) saved with the shipped MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_teacher(tiny_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_teacher")
    argv = ["teacher", "--config", "configs/teacher_text_animal_mnist.yaml", f"output_dir={out}",
            "data.name=digits", "data.resolution=16", "model.block_out_channels=[16,32]",
            "model.attention_levels=[false,true]", "model.norm_num_groups=8", "model.attention_head_dim=8",
            f"text.encoder={tiny_encoder}", "text.max_length=8", f"text.templates={json.dumps(TEMPLATES)}",
            "train.batch_size=16", "train.max_steps=3", "train.sample_every=3", "train.checkpoint_every=3",
            "train.log_every=1", "train.cpu=true", "sample_steps=2"]
    assert main(argv) == 0
    return out / "model"


def _student_overrides(teacher, out):
    return tiny_distill_overrides(teacher, out, **{"dmd.student_timesteps": "[999,499]", "train.max_steps": 2,
                                                   "train.sample_every": 2})


@pytest.fixture(scope="module")
def text_student(text_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_student")
    argv = ["distill", "--config", "configs/dmd2_text_animal_mnist.yaml"] + _student_overrides(text_teacher, out)
    assert main(argv) == 0
    return out / "student"


# ----------------------------------------------------------------------------- captions and encoders

def test_caption_set_is_class_major():
    caps = caption_set(["cat", "dog"], TEMPLATES)
    assert caps == ["a cat", "a drawing of a cat", "a dog", "a drawing of a dog"]
    assert caption_classes(len(caps), len(TEMPLATES)).tolist() == [0, 0, 1, 1]
    assert len(caption_set(["cat"])) == len(CAPTION_TEMPLATES) >= 5


def test_minilm_encodes_fixed_length_token_embeddings():
    enc = PromptEncoder.load("minilm", 16)
    emb = enc(["a cat", "a dog", ""])
    assert emb.shape == (3, 16, 384) and enc.dim == 384 and torch.isfinite(emb).all()
    assert (emb[0] - emb[1]).abs().max() > 0.1            # different prompts, different conditions
    again = enc(["a cat"])
    torch.testing.assert_close(again[0], emb[0], atol=1e-5, rtol=0)   # padding-independent (masked attention)
    cached = enc.cached(["a cat", "a dog", ""])
    torch.testing.assert_close(cached, emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.cached(["a cat", "a dog", ""]), cached)  # read back from disk


def test_caption_conditioner_drops_to_empty_prompt_and_picks_class_captions(tiny_encoder):
    from stepdistill.trainers.objective import Ctx

    enc = PromptEncoder.load(tiny_encoder, 8)
    bank = caption_bank(enc, ["cat", "dog", "cow"], TEMPLATES)
    torch.testing.assert_close(bank.null_emb, enc([""]))
    cond = CaptionConditioner(bank, len(TEMPLATES))
    ctx = Ctx(torch.Generator().manual_seed(0), 0, 1, 6, torch.device("cpu"), 0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    drop = torch.tensor([False, False, False, True, False, True])
    c = cond.train_cond(labels, drop, ctx)
    assert c.shape == (6, 8, 32)
    for i in range(6):
        if drop[i]:
            torch.testing.assert_close(c[i], bank.null_emb[0])
        else:  # one of the two captions of its class
            d = [float((c[i] - bank.emb[labels[i] * 2 + k]).abs().max()) for k in range(2)]
            assert min(d) < 1e-6
    g = cond.grid(6, "cpu")
    torch.testing.assert_close(g[4], bank.emb[2])          # template 0 of class 4 % 3 = 1 -> caption 2
    torch.testing.assert_close(bank.grid(4, "cpu"), bank.emb[[0, 2, 4, 0]])   # DMD grids: one class per column


def test_bank_aligned_labels_index_captions_of_the_image_class():
    from stepdistill.data import ArrayDataset

    ds = ArrayDataset(torch.zeros(50, 1, 4, 4), torch.arange(50) % 5, list("abcde"))
    al = bank_aligned(ds, 3, seed=0)
    assert torch.equal(al.labels // 3, ds.labels) and al.labels.max() < 15 and len(al.labels.unique()) > 5


def test_text_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.conditioning"):
        load_config(TeacherConfig, None, ["model.conditioning=words"])
    with pytest.raises(ConfigError, match="text.templates"):
        load_config(TeacherConfig, None, ["text.templates=['a cat']"])
    with pytest.raises(ConfigError, match="text.max_lenght"):
        load_config(DistillConfig, None, ["text.max_lenght=3"])


# ----------------------------------------------------------------------------- teacher

def test_text_teacher_folder_and_pipeline_cfg(text_teacher):
    from diffusers import UNet2DConditionModel

    from stepdistill.pipelines.loading import load_text_pipeline

    from stepdistill.pipelines.text import StepDistillTextTeacherPipeline

    for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
        assert (text_teacher / sub).is_dir()
    assert list(text_teacher.glob("text_encoder/*.safetensors")) and not list(text_teacher.rglob("*.bin"))
    meta = json.loads((text_teacher / "stepdistill.json").read_text())
    assert meta["conditioning"] == "text" and meta["extra"]["text"]["class_names"][:2] == ["0", "1"]
    assert meta["extra"]["text"]["templates"] == TEMPLATES and meta["extra"]["text"]["max_length"] == 8
    pipe = load_text_pipeline(text_teacher)
    assert isinstance(pipe, StepDistillTextTeacherPipeline) and isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.unet.config.cross_attention_dim == 32
    kw = dict(num_inference_steps=3, output_type="pt")
    a = pipe(["a 3", "a 7"], seed=0, guidance_scale=3.0, **kw).images
    b = pipe(["a 3", "a 7"], seed=0, guidance_scale=3.0, **kw).images
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    neg = pipe(["a 3", "a 7"], negative_prompt="a 1", seed=0, guidance_scale=3.0, **kw).images
    assert (neg - a).abs().max() > 1e-4                   # the negative prompt replaces "" in CFG
    empty_neg = pipe(["a 3", "a 7"], negative_prompt="", seed=0, guidance_scale=3.0, **kw).images
    torch.testing.assert_close(empty_neg, a)              # "" is the default unconditional input
    # w = 1: CFG off, equals sampling the conditional model alone
    from stepdistill.pipelines.sampling import make_scheduler, scheduler_sample

    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = scheduler_sample(pipe.denoiser(), make_scheduler("ddim", dict(pipe.scheduler.config)),
                           pipe.encode_prompt(["a 3", "a 7"]), 3, 1.0, noise)
    torch.testing.assert_close(pipe(["a 3", "a 7"], seed=0, guidance_scale=1.0, **kw).images, ref)


def test_sample_cli_teacher_with_prompts(text_teacher, tmp_path, capsys):
    out = tmp_path / "t.png"
    rc = main(["sample", "--model", str(text_teacher), "--prompt", "a 3|a 5", "--negative-prompt", "a 8",
               "--steps", "2", "--num", "4", "--out", str(out)])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out.is_file() and res["n"] == 4 and res["prompts"] == ["a 3", "a 5"]
    assert main(["sample", "--model", str(text_teacher), "--classes", "3", "--out", str(out)]) == 2
    assert main(["sample", "--model", "builtin:animal_mnist", "--prompt", "a cat", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------- distillation and the student

def test_distill_cli_exports_a_text_student(text_student, text_teacher):
    from diffusers import LCMScheduler

    from stepdistill.pipelines.loading import load_text_pipeline

    from stepdistill.pipelines.text import StepDistillTextPipeline

    for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
        assert (text_student / sub).is_dir()
    index = json.loads((text_student / "model_index.json").read_text())
    assert index["_class_name"] == "StepDistillTextPipeline" and index["scheduler"][1] == "LCMScheduler"
    meta = json.loads((text_student / "stepdistill.json").read_text())
    assert meta["conditioning"] == "text" and meta["student_timesteps"] == [999.0, 499.0]
    assert meta["extra"]["text"]["templates"] == TEMPLATES
    log = [json.loads(s) for s in (text_student.parent / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["dm_loss"])) for r in log if "dm_loss" in r)
    assert any("gan_d_loss" in r or "gan_g_loss" in r for r in log)   # GAN real branch ran on bank-aligned data
    pipe = load_text_pipeline(text_student)
    assert isinstance(pipe, StepDistillTextPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    # the pipeline is the student chain on the teacher's prompt embeddings: check against a manual chain
    x = pipe(["a 3", "a 4"], generator=torch.Generator().manual_seed(0), output_type="pt").images
    g = torch.Generator().manual_seed(0)
    den, emb = pipe.denoiser(), pipe.encode_prompt(["a 3", "a 4"])
    z = torch.randn(2, 1, 16, 16, generator=g)
    x0 = den(z, torch.full((2,), 999.0), emb)
    z2 = den.schedule.add_noise(x0, torch.randn(2, 1, 16, 16, generator=g), torch.full((2,), 499.0))
    torch.testing.assert_close(x, den(z2, torch.full((2,), 499.0), emb).clamp(-1, 1))
    # the stock LCMScheduler with explicit timesteps reproduces the same chain
    sched = pipe.scheduler
    sched.set_timesteps(timesteps=[999, 499])
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 1, 16, 16, generator=g)
    for t in sched.timesteps:
        raw = den(lat, t.float().expand(2), emb, output="raw")
        lat = sched.step(raw, t, lat, generator=g).prev_sample
    torch.testing.assert_close(lat.clamp(-1, 1), x, atol=1e-4, rtol=0)


def test_export_cli_rebuilds_the_text_student(text_student, text_teacher, tmp_path):
    from stepdistill.pipelines.loading import load_text_pipeline

    out = tmp_path / "exported"
    argv = ["export", "--config", "configs/dmd2_text_animal_mnist.yaml", "--out", str(out)]
    assert main(argv + _student_overrides(text_teacher, text_student.parent)) == 0
    assert (out / "text_encoder").is_dir() and (out / "tokenizer").is_dir()
    a = load_text_pipeline(out)(["a 1"], seed=0, output_type="pt").images
    b = load_text_pipeline(text_student)(["a 1"], seed=0, output_type="pt").images
    torch.testing.assert_close(a, b)   # the latest checkpoint's EMA student is the exported one


def test_sample_cli_student_with_prompts(text_student, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc = main(["sample", "--model", str(text_student), "--prompt", "a 2", "--prompt", "a 9", "--num", "4",
               "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompts"] == ["a 2", "a 9"]
    assert main(["sample", "--model", str(text_student), "--negative-prompt", "a 1", "--out", str(out)]) == 2


def test_distill_with_prompt_file_needs_gan_off(text_teacher, tmp_path):
    from stepdistill.trainers.distill import build_method

    pf = tmp_path / "p.txt"
    pf.write_text("a 1\n# comment\na 2\n")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(text_teacher, tmp_path, **{"text.prompts": pf}))
    with pytest.raises(ConfigError, match="dmd.gan=false"):
        build_method(cfg)
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(text_teacher, tmp_path,
                                                                  **{"text.prompts": pf, "dmd.gan": "false"}))
    obj, data, meta = build_method(cfg)
    assert obj.conds.prompts == ["a 1", "a 2"] and data.images.shape[1:] == (1, 16, 16)


# ----------------------------------------------------------------------------- eval with prompts

def test_eval_student_with_prompts_and_tiny_clip(text_student, tmp_path, capsys):
    from stepdistill.eval.clip_score import tiny_random_clip

    model, tok = tiny_random_clip(seed=0)
    clip_dir = tmp_path / "clip"
    model.save_pretrained(clip_dir, safe_serialization=True)
    tok.save_pretrained(clip_dir)
    pf = tmp_path / "prompts.txt"
    pf.write_text("a 3\na drawing of a 5\n")
    common = ["eval", "--model", str(text_student), "--num", "8", "--ref", "digits", "--ref-num", "32",
              "--no-progress", "--threads", "1", "--prompts", str(pf), "--diversity-extractor", "pixel"]
    assert main(common + ["--clip-model", str(clip_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["conditioning"] == "text" and res["num_prompts"] == 2 and res["prompts_name_classes"]
    assert 0.0 <= res["clip_score"] <= 100.0 and res["fid"] is not None and res["fid"] >= 0
    assert res["class_accuracy"] is None          # the Animal-MNIST classifier does not apply to 16x16 digits
    assert res["diversity"] is not None and res["nfe_per_sample"] == 2
    # the CLIP score is that of the generated images with their own prompts (sample i <- prompt i mod 2)
    from stepdistill.eval.clip_score import clip_score
    from stepdistill.eval.generate import load_any

    m = load_any(text_student, device="cpu")
    x = m.generate(n=8, seed=0, batch_size=64, prompts=["a 3", "a drawing of a 5"], progress=False)
    model2, tok2 = tiny_random_clip(seed=0)
    assert res["clip_score"] == pytest.approx(clip_score(x, ["a 3", "a drawing of a 5"] * 4, model2, tok2), abs=1e-4)
    assert res["clip_score"] != pytest.approx(clip_score(x, ["a 7"] * 8, model2, tok2), abs=1e-4)


def test_eval_rejects_clip_for_class_models_and_labels_for_text(tiny_teacher, capsys, tmp_path):
    rc = main(["eval", "--model", str(tiny_teacher), "--num", "4", "--clip-model", str(tmp_path), "--no-progress"])
    assert rc == 2 and "--clip-model needs a text-to-image model" in capsys.readouterr().err


def test_text_model_generate_default_caption_set(text_student, text_teacher):
    from stepdistill.eval.generate import load_any

    s = load_any(text_student, device="cpu")
    assert s.kind == "student" and s.default_prompts() == caption_set([str(i) for i in range(10)], TEMPLATES)
    x = s.generate(n=6, seed=0, batch_size=4, progress=False)
    assert x.shape == (6, 1, 16, 16) and torch.equal(x, s.generate(n=6, seed=0, batch_size=4, progress=False))
    assert not torch.equal(x, s.generate(n=6, seed=1, batch_size=4, progress=False))
    assert s.last_prompts[:3] == ["a 0", "a drawing of a 0", "a 1"]
    assert s.prompt_classes(["a 3", "a drawing of a 5"]).tolist() == [3, 5]
    assert s.prompt_classes(["a 3 and a 5"]) is None
    t = load_any(text_teacher, device="cpu")
    assert t.kind == "teacher" and t.nfe_per_sample(5, 3.0) == 10 and t.nfe_per_sample(5, 1.0) == 5
    with pytest.raises(ConfigError, match="prompts, not class labels"):
        t.generate(labels=[1, 2], steps=2)


# ----------------------------------------------------------------------------- the shipped text teacher

def test_shipped_text_teacher_draws_the_prompted_animals():
    """builtin:animal_mnist_text loads offline (text encoder referenced: the MiniLM package) and its samples
    from "a {animal}" prompts are classified as that animal by the shipped domain classifier."""
    from stepdistill.data import ANIMAL_CLASSES
    from stepdistill.eval.classifier import class_accuracy, load_default_classifier
    from stepdistill.shipped import BUILTIN_TEACHERS
    from stepdistill.pipelines.loading import load_text_pipeline

    folder = BUILTIN_TEACHERS["builtin:animal_mnist_text"]
    assert not (folder / "text_encoder").exists() and sum(f.stat().st_size for f in folder.rglob("*")) < 10e6
    pipe = load_text_pipeline("builtin:animal_mnist_text")
    prompts = [f"a {n}" for n in ANIMAL_CLASSES] * 2
    x = pipe(prompts, seed=0, num_inference_steps=20, guidance_scale=3.0, output_type="pt").images
    acc, _ = class_accuracy(load_default_classifier(), x, torch.arange(20) % 10)
    assert x.shape == (20, 1, 32, 32) and acc >= 0.7
    # the empty prompt guided away from a negative prompt: hardly ever that animal
    neg = pipe([""] * 10, negative_prompt="a cat", seed=0, num_inference_steps=20, guidance_scale=3.0,
               output_type="pt").images
    cat_rate, _ = class_accuracy(load_default_classifier(), neg, torch.full((10,), ANIMAL_CLASSES.index("cat")))
    assert cat_rate <= 0.2


# ----------------------------------------------------------------------------- DMD's ODE pairs on prompts
def test_text_teacher_ode_pairs_are_prompt_conditioned_and_feed_the_regression_loss(text_teacher, tmp_path,
                                                                                     monkeypatch):
    """Text teachers get DMD's regression warm-up / loss: each pair stores a prompt index into the bank, its
    x0 is the teacher's DDIM sample *for that prompt* (recomputed here), and another prompt set gets other pairs."""
    from stepdistill.conditioning import TextEmbeddingBank
    from stepdistill.pairs import teacher_ode_pairs
    from stepdistill.pipelines.sampling import make_scheduler, scheduler_sample
    from stepdistill.trainers.distill import build_method

    cache = tmp_path / "cache"
    over = tiny_distill_overrides(text_teacher, tmp_path, **{"dmd.regression_pairs": 6, "dmd.regression_steps": 2,
                                                            "dmd.regression_warmup_steps": 1,
                                                            "dmd.regression_weight": 0.5})
    monkeypatch.setenv("STEPDISTILL_CACHE", str(cache))
    cfg = load_config(DistillConfig, None, over)
    obj, data, meta = build_method(cfg)
    noise, idx, x0 = obj.pairs
    bank = obj.conds
    assert noise.shape == (6, 1, 16, 16) and x0.shape == noise.shape
    assert idx.dtype == torch.long and 0 <= int(idx.min()) and int(idx.max()) < len(bank)
    assert len(set(idx.tolist())) > 1  # drawn over the prompt set, not one prompt
    sched_cfg = dict(obj.teacher.schedule.config)
    with torch.no_grad():
        one = scheduler_sample(obj.teacher, make_scheduler("ddim", sched_cfg), bank.index(idx[:2]), 2,
                               cfg.dmd.real_guidance_scale, noise[:2])
        other = scheduler_sample(obj.teacher, make_scheduler("ddim", sched_cfg),
                                 bank.index((idx[:2] + 1) % len(bank)), 2, cfg.dmd.real_guidance_scale, noise[:2])
    assert torch.allclose(one, x0[:2], atol=1e-5)
    assert not torch.allclose(other, x0[:2], atol=1e-3)  # the prompt matters
    # the warm-up step is the regression loss alone; later steps add it beside DM + GAN
    from stepdistill.trainers.objective import Ctx
    loss, logs = obj.generator_loss(Ctx(torch.Generator().manual_seed(0), 0, 1, 4, torch.device("cpu"), 0, data))
    assert logs["regression_loss"] > 0 and loss.item() == pytest.approx(logs["regression_loss"])
    # another prompt set -> another cache entry, not the first set's pairs
    other_bank = TextEmbeddingBank(bank.emb[:3] * 2, null_emb=bank.null_emb)
    again = teacher_ode_pairs(obj.teacher, cfg.dmd, 0, (1, 16, 16), seed=cfg.train.seed, conds=other_bank)
    assert int(again[1].max()) < 3 and not torch.equal(again[2], x0)
    assert len(list((cache / "pairs").glob("pairs_*"))) == 2
