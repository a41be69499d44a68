"""Loading teachers as Denoisers (safetensors-only by default) and teacher sampling."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import stepdistill.models as models
import stepdistill.shipped as shipped
from stepdistill.denoiser import Denoiser
from stepdistill.models import ModelLoadError, ModelMeta, load_denoiser
from stepdistill.schedules import VPSchedule

torch.set_num_threads(1)


def _probe(den: Denoiser, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = den.backbone.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([100.0, 700.0])
    y = torch.tensor([1, 7])
    with torch.no_grad():
        return den(x, t, y), den(x, t, y, guidance_scale=2.0)


def test_tiny_teacher_folder_layout(tiny_teacher):
    root = Path(tiny_teacher)
    assert (root / "model_index.json").exists() and (root / "stepdistill.json").exists()
    assert (root / "unet" / "config.json").exists()
    assert (root / "unet" / models.WEIGHT_SAFE).exists()
    assert not list(root.rglob("*.bin")), "teacher saved with pickle weights"
    assert (root / "scheduler" / "scheduler_config.json").exists()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StepDistillTeacherPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_load_denoiser_pipeline_folder(tiny_teacher):
    den, meta = load_denoiser(tiny_teacher)
    assert isinstance(den, Denoiser) and den.kind == "unet2d"
    assert isinstance(den.schedule, VPSchedule)
    assert meta.prediction_type == "v_prediction" == den.prediction_type
    assert meta.conditioning == "class"
    assert meta.class_names == [str(i) for i in range(10)]
    assert meta.null_class == 10 == den.null_class
    assert den.backbone.config.num_class_embeds == 11
    # the schedule is the one saved with the model
    from diffusers import DDPMScheduler

    ref = DDPMScheduler.from_pretrained(Path(tiny_teacher) / "scheduler")
    torch.testing.assert_close(den.schedule.alphas_cumprod, ref.alphas_cumprod.double())
    x0, x0_cfg = _probe(den)
    assert torch.isfinite(x0).all() and (x0 - x0_cfg).abs().max() > 1e-6


def test_load_denoiser_unet_subfolder_matches(tiny_teacher):
    den, meta = load_denoiser(tiny_teacher)
    den2, meta2 = load_denoiser(Path(tiny_teacher) / "unet")
    assert den2.kind == "unet2d"
    # metadata inferred from the bare model folder agrees with stepdistill.json
    assert meta2.prediction_type == meta.prediction_type
    assert meta2.null_class == meta.null_class == 10
    assert meta2.conditioning == "class" and len(meta2.class_names) == 10
    torch.testing.assert_close(den2.schedule.alphas_cumprod, den.schedule.alphas_cumprod)
    for a, b in zip(_probe(den), _probe(den2)):
        torch.testing.assert_close(a, b)


def test_builtin_teacher_alias(tiny_teacher, monkeypatch, tmp_path):
    monkeypatch.setitem(shipped.BUILTIN_TEACHERS, "builtin:tiny", Path(tiny_teacher))
    den, meta = load_denoiser("builtin:tiny")
    assert den.kind == "unet2d" and meta.null_class == 10
    monkeypatch.setitem(shipped.BUILTIN_TEACHERS, "builtin:gone", tmp_path / "gone")
    with pytest.raises(ModelLoadError, match="builtin:gone"):
        load_denoiser("builtin:gone")


def test_missing_path(tmp_path):
    p = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ModelLoadError) as e:
        load_denoiser(p)
    assert str(p) in str(e.value) and "no such folder" in str(e.value)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_denoiser("nonexistent_model_dir_xyz")


def test_hub_id_offline_is_model_load_error():
    # conftest sets HF_HUB_OFFLINE=1: an owner/name id cannot be fetched, and the error says so
    with pytest.raises(ModelLoadError, match="nobody-xyz/no-such-model"):
        load_denoiser("nobody-xyz/no-such-model")


def test_folder_without_config(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        load_denoiser(tmp_path / "stuff")
    assert "not a diffusers model folder" in str(e.value) and str(tmp_path / "stuff") in str(e.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_denoiser(f)


def test_unsupported_class(tmp_path):
    d = tmp_path / "vq"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "VQModel", "in_channels": 3}))
    with pytest.raises(ModelLoadError) as e:
        load_denoiser(d)
    msg = str(e.value)
    assert "VQModel" in msg and "not supported" in msg and "UNet2DModel" in msg
    # also found through a pipeline folder's unet/ subfolder
    p = tmp_path / "pipe"
    shutil.copytree(d, p / "unet")
    with pytest.raises(ModelLoadError, match="VQModel"):
        load_denoiser(p)


def test_config_without_weights(tiny_teacher, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(Path(tiny_teacher) / "unet" / "config.json", d / "config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_denoiser(d)


def test_missing_scheduler(tiny_teacher, tmp_path):
    d = tmp_path / "bare"
    shutil.copytree(Path(tiny_teacher) / "unet", d)
    with pytest.raises(ModelLoadError, match="scheduler"):
        load_denoiser(d)


@pytest.fixture
def pickle_teacher(tiny_teacher, tmp_path):
    """A copy of the tiny teacher whose unet/ holds only diffusion_pytorch_model.bin."""
    from diffusers import UNet2DModel

    dst = tmp_path / "pickle_teacher"
    shutil.copytree(tiny_teacher, dst)
    shutil.rmtree(dst / "unet")
    UNet2DModel.from_pretrained(Path(tiny_teacher) / "unet").save_pretrained(dst / "unet", safe_serialization=False)
    assert (dst / "unet" / models.WEIGHT_PICKLE).exists()
    assert not list((dst / "unet").glob("*.safetensors"))
    return dst


def test_pickle_weights_refused_unless_allowed(tiny_teacher, pickle_teacher, monkeypatch):
    import diffusers

    calls = []
    real = diffusers.UNet2DModel.from_pretrained.__func__

    def spy(cls, *a, **k):
        calls.append((a, k))
        return real(cls, *a, **k)

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", classmethod(spy))
    for target in (pickle_teacher, pickle_teacher / "unet"):
        with pytest.raises(ModelLoadError) as e:
            load_denoiser(target)
        msg = str(e.value)
        assert "pickle" in msg and "allow_pickle" in msg and str(pickle_teacher / "unet") in msg
    assert calls == [], "the .bin file was opened although it was refused"
    den, meta = load_denoiser(pickle_teacher, allow_pickle=True)
    assert meta.null_class == 10
    ref, _ = load_denoiser(tiny_teacher)
    for a, b in zip(_probe(den), _probe(ref)):
        torch.testing.assert_close(a, b)


def test_model_meta_round_trip(tmp_path):
    m = ModelMeta(prediction_type="epsilon", conditioning="class", class_names=["a", "b"], null_class=2,
                  student_timesteps=[999.0, 499.0], method="dmd2", extra={"k": 1})
    m.save(tmp_path)
    assert ModelMeta.load(tmp_path) == m
    assert ModelMeta.load(tmp_path / "nothing") is None


# -- teacher sampling ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_pipe(tiny_teacher):
    from stepdistill.pipelines.teacher import StepDistillTeacherPipeline

    return StepDistillTeacherPipeline.from_folder(tiny_teacher)


def test_teacher_pipeline_metadata(teacher_pipe):
    assert teacher_pipe.config.class_names == [str(i) for i in range(10)]
    assert teacher_pipe.config.null_class == 10
    assert teacher_pipe.config.prediction_type == "v_prediction"
    den = teacher_pipe.denoiser()
    assert den.null_class == 10 and isinstance(den.schedule, VPSchedule)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm++"])
def test_teacher_sampling(teacher_pipe, sampler):
    kw = dict(class_labels=[0, 3, 7], num_inference_steps=4, guidance_scale=2.0, sampler=sampler, output_type="pt")
    a = teacher_pipe(seed=123, **kw).images
    assert a.shape == (3, 1, 16, 16)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert a.std() > 0.05  # not a constant image
    b = teacher_pipe(seed=123, **kw).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = teacher_pipe(seed=124, **kw).images
    assert (a - c).abs().max() > 1e-3
    g = teacher_pipe(generator=torch.Generator().manual_seed(123), **kw).images
    torch.testing.assert_close(a, g, atol=0, rtol=0)
    assert teacher_pipe.last_latency_s > 0


def test_teacher_sampler_options(teacher_pipe):
    base = dict(num_inference_steps=3, sampler="ddim", seed=0, output_type="pt")
    by_name = teacher_pipe(class_labels=["3", "5"], **base).images
    by_idx = teacher_pipe(class_labels=[3, 5], **base).images
    torch.testing.assert_close(by_name, by_idx)
    assert teacher_pipe(class_labels=2, batch_size=2, **base).images.shape == (2, 1, 16, 16)
    w1 = teacher_pipe(class_labels=[3, 5], guidance_scale=1.0, **{k: v for k, v in base.items()}).images
    assert (w1 - by_idx).abs().max() > 1e-4  # guidance changes the sample
    pil = teacher_pipe(class_labels=[1], num_inference_steps=2, seed=0).images
    assert len(pil) == 1 and pil[0].size == (16, 16) and pil[0].mode == "L"
    with pytest.raises(ValueError, match="unknown class"):
        teacher_pipe(class_labels=["giraffe"], **base)
    with pytest.raises(ValueError, match="unknown sampler"):
        teacher_pipe(class_labels=[1], num_inference_steps=2, sampler="plms", seed=0)


def test_teacher_samplers_agree_with_many_steps(teacher_pipe):
    """All samplers integrate the same probability-flow ODE: with enough steps they agree."""
    kw = dict(class_labels=[0, 4], guidance_scale=1.5, seed=7, output_type="pt")
    ddim = teacher_pipe(sampler="ddim", num_inference_steps=40, **kw).images
    dpm = teacher_pipe(sampler="dpm++", num_inference_steps=20, **kw).images
    euler = teacher_pipe(sampler="euler", num_inference_steps=40, **kw).images
    few = teacher_pipe(sampler="ddim", num_inference_steps=2, **kw).images
    d_dpm = (ddim - dpm).abs().mean()
    d_eul = (ddim - euler).abs().mean()
    # DDIM is exactly Euler on x / alpha in sigma = sqrt(1 - ac) / sqrt(ac): identical up to round-off
    assert d_eul < 1e-3, float(d_eul)
    assert d_dpm < 0.05, float(d_dpm)
    assert (ddim - few).abs().mean() > d_dpm  # and the check is not trivially satisfied


# -- other families saved as diffusers folders (no stepdistill.json: metadata is inferred) --------
def _save(folder: Path, sub: str, model, scheduler):
    model.save_pretrained(folder / sub)
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def test_load_dit_folder_infers_null_class(tmp_path):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5)
    root = _save(tmp_path / "dit", "transformer", m, DDPMScheduler(beta_schedule="linear"))
    den, meta = load_denoiser(root)
    assert den.kind == "dit" and meta.conditioning == "class"
    # like diffusers' DiTPipeline: labels 0..4 are classes, label 5 (== num_embeds_ada_norm) is the null class
    assert meta.class_names == [str(i) for i in range(5)] and meta.null_class == 5 == den.null_class
    assert meta.prediction_type == "epsilon"
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        out = den(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 4]), guidance_scale=2.0)
    assert out.shape == x.shape


def test_load_pixart_folder_is_text_conditioned(tmp_path):
    from diffusers import DDPMScheduler, PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                 num_layers=1, cross_attention_dim=16, caption_channels=12, sample_size=8,
                                 patch_size=2, use_additional_conditions=False)
    root = _save(tmp_path / "pixart", "transformer", m, DDPMScheduler(beta_schedule="scaled_linear"))
    den, meta = load_denoiser(root)
    assert den.kind == "pixart"
    assert meta.conditioning == "text" and meta.null_class is None and meta.class_names == []


def test_load_sd3_folder_is_flow_and_text(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from stepdistill.schedules import FlowMatchSchedule

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=1,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                              caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=8)
    root = _save(tmp_path / "sd3", "transformer", m, FlowMatchEulerDiscreteScheduler(shift=3.0))
    den, meta = load_denoiser(root)
    assert den.kind == "sd3"
    assert isinstance(den.schedule, FlowMatchSchedule) and den.schedule.shift == 3.0
    assert meta.prediction_type == "flow_prediction" and meta.conditioning == "text"
    cond = {"emb": torch.randn(1, 4, 12), "pooled": torch.randn(1, 6)}
    with torch.no_grad():
        assert den(torch.randn(1, 2, 8, 8), 500.0, cond).shape == (1, 2, 8, 8)


def test_one_class_label_parser_for_every_entry_point():
    """conditioning.class_index: names, indices and index strings; the pipelines, the CLI, the demo and PSO
    all call it (each wraps its ValueError), so they accept and refuse the same labels."""
    from stepdistill.conditioning import class_index
    from stepdistill.trainers.pso_data import resolve_classes

    names = ["cat", "dog", "owl"]
    assert [class_index(c, names) for c in ("dog", 2, "0", " owl ")] == [1, 2, 0, 2]
    assert class_index(7, []) == 7        # a model that lists no names: any index
    for bad, msg in [("unicorn", "unknown class 'unicorn'; known: cat, dog, owl"), (3, "out of range 0..2"),
                     ("-1", "out of range 0..2")]:
        with pytest.raises(ValueError, match=msg):
            class_index(bad, names)
    assert resolve_classes(["owl", "0", 0], names) == [0, 2]
    with pytest.raises(ValueError, match=r"pso\.target_classes: unknown class 'emu'"):
        resolve_classes(["emu"], names)
