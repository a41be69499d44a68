"""Memory options: gradient checkpointing (same gradients), bf16 teacher (and bf16 LoRA base), offloaded teacher
(code path on CPU), and the full-vs-LoRA memory measurement in fresh subprocesses."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.distill import build_method

torch.set_num_threads(1)


def _cfg(teacher, out, **extra):
    return load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, **{"train.max_steps": 1, **extra}))


def _ctx(data, seed=5):
    return Ctx(torch.Generator().manual_seed(seed), 0, 1, 4, torch.device("cpu"), 0, data)


def _gen_grads(obj, data):
    gen = obj.players["generator"].module
    obj.players["critic"].module.requires_grad_(False)
    gen.zero_grad(set_to_none=True)
    loss, _ = obj.generator_loss(_ctx(data))
    loss.backward()
    return [p.grad.clone() for p in gen.parameters()]


def test_gradient_checkpointing_on_trainable_players_only_same_gradients(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.gan": "true"})
    obj, data, _ = build_method(cfg)
    ref = _gen_grads(obj, data)
    ck_cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.gan": "true", "train.gradient_checkpointing": "true"})
    obj2, data2, _ = build_method(ck_cfg)
    Trainer(obj2, ck_cfg, data=data2)  # the core switches it on
    assert obj2.student.backbone.is_gradient_checkpointing and obj2.critic.backbone.is_gradient_checkpointing
    assert not obj2.teacher.backbone.is_gradient_checkpointing  # frozen: nothing to recompute
    for a, b in zip(ref, _gen_grads(obj2, data2)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_bf16_teacher(tiny_teacher, tmp_path):
    from stepdistill.models import load_denoiser

    cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.teacher_dtype": "bfloat16"})
    obj, data, _ = build_method(cfg)
    assert {p.dtype for p in obj.teacher.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in obj.student.backbone.parameters()} == {torch.float32}
    assert {p.dtype for p in obj.critic.backbone.parameters()} == {torch.float32}
    ref, _ = load_denoiser(tiny_teacher)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([900.0, 500.0, 50.0]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        out, want = obj.teacher(x, t, y, guidance_scale=2.0), ref(x, t, y, guidance_scale=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=0.1, rtol=0.05)
    assert not torch.equal(out, want)
    # the student starts from the float32 teacher
    with torch.no_grad():
        torch.testing.assert_close(obj.student(x, t, y), ref(x, t, y))
    assert Trainer(obj, cfg, data=data).train()["last"]["dm_loss"] > 0


def test_lora_with_bf16_base(tiny_teacher, tmp_path):
    pytest.importorskip("peft")
    cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.teacher_dtype": "bfloat16", "dmd.lora_rank": 4})
    obj, data, _ = build_method(cfg)
    view = obj.student.backbone
    shared = view.shared
    adapter = {id(p) for a in shared.adapters for p in shared.adapter_params(a).values()}
    assert {p.dtype for p in shared.model.parameters() if id(p) not in adapter} == {torch.bfloat16}
    assert {p.dtype for p in view.parameters()} == {torch.float32}
    tr = Trainer(obj, cfg, data=data)
    assert {p.dtype for p in tr.ema["generator"].parameters()} == {torch.float32}
    assert tr.train()["last"]["dm_loss"] > 0
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([900.0, 300.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out = obj.student(x, t, y)
        merged = view.merged()
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        m_out = merged(x, obj.student.schedule.model_timestep(t), class_labels=y).sample
        raw = obj.student.raw(x, t, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(m_out, raw, atol=0.1, rtol=0.05)


def test_offloaded_teacher_stays_on_cpu_and_moves_for_its_forward(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path, **{"dmd.offload_teacher": "true"})
    obj, data, _ = build_method(cfg)
    assert obj.teacher.offload and not obj.student.offload
    obj.to(torch.device("meta"))  # what the trainer does with the accelerator device: the teacher ignores it
    assert {p.device.type for p in obj.teacher.parameters()} == {"cpu"}
    moves = []
    backbone = obj.teacher.backbone
    orig = backbone.to

    def spy(*a, **k):
        moves.append(str(a[0]) if a else str(k))
        return orig(*a, **k)

    backbone.to = spy
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        obj.teacher(x, torch.tensor([500.0, 100.0]), torch.tensor([0, 1]), guidance_scale=2.0)
    assert moves == ["cpu", "cpu"]  # to the input's device for the forward, then back to the CPU
    del backbone.to
    obj2, data2, _ = build_method(cfg)
    assert Trainer(obj2, cfg, data=data2).train()["steps"] == 1


def test_memory_option_validation(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="dmd.teacher_dtype"):
        _cfg(tiny_teacher, tmp_path, **{"dmd.teacher_dtype": "float16"})


def test_train_memory_full_vs_lora(tiny_teacher, tmp_path):
    pytest.importorskip("peft")
    from stepdistill.profiling.memory import MODES, measure_in_process, train_memory

    ov = tiny_distill_overrides(tiny_teacher, tmp_path, **{"dmd.critic_updates": 1, "train.batch_size": 2})
    # the accounting in this process (fast); the peak RSS comparison needs fresh processes (below)
    full, lora = (measure_in_process(None, ov + MODES[m], steps=1) for m in ("full", "lora"))
    assert full["lora_rank"] == 0 and lora["lora_rank"] == 8
    # parameters: teacher + student + critic + EMA (4 copies) vs one base + adapters
    assert lora["param_mb"] < 0.6 * full["param_mb"]
    assert lora["trainable_mb"] < 0.5 * full["trainable_mb"]
    assert lora["optimizer_state_mb"] == pytest.approx(2 * lora["trainable_mb"], rel=0.01)
    assert full["optimizer_state_mb"] == pytest.approx(2 * full["trainable_mb"], rel=0.01)
    # one mode in a fresh subprocess: its own ru_maxrss peak
    r = train_memory(ov, steps=1, mode="lora")
    assert r["mode"] == "lora" and r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0 and r["threads"] == 1
    assert r["param_mb"] == lora["param_mb"] and r["steps"] == 1
    with pytest.raises(ValueError, match="unknown mode"):
        train_memory(ov, mode="nope")
