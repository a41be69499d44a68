"""Decoupled DMD (Liu et al. 2025): the guided DMD gradient splits exactly into the CA and DM terms;
each term has its own (independently sampled) timestep schedule; config errors name the key."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.losses import decoupled_dm_loss, dm_loss
from test_dmd import _ctx, _objective  # the same tiny DMD2 objective and update context


def test_decomposition_sums_to_guided_dmd_gradient():
    """Same sample, unit weights: g_dm + g_ca == DMD2's grad, and d L / d x agrees (x and its loss)."""
    g = torch.Generator().manual_seed(0)
    w = 3.5
    x = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    mu_c, mu_u, fake = (torch.randn(4, 1, 8, 8, generator=g) for _ in range(3))
    mu_real = mu_u + w * (mu_c - mu_u)
    l_ref, grad_ref = dm_loss(x, mu_real, fake)
    (gx_ref,) = torch.autograd.grad(l_ref, x)

    loss, p = decoupled_dm_loss(x, (mu_c, mu_u), fake, (mu_c, mu_u), w)
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(p["g_dm"] + p["g_ca"], grad_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-9)
    # the terms themselves: DM = (fake - mu_c)/n, CA = -(w-1)(mu_c - mu_u)/n with DMD2's n
    n = (x.detach() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(p["g_dm"], (fake - mu_c) / n)
    torch.testing.assert_close(p["g_ca"], -(w - 1) * (mu_c - mu_u) / n)
    # weights scale each term's gradient: d L / d x = (a g_dm + b g_ca) / numel
    loss2, p2 = decoupled_dm_loss(x, (mu_c, mu_u), fake, (mu_c, mu_u), w, dm_term_weight=0.25, ca_weight=2.0)
    (gx2,) = torch.autograd.grad(loss2, x)
    torch.testing.assert_close(gx2, (0.25 * p2["g_dm"] + 2.0 * p2["g_ca"]) / x.numel())
    # w = 1: no CFG, no CA term
    _, p1 = decoupled_dm_loss(x, (mu_c, mu_u), fake, (mu_c, mu_u), 1.0)
    assert p1["g_ca"].abs().max() == 0


def test_cond_uncond_halves_recombine_to_the_guided_x0(tiny_teacher):
    from stepdistill.models import load_denoiser

    den, _ = load_denoiser(str(tiny_teacher))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([900.0, 500.0, 30.0]), torch.tensor([1, 4, 9])
    with torch.no_grad():
        c, u = den.x0_cond_uncond(x, t, y)
        torch.testing.assert_close(c, den(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u, den(x, t, torch.full_like(y, den.null_class)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u + 3.0 * (c - u), den(x, t, y, guidance_scale=3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gan", ["false", "true"])
def test_shared_schedule_reproduces_dmd2_generator_gradient(tiny_teacher, tmp_path, gan):
    """ca_schedule=shared, unit weights: same loss value and the same gradient on every student parameter
    as plain DMD2 for the same update seed (multi-step student with backward simulation)."""
    common = {"dmd.gan": gan, "dmd.real_guidance_scale": 2.5, "dmd.student_timesteps": "[999,499]"}
    grads = []
    for extra in ({}, {"dmd.decoupled": "true", "dmd.ca_schedule": "shared"}):
        obj, data, _ = _objective(tiny_teacher, tmp_path / str(len(grads)), **common, **extra)
        gen = obj.players["generator"].module
        obj.players["critic"].module.requires_grad_(False)
        loss, logs = obj.generator_loss(_ctx(7, 8, data))
        gen.zero_grad()
        loss.backward()
        grads.append((loss.detach(), logs, [p.grad.clone() for p in gen.parameters()]))
    (l0, logs0, g0), (l1, logs1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-8)
    assert logs1["backsim_k"] == logs0["backsim_k"]
    assert logs1["dm_grad_abs"] == pytest.approx(logs0["dm_grad_abs"], rel=1e-5)
    assert logs1["t_ca_mean"] == logs1["t_dm_mean"]
    assert logs1["ca_loss"] > 0 and logs1["dm_term_loss"] > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert sum(float(a.abs().sum()) for a in g0) > 0


def test_schedules_are_sampled_independently_and_deterministically(tiny_teacher, tmp_path):
    """Different ranges -> the terms see different t (each inside its own range); equal ranges with
    ca_schedule=uniform still draw a separate t; the same update seed gives the same draws."""
    obj, data, _ = _objective(tiny_teacher, tmp_path / "a", **{
        "dmd.decoupled": "true", "dmd.ca_schedule": "uniform", "dmd.gan": "false",
        "dmd.t_min": 20, "dmd.t_max": 400, "dmd.ca_t_min": 600, "dmd.ca_t_max": 980})
    seen = {}
    orig = obj.decoupled_loss

    def spy(ctx, x, x_t, t, cond, k, fake_x0):
        out = orig(ctx, x, x_t, t, cond, k, fake_x0)
        seen.setdefault("t", []).append(t.clone())
        return out

    obj.decoupled_loss = spy
    ca_t = []
    orig_ca = obj.ca_times
    obj.ca_times = lambda ctx, k: ca_t.append(orig_ca(ctx, k)) or ca_t[-1]
    _, logs = obj.generator_loss(_ctx(3, 16, data))
    t_dm, t_ca = seen["t"][0], ca_t[0]
    assert ((t_dm >= 20) & (t_dm <= 400)).all() and ((t_ca >= 600) & (t_ca <= 980)).all()
    assert logs["t_dm_mean"] == pytest.approx(float(t_dm.mean()))
    assert logs["t_ca_mean"] == pytest.approx(float(t_ca.mean()))
    _, logs2 = obj.generator_loss(_ctx(3, 16, data))       # same seed: same draws, same losses
    assert ca_t[1].equal(t_ca) and seen["t"][1].equal(t_dm) and logs2["ca_loss"] == logs["ca_loss"]
    obj.generator_loss(_ctx(4, 16, data))
    assert not ca_t[2].equal(t_ca)

    # equal ranges, uniform: the CA term draws its own t (not the DM term's)
    obj2, data2, _ = _objective(tiny_teacher, tmp_path / "b", **{
        "dmd.decoupled": "true", "dmd.ca_schedule": "uniform", "dmd.gan": "false"})
    _, lg = obj2.generator_loss(_ctx(3, 16, data2))
    assert lg["t_ca_mean"] != lg["t_dm_mean"]


def test_above_student_schedule_renoises_above_the_current_timestep(tiny_teacher, tmp_path):
    obj, data, _ = _objective(tiny_teacher, tmp_path, **{
        "dmd.decoupled": "true", "dmd.ca_schedule": "above_student", "dmd.gan": "false",
        "dmd.student_timesteps": "[999,749,499,249]", "dmd.ca_t_max": 980})
    for k, tk in enumerate([999, 749, 499, 249]):
        t = obj.ca_times(_ctx(k, 64), k)
        lo = min(tk, 980)
        assert ((t >= lo) & (t <= 980)).all()
        if k > 0:
            assert t.min() < t.max()  # a real range, not one value
    assert obj.ca_times(_ctx(0, 8), 0).eq(980).all()  # one-step student at t_0 = 999 >= ca_t_max


def test_decoupled_uses_one_teacher_call(tiny_teacher, tmp_path):
    """Non-shared schedules: both terms' cond + uncond predictions come from one batched (4B) teacher call."""
    obj, data, _ = _objective(tiny_teacher, tmp_path, **{"dmd.decoupled": "true", "dmd.gan": "false"})
    calls = []
    h = obj.teacher.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        obj.generator_loss(_ctx(0, 8, data))
    finally:
        h.remove()
    assert calls == [32]


def test_config_errors_name_the_key(tiny_teacher, tmp_path):
    base = tiny_distill_overrides(tiny_teacher, tmp_path)
    with pytest.raises(ConfigError, match="dmd.ca_schedule"):
        load_config(DistillConfig, None, base + ["dmd.decoupled=true", "dmd.ca_schedule=below"])
    with pytest.raises(ConfigError, match="dmd.decoupled"):
        load_config(DistillConfig, None, base + ["dmd.decoupled=true", "method=phased_dmd"])
    with pytest.raises(ConfigError, match="dmd.decoupled"):
        load_config(DistillConfig, None, base + ["dmd.decoupled=true", "method=msd", "train.max_steps=8"])
    with pytest.raises(ConfigError, match="dmd.ca_t_min"):
        load_config(DistillConfig, None, base + ["dmd.decoupled=true", "dmd.ca_t_min=900", "dmd.ca_t_max=100"])
    with pytest.raises(ConfigError, match="dmd.ca_weight"):
        load_config(DistillConfig, None, base + ["dmd.decoupled=true", "dmd.ca_weight=-1"])
    cfg = load_config(DistillConfig, "configs/decoupled_dmd_animal_mnist.yaml")
    assert cfg.dmd.decoupled and cfg.dmd.ca_schedule == "above_student"
