"""Flow-matching DiT teachers (SD3 / Flux, tiny random weights) distilled with DMD2 and Phased DMD through the
Denoiser adapter and a text-embedding bank; exported students load and sample with stock diffusers."""
from __future__ import annotations

import json

import pytest
import torch

from stepdistill.conditioning import TextEmbeddingBank
from stepdistill.config import DistillConfig, load_config
from stepdistill.data import ArrayDataset
from stepdistill.denoiser import Denoiser
from stepdistill.models import ModelMeta
from stepdistill.schedules import FlowMatchSchedule
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.distill import build_method, distill

torch.set_num_threads(1)

N, L, D_TXT, P = 6, 5, 12, 6  # prompts, tokens, text width, pooled width


def _jitter(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def _sd3():
    from diffusers import SD3Transformer2DModel

    return _jitter(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=D_TXT,
                                         caption_projection_dim=16, pooled_projection_dim=P, pos_embed_max_size=8))


def _flux():
    from diffusers import FluxTransformer2DModel

    return _jitter(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=D_TXT,
                                          pooled_projection_dim=P, guidance_embeds=False, axes_dims_rope=(2, 2, 4)))


def _bank(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddingBank(torch.randn(N, L, D_TXT, generator=g), torch.randn(N, P, generator=g),
                             null_emb=torch.randn(1, L, D_TXT, generator=g) * 0.1, null_pooled=torch.zeros(1, P),
                             prompts=[f"prompt {i}" for i in range(N)])


def _latents(n=16, seed=1):
    """A bank-aligned real set: (latent, prompt index) pairs."""
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 2, 8, 8, generator=g).clamp(-1, 1), torch.arange(n) % N, [])


def _cfg(out, **extra):
    base = {"output_dir": str(out), "train.batch_size": 4, "train.max_steps": 2, "dmd.critic_updates": 1,
            "dmd.gan": "false", "train.sample_every": 2, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.threads": 1, "train.cpu": "true", "dmd.student_timesteps": "[999,499]",
            "dmd.student_lr": 1e-4, "dmd.critic_lr": 1e-4}
    base.update(extra)
    return load_config(DistillConfig, None, [f"{k}={v}" for k, v in base.items()])


TEXT = ModelMeta(prediction_type="flow_prediction", conditioning="text", class_names=[])


def _teacher(net=None):
    return Denoiser(net if net is not None else _sd3(), FlowMatchSchedule(1000, 3.0), "flow_prediction")


# -- the bank -------------------------------------------------------------------------------------
def test_text_bank_draws_by_index_with_ctx():
    bank = _bank()
    ctx = Ctx(torch.Generator().manual_seed(3), 0, 1, 8, torch.device("cpu"), 0)
    c = bank(ctx)
    idx = torch.randint(0, N, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(c["emb"], bank.emb[idx]) and torch.equal(c["pooled"], bank.pooled[idx])
    # two ranks of a world of 2 draw the two halves of the same global batch
    halves = [bank(Ctx(torch.Generator().manual_seed(3), r, 2, 8, torch.device("cpu"), 0))["emb"] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), c["emb"])
    grid = bank.grid(20, "cpu")
    assert torch.equal(grid["emb"][:N], bank.emb) and torch.equal(grid["emb"][N + 1], bank.emb[1])
    assert torch.equal(bank.null_cond["emb"], bank.null_emb) and bank.null_cond["pooled"].shape == (1, P)
    assert torch.equal(bank.real_cond(torch.tensor([2, 5]))["emb"], bank.emb[[2, 5]])
    with pytest.raises(ValueError, match="bank index"):
        bank.real_cond(torch.tensor([N]))
    plain = TextEmbeddingBank(bank.emb)  # no pooled: UNet2DCondition / PixArt conditions are (B, L, D) tensors
    assert torch.is_tensor(plain.grid(3, "cpu")) and plain.null_cond.shape == (1, L, D_TXT)
    with pytest.raises(ValueError, match="N, L, D"):
        TextEmbeddingBank(torch.zeros(3, 4))


def test_text_teacher_needs_a_bank_and_gets_its_null_embedding(tmp_path):
    with pytest.raises(ValueError, match="text_bank"):
        build_method(_cfg(tmp_path), teacher=_teacher(), meta=TEXT, data=_latents())
    teacher, bank = _teacher(), _bank()
    obj, _, _ = build_method(_cfg(tmp_path), teacher=teacher, meta=TEXT, data=_latents(), text_bank=bank)
    assert obj.conds is bank and obj.teacher.null_cond is not None
    assert torch.equal(obj.teacher.null_cond["emb"], bank.null_emb)
    # the teacher's CFG uses the bank's empty-prompt embedding as the unconditional input
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([700.0, 300.0])
    c = bank.index(torch.tensor([1, 4]))
    with torch.no_grad():
        guided = obj.teacher(x, t, c, guidance_scale=3.0, output="raw")
        u = obj.teacher(x, t, {k: v.expand(2, *v.shape[1:]) for k, v in bank.null_cond.items()}, output="raw")
        cc = obj.teacher(x, t, c, output="raw")
    torch.testing.assert_close(guided, u + 3.0 * (cc - u), atol=1e-5, rtol=1e-5)


# -- SD3: DMD2 train -> export -> stock diffusers ---------------------------------------------------
def test_sd3_dmd2_trains_exports_and_samples_with_stock_flow_scheduler(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from stepdistill.pipelines.student import StepDistillPipeline

    bank = _bank()
    teacher = _teacher()
    w0 = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    folder = distill(_cfg(tmp_path), teacher=teacher, meta=TEXT, data=_latents(), text_bank=bank)
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["dm_loss"] > 0 for r in rows)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and "unet" not in index
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert all(torch.equal(v, w0[k]) for k, v in teacher.backbone.state_dict().items())  # teacher frozen

    net = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert sched.config.shift == 3.0 and sched.config.stochastic_sampling
    assert any(not torch.equal(v, w0[k]) for k, v in net.state_dict().items())  # trained (EMA of the student)

    pipe = StepDistillPipeline.from_pretrained(folder)
    assert pipe.unet is None and pipe.network is pipe.transformer
    c = bank.index(torch.tensor([0, 3, 5]))
    out = pipe(prompt_embeds=c["emb"], pooled_prompt_embeds=c["pooled"], seed=7, output_type="pt").images

    # stock diffusers only: the transformer + FlowMatchEulerDiscreteScheduler (stochastic sampling = the student's
    # re-noising chain), timesteps = the student's (pre-shift) times / 1000 as sigmas
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 8, 8, generator=g)
    sched.set_timesteps(sigmas=[t / 1000 for t in index["student_timesteps"]])
    with torch.no_grad():
        for t in sched.timesteps:
            u = net(hidden_states=x, encoder_hidden_states=c["emb"], pooled_projections=c["pooled"],
                    timestep=t.expand(3)).sample
            x = sched.step(u, t, x, generator=g).prev_sample
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    one = pipe(prompt_embeds=c["emb"], pooled_prompt_embeds=c["pooled"], num_inference_steps=1, seed=7,
               output_type="pt").images
    assert not torch.equal(one, out)


def test_sd3_dmd2_with_gan_on_a_bank_aligned_real_set(tmp_path):
    obj, data, _ = build_method(_cfg(tmp_path, **{"dmd.gan": "true"}), teacher=_teacher(), meta=TEXT, data=_latents(),
                             text_bank=_bank())
    tr = Trainer(obj, obj_cfg := _cfg(tmp_path, **{"dmd.gan": "true", "train.max_steps": 1}), data=data)
    assert obj_cfg.dmd.gan
    result = tr.train()
    last = result["last"]
    assert "gan_d_loss" in last and "gan_g_loss" in last and last["gan_d_loss"] > 0


def test_sd3_phased_dmd_trains_with_text_bank(tmp_path):
    cfg = _cfg(tmp_path, method="phased_dmd", **{"phased.boundaries": "[999,500,0]"})
    obj, data, _ = build_method(cfg, teacher=_teacher(), meta=TEXT, data=_latents(), text_bank=_bank())
    tr = Trainer(obj, cfg, data=data)
    before = {k: v.clone() for k, v in obj.players["expert_0"].module.state_dict().items()}
    result = tr.train()
    assert result["steps"] == 2 and result["last"]["phase"] == 1.0
    after = obj.players["expert_0"].module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    x = obj.sample(tr.ema_modules(), 4, torch.device("cpu"))
    assert x.shape == (4, 2, 8, 8) and torch.isfinite(x).all()
    from stepdistill.trainers.guards import sample_guard_stats  # the guards' fallback for objectives without hook

    stats = sample_guard_stats(obj, tr.ema_modules(), n=12)
    assert stats["diversity"] > 0 and 0 <= stats["saturation"] <= 1
    with pytest.raises(ValueError, match="gan=false"):
        build_method(_cfg(tmp_path, method="phased_dmd", **{"dmd.gan": "true"}), teacher=_teacher(), meta=TEXT,
                  data=_latents(), text_bank=_bank())


def test_flux_dmd2_one_step(tmp_path):
    teacher = _teacher(_flux())
    assert teacher.kind == "flux"
    cfg = _cfg(tmp_path, **{"train.max_steps": 1, "dmd.student_timesteps": "[999]"})
    obj, data, _ = build_method(cfg, teacher=teacher, meta=TEXT, data=_latents(), text_bank=_bank())
    before = {k: v.clone() for k, v in obj.student.backbone.state_dict().items()}
    result = Trainer(obj, cfg, data=data).train()
    assert result["last"]["dm_loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in obj.student.backbone.state_dict().items())


# -- flow conversions not covered by test_schedules ---------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_equals_diffusers_scale_noise(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(8)
    sched = FlowMatchSchedule(1000, shift)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 2, 4, 4, generator=g), torch.randn(8, 2, 4, 4, generator=g)
    # scheduler timesteps are shifted sigma * 1000; our t is pre-shift
    t = sched.t_from_sigma(ref.timesteps.double() / 1000)
    ours = sched.add_noise(x0, eps, t)
    theirs = torch.stack([ref.scale_noise(x0[i:i + 1], ref.timesteps[i:i + 1], eps[i:i + 1])[0] for i in range(8)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sched.model_timestep(t), ref.timesteps, atol=1e-3, rtol=0)


def test_one_step_flow_student_is_one_stock_euler_step():
    """x0 = x_t - sigma u (alpha + sigma = 1) is exactly a deterministic Euler step from sigma to 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.pipelines.sampling import student_sample

    den = _teacher()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    c = _bank().grid(2, "cpu")
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = student_sample(den, [999.0], c, x)
    sched.set_timesteps(sigmas=[0.999])
    t = sched.timesteps[0]
    with torch.no_grad():
        u = den.backbone(hidden_states=x, encoder_hidden_states=c["emb"], pooled_projections=c["pooled"],
                         timestep=t.expand(2)).sample
    torch.testing.assert_close(ours, sched.step(u, t, x).prev_sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
