"""Transformer students in every pipeline: Phased DMD experts of a tiny SD3 teacher (``transformer/`` +
``expert_1/``) loads in PhasedDMDPipeline and samples from prompt embeddings; class-conditional DiT
students (plain, phased, multi-student) and a DiT teacher go through eval's load_any / generate and the
bench, which read the pipeline's network rather than ``pipe.unet``."""
from __future__ import annotations

import json

import torch

from stepdistill.denoiser import Denoiser
from stepdistill.models import ModelMeta, save_model_folder
from stepdistill.pipelines.phased import PhasedDMDPipeline, phased_sample
from test_flow_teachers import TEXT, _bank, _cfg, _latents, _teacher

torch.set_num_threads(1)


def test_sd3_phased_student_folder_loads_and_samples_from_prompt_embeddings(tmp_path):
    """Two SD3 experts trained by Phased DMD, saved as a PhasedDMDPipeline folder (transformer/ + expert_1/).
    (The folder is written with save_pretrained: the text-student export path is another work item.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from stepdistill.trainers.core import Trainer
    from stepdistill.trainers.distill import build_method

    bank = _bank()
    cfg = _cfg(tmp_path, method="phased_dmd", **{"phased.boundaries": "[999,500,0]"})
    obj, data, _ = build_method(cfg, teacher=_teacher(), meta=TEXT, data=_latents(), text_bank=bank)
    tr = Trainer(obj, cfg, data=data)
    tr.train()
    folder = tmp_path / "student"
    PhasedDMDPipeline(unet=None, transformer=tr.ema["expert_0"], expert_1=tr.ema["expert_1"],
                      scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                      student_timesteps=[999.0, 500.0], prediction_type="flow_prediction",
                      phase_boundaries=[999.0, 500.0, 0.0]).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PhasedDMDPipeline" and index["unet"] == [None, None]
    assert index["transformer"][1] == index["expert_1"][1] == "SD3Transformer2DModel"

    pipe = PhasedDMDPipeline.from_pretrained(folder)
    assert pipe.unet is None and pipe.network is pipe.transformer and len(pipe.experts()) == 2
    emb, pooled = bank.emb[[0, 3, 5]], bank.pooled[[0, 3, 5]]
    out = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, seed=7, output_type="pt").images
    assert out.shape == (3, 2, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert pipe.last_experts == ["expert_0", "expert_1"]

    # the same chain by hand from the stock diffusers networks (exact)
    nets = [SD3Transformer2DModel.from_pretrained(folder, subfolder=s).eval() for s in ("transformer", "expert_1")]
    sched = _teacher().schedule
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = phased_sample([Denoiser(n, sched, "flow_prediction") for n in nets], [999.0, 500.0], [999.0, 500.0, 0.0],
                        {"emb": emb, "pooled": pooled}, noise)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])  # the prompts condition the samples


# -- class-conditional DiT: students of every pipeline and a teacher through eval ---------------------------
CLASSES = ["a", "b", "c"]


def _dit(seed: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=len(CLASSES),
                                 norm_num_groups=1).eval()


def _dit_folders(tmp_path):
    """A DiT teacher folder and student folders (plain 2-step, phased, multi-student) exported by our exporters."""
    from diffusers import DDPMScheduler

    from stepdistill.config import DistillConfig, load_config
    from stepdistill.trainers.export import export_student
    from stepdistill.trainers.multi_student import export_multi_student
    from stepdistill.trainers.phased_dmd import export_phased

    teacher = tmp_path / "teacher"
    meta = ModelMeta(prediction_type="epsilon", conditioning="class", class_names=CLASSES, null_class=len(CLASSES))
    save_model_folder(teacher, _dit(0), DDPMScheduler(num_train_timesteps=1000), meta, "StepDistillTeacherPipeline")
    common = [f"dmd.teacher={teacher}", "dmd.student_timesteps=[999,499]"]
    cfg = load_config(DistillConfig, None, common)
    phased = load_config(DistillConfig, None, common + ["method=phased_dmd", "phased.boundaries=[999,499,0]",
                                                        "train.max_steps=2"])
    msd = load_config(DistillConfig, None, common + ["method=msd", "msd.num_students=2", "train.max_steps=2"])
    out = {"teacher": teacher}
    out["plain"] = export_student(_dit(1), cfg, meta, tmp_path / "plain")
    out["phased"] = export_phased([_dit(2), _dit(3)], phased, meta, tmp_path / "phased")
    experts_meta = json.loads((out["phased"] / "stepdistill.json").read_text())["extra"]["experts"]
    assert [e["subfolder"] for e in experts_meta] == ["transformer", "expert_1"]
    out["msd"] = export_multi_student([_dit(4), _dit(5)], msd, meta, tmp_path / "msd", [[0, 1], [2]])
    return out


def test_dit_students_and_teacher_through_eval_and_bench(tmp_path):
    from stepdistill.eval.bench import benchmark
    from stepdistill.eval.generate import load_any

    folders = _dit_folders(tmp_path)
    t = load_any(folders["teacher"], device="cpu")
    assert t.kind == "teacher" and t.pipe.unet is None and t.network is t.pipe.transformer
    assert t.image_shape == (1, 8, 8) and t.num_params() == sum(p.numel() for p in _dit(0).parameters())
    x_t = t.generate(n=4, steps=2, guidance_scale=2.0, seed=0, progress=False)
    assert x_t.shape == (4, 1, 8, 8) and torch.isfinite(x_t).all()

    labels = torch.tensor([0, 1, 2, 2])
    from stepdistill.pipelines.multi_student import MultiStudentPipeline
    from stepdistill.pipelines.student import StepDistillPipeline

    for name, steps, cls in (("plain", 2, StepDistillPipeline), ("phased", 2, PhasedDMDPipeline),
                             ("msd", 1, MultiStudentPipeline)):
        s = load_any(folders[name], device="cpu")
        assert s.kind == "student" and s.pipe.unet is None and s.network is s.pipe.transformer, name
        assert type(s.pipe) is cls, name  # the folder's own pipeline: its one sampling route
        x = s.generate(labels=labels, steps=steps, seed=0, progress=False)
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all(), name
        again = s.generate(labels=labels, steps=steps, seed=0, progress=False)
        assert torch.equal(x, again), name
        if name == "msd":
            assert s.pipe.last_students == ["student_0", "student_0", "student_1", "student_1"]
            img = s.pipe(class_labels=["c"], seed=0, output_type="pt").images
            assert img.shape == (1, 1, 8, 8)

    res = benchmark(str(folders["teacher"]), str(folders["phased"]), batch_sizes=[2], teacher_steps=2, repeats=1,
                    warmup=0, device="cpu", progress=False)
    assert res["config"]["dtype"] == "float32" and res["config"]["image_shape"] == [1, 8, 8]
    row = res["results"][0]
    assert [r["steps"] for r in row["student"]] == [2] and row["bare_forward"]["latency_s"] > 0


def test_dit_student_card_loads_the_transformer_with_stock_diffusers(tmp_path, monkeypatch):
    """The card of a DiT student names DiTTransformer2DModel / transformer/ and its stock loop gives the pipeline's
    images (the card used to hard-code UNet2DModel / unet)."""
    import re

    from stepdistill.pipelines.student import StepDistillPipeline

    folder = _dit_folders(tmp_path)["plain"]
    card = (folder / "README.md").read_text()
    assert 'DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")' in card and "UNet2DModel" not in card
    snippet = re.findall(r"```python\n(.*?)```", card, flags=re.S)[1]
    monkeypatch.chdir(folder.parent)
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - our own generated card
    ref = StepDistillPipeline.from_pretrained(folder)(class_labels=[0] * 4, seed=0, output_type="pt").images
    torch.testing.assert_close(ns["images"], ref, atol=1e-4, rtol=1e-4)
