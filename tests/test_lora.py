"""LoRA student and critic on one shared frozen base (= the teacher): only adapters train, one copy of the base,
merged and adapter-file exports equal adapter inference, resume and gradient checkpointing stay exact."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.distill import build_method, distill

pytest.importorskip("peft")
torch.set_num_threads(1)

LORA = {"dmd.lora_rank": 4, "train.max_steps": 2, "train.checkpoint_every": 1}


def _cfg(teacher, out, **extra):
    return load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, **{**LORA, **extra}))


def _inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([900.0, 500.0, 30.0][:n]), torch.tensor([1, 4, 7][:n])


def _base_params(obj):
    shared = obj.student.backbone.shared
    adapter = {id(p) for a in shared.adapters for p in shared.adapter_params(a).values()}
    return {n: p for n, p in shared.model.named_parameters() if id(p) not in adapter}


def _perturb_adapters(view, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in view.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_only_adapters_train_base_untouched_teacher_is_base(tiny_teacher, tmp_path):
    from stepdistill.models import load_denoiser

    cfg = _cfg(tiny_teacher, tmp_path)
    obj, data, _ = build_method(cfg)
    gen, critic = obj.players["generator"].module, obj.players["critic"].module
    assert gen.is_lora_view and critic["fake"].is_lora_view
    assert gen.base is critic["fake"].base is obj.teacher.backbone.base  # one module, three roles
    assert {n for n, _ in gen.named_parameters()} == {n for n, _ in critic["fake"].named_parameters()}
    assert all(":lora_" in n for n, _ in gen.named_parameters())
    base0 = {n: p.detach().clone() for n, p in _base_params(obj).items()}
    gen0 = [p.detach().clone() for p in gen.parameters()]
    fake0 = [p.detach().clone() for p in critic["fake"].parameters()]
    tr = Trainer(obj, cfg, data=data)
    # the optimizers hold exactly the adapter (+ GAN head) parameters
    assert {id(p) for g in tr.opts["generator"].param_groups for p in g["params"]} == {id(p) for p in gen.parameters()}
    assert {id(p) for g in tr.opts["critic"].param_groups for p in g["params"]} == {id(p) for p in critic.parameters()}
    tr.train()
    base = _base_params(obj)
    assert base0.keys() == base.keys() and all(torch.equal(base0[n], base[n]) for n in base0)  # bit-identical
    assert all(not p.requires_grad for p in base.values())
    assert any(not torch.equal(a, b) for a, b in zip(gen0, gen.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake0, critic["fake"].parameters()))
    # teacher = the base with adapters disabled = the original teacher, bit for bit
    ref, _ = load_denoiser(tiny_teacher)
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(obj.teacher(x, t, y, guidance_scale=2.0), ref(x, t, y, guidance_scale=2.0))
        assert not torch.equal(obj.student(x, t, y), ref(x, t, y))  # the student adapter is active in its view


def test_one_base_in_memory_vs_three_copies(tiny_teacher, tmp_path):
    from stepdistill.lora import param_storage_mb
    from stepdistill.models import count_params

    full, _, _ = build_method(_cfg(tiny_teacher, tmp_path / "full", **{"dmd.lora_rank": 0}))
    lora, _, _ = build_method(_cfg(tiny_teacher, tmp_path / "lora"))
    base_mb = count_params(full.teacher.backbone) * 4 / 2**20

    def storages(obj):
        mods = [obj.teacher, obj.student, obj.critic]
        ptrs = set()
        for m in mods:
            for mod in m.modules():
                src = mod.base.parameters() if getattr(mod, "is_lora_view", False) is True else mod.parameters(False)
                ptrs.update(p.untyped_storage().data_ptr() for p in src)
        return ptrs

    n_base = count_params(full.teacher.backbone)
    n_params = len(list(full.teacher.backbone.parameters()))
    assert len(storages(full)) == 3 * n_params
    adapter_params = sum(p.numel() for p in lora.student.parameters())
    assert len(storages(lora)) == n_params + 2 * len(list(lora.student.parameters()))
    assert param_storage_mb(full.teacher, full.student, full.critic) == pytest.approx(3 * base_mb, rel=1e-6)
    mb = param_storage_mb(lora.teacher, lora.student, lora.critic)
    assert mb == pytest.approx(base_mb + 2 * adapter_params * 4 / 2**20, rel=1e-6)
    assert adapter_params < 0.25 * n_base


def test_merged_export_equals_adapter_inference(tiny_teacher, tmp_path):
    from diffusers import UNet2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    obj, _, _ = build_method(_cfg(tiny_teacher, tmp_path))
    view = obj.student.backbone
    _perturb_adapters(view)
    merged = view.merged()
    assert type(merged) is UNet2DModel and not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert merged.state_dict().keys() == UNet2DModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict().keys()
    x, t, y = _inputs()
    with torch.no_grad():
        a = view(x, t, class_labels=y).sample
        b = merged(x, t, class_labels=y).sample
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        merged.save_pretrained(tmp_path / "merged")
        c = UNet2DModel.from_pretrained(tmp_path / "merged")(x, t, class_labels=y).sample
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, obj.teacher.backbone(x, t, class_labels=y).sample)  # the adapter matters
    # the shared base still has its adapters and is unchanged by merging a copy
    assert any(isinstance(m, BaseTunerLayer) for m in view.base.modules())


def test_adapter_file_round_trip(tiny_teacher, tmp_path):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from stepdistill.lora import load_adapter

    obj, _, _ = build_method(_cfg(tiny_teacher, tmp_path))
    view = obj.student.backbone
    _perturb_adapters(view, seed=1)
    folder = view.save_adapter(tmp_path / "lora")
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in keys) and not any("student" in k for k in keys)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    fresh = load_adapter(UNet2DModel.from_pretrained(tiny_teacher, subfolder="unet").eval(), folder)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, class_labels=y).sample, view(x, t, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)


def test_distill_with_lora_exports_plain_student_and_cli_export_matches(tiny_teacher, tmp_path):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from stepdistill.frontends.cli import main
    from stepdistill.pipelines.student import StepDistillPipeline

    cfg = _cfg(tiny_teacher, tmp_path)
    folder = distill(cfg)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (folder / "lora" / "adapter_model.safetensors").exists()
    assert json.loads((folder / "stepdistill.json").read_text())["extra"]["lora"]["rank"] == 4
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    assert not any("lora" in k or "base_layer" in k for k in unet.state_dict())
    pipe = StepDistillPipeline.from_pretrained(folder)
    assert pipe(class_labels=[1, 2], seed=0, output_type="pt").images.shape == (2, 1, 16, 16)
    # export from the checkpoint (EMA adapter in models.safetensors) gives the same merged weights
    overrides = tiny_distill_overrides(tiny_teacher, tmp_path, **LORA)
    assert main(["export", "--config", "", *overrides, "--out", str(tmp_path / "again")]) == 0
    w1 = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_lora_resume_equals_uninterrupted(tiny_teacher, tmp_path):
    def run(out, steps, resume=False):
        cfg = _cfg(tiny_teacher, out, **{"train.max_steps": steps})
        obj, data, _ = build_method(cfg)
        tr = Trainer(obj, cfg, data=data)
        tr.train(resume=resume)
        return load_file(out / "checkpoints" / f"step_{steps:06d}" / "models.safetensors")

    from safetensors.torch import load_file

    full = run(tmp_path / "full", 2)
    run(tmp_path / "part", 1)
    resumed = run(tmp_path / "part", 2, resume=True)
    assert full.keys() == resumed.keys() and any(k.startswith("ema.generator.lora.") for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert sum(v.numel() for k, v in full.items() if k.startswith("player.generator.")) < 100_000  # adapters only


def test_gradient_checkpointing_recomputes_with_the_forward_adapter(tiny_teacher, tmp_path):
    """The generator loss runs student, critic and teacher on one base; checkpointed blocks recompute in the
    backward pass, after other adapters ran: the recomputation must re-activate the student adapter."""
    cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.gan": "true"})
    obj, data, _ = build_method(cfg)
    gen = obj.players["generator"].module
    _perturb_adapters(obj.critic.backbone, seed=2)  # critic != student, so a wrong adapter changes the gradient
    obj.players["critic"].module.requires_grad_(False)

    def grads():
        gen.zero_grad(set_to_none=True)
        loss, _ = obj.generator_loss(Ctx(torch.Generator().manual_seed(5), 0, 1, 4, torch.device("cpu"), 0, data))
        loss.backward()
        return [p.grad.clone() for p in gen.parameters()]

    ref = grads()
    gen.shared.model.enable_gradient_checkpointing()  # diffusers' default: recomputes with whatever adapter is active
    try:  # torch notices the different recomputation (fewer saved tensors) or the gradient is wrong
        naive = grads()
        naive_wrong = any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(ref, naive))
    except torch.utils.checkpoint.CheckpointError:
        naive_wrong = True
    assert naive_wrong
    from stepdistill.lora import enable_gradient_checkpointing

    assert enable_gradient_checkpointing(gen) == 1
    ckpt = grads()
    for a, b in zip(ref, ckpt):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_phased_dmd_experts_and_critics_are_adapters_on_one_base(tiny_teacher, tmp_path):
    from stepdistill.lora import param_storage_mb
    from stepdistill.models import count_params

    cfg = _cfg(tiny_teacher, tmp_path, method="phased_dmd", **{"phased.boundaries": "[999,500,0]"})
    obj, data, _ = build_method(cfg)
    views = [obj.experts[k].backbone for k in range(2)] + [obj.critics[k].backbone for k in range(2)]
    assert all(v.is_lora_view and v.base is obj.teacher.backbone.base for v in views)
    assert len({v.adapter for v in views}) == 4
    base_mb = count_params(obj.teacher.backbone.base) * 4 / 2**20  # includes the 4 adapters
    assert param_storage_mb(obj.teacher, *obj.experts, *obj.critics) == pytest.approx(base_mb, rel=1e-6)
    base0 = {n: p.detach().clone() for n, p in obj.teacher.backbone.base.named_parameters() if "lora_" not in n}
    Trainer(obj, cfg, data=data).train()
    after = dict(obj.teacher.backbone.base.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in base0.items())
    # distill() exports merged (plain UNet2DModel) experts that the phased pipeline loads
    from stepdistill.pipelines.phased import PhasedDMDPipeline

    folder = distill(_cfg(tiny_teacher, tmp_path / "export", method="phased_dmd",
                          **{"phased.boundaries": "[999,500,0]", "train.checkpoint_every": 2}))
    pipe = PhasedDMDPipeline.from_pretrained(folder)
    assert type(pipe.expert_1).__name__ == "UNet2DModel"
    assert pipe(class_labels=[1, 2], seed=0, output_type="pt").images.shape == (2, 1, 16, 16)


def test_lora_config_validation(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="dmd.offload_teacher"):
        _cfg(tiny_teacher, tmp_path, **{"dmd.offload_teacher": "true"})
    with pytest.raises(ConfigError, match="dmd.lora_rank"):
        _cfg(tiny_teacher, tmp_path, **{"dmd.lora_rank": -1})
    with pytest.raises(ValueError, match="match no"):
        build_method(_cfg(tiny_teacher, tmp_path, **{"dmd.lora_targets": "[nonexistent]"}))


def test_lora_teacher_regression_pairs_are_the_plain_teachers(tiny_teacher, tmp_path):
    """With dmd.lora_rank > 0 the teacher is the adapters-off view, which owns no parameters: DMD's ODE pairs take
    its device and their cache key from the base without its adapters, so a LoRA run and a full run of the same
    teacher share (and reuse) one set of pairs, and another teacher never matches it."""
    from stepdistill.models import load_denoiser
    from stepdistill.pairs import module_device, teacher_ode_pairs, weights_digest

    extra = {"dmd.regression_weight": 0.25, "dmd.regression_pairs": 8, "dmd.regression_steps": 2}
    obj, _, _ = build_method(_cfg(tiny_teacher, tmp_path / "lora", **extra))
    plain, _ = load_denoiser(tiny_teacher)
    assert list(obj.teacher.parameters()) == [] and module_device(obj.teacher) == torch.device("cpu")
    assert weights_digest(obj.teacher.backbone) == weights_digest(plain.backbone)
    with torch.no_grad():
        next(plain.backbone.parameters()).add_(1.0)
    assert weights_digest(obj.teacher.backbone) != weights_digest(plain.backbone)
    full, _, _ = build_method(load_config(DistillConfig, None, tiny_distill_overrides(
        tiny_teacher, tmp_path / "full", **{"train.max_steps": 2, **extra})))
    for a, b in zip(obj.pairs, full.pairs):
        assert torch.equal(a, b)
