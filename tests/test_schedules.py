"""Noise schedules against diffusers' own schedulers, and exact prediction conversions."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from stepdistill.schedules import (
    PREDICTION_TYPES,
    FlowMatchSchedule,
    NoiseSchedule,
    VPSchedule,
    schedule_from_config,
)

torch.set_num_threads(1)

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _ddpm(beta_schedule: str, prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         clip_sample=False)


def _vp(beta_schedule: str) -> VPSchedule:
    return VPSchedule.from_scheduler_config(dict(_ddpm(beta_schedule).config))


def _all_schedules():
    out = [(f"vp-{b}", _vp(b)) for b in BETA_SCHEDULES]
    out += [("flow-shift1", FlowMatchSchedule(1000, 1.0)), ("flow-shift3", FlowMatchSchedule(1000, 3.0))]
    return out


# -- VP against DDPMScheduler -----------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vp_add_noise_matches_diffusers(beta_schedule):
    ddpm = _ddpm(beta_schedule)
    sched = VPSchedule.from_scheduler_config(dict(ddpm.config))
    assert sched.num_train_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, generator=g)
    eps = torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 777, 998, 999])
    ours = sched.add_noise(x0, eps, t)
    ref = ddpm.add_noise(x0, eps, t)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # a scalar t broadcasts over the batch
    torch.testing.assert_close(sched.add_noise(x0, eps, 500), ddpm.add_noise(x0, eps, torch.full((8,), 500)),
                               atol=1e-5, rtol=0)
    # alpha / sigma themselves are the square roots of alphas_cumprod
    ac = ddpm.alphas_cumprod[t].double()
    torch.testing.assert_close(sched.alpha(t).double(), ac.sqrt(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.sigma(t).double(), (1 - ac).sqrt(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vp_variance_preserving_and_snr_monotone(beta_schedule):
    sched = _vp(beta_schedule)
    t = torch.arange(1000)
    a, s = sched.alpha(t).double(), sched.sigma(t).double()
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), atol=1e-6, rtol=0)
    snr = sched.snr(t).double()
    assert torch.all(snr[1:] < snr[:-1]), "SNR must strictly decrease with t"
    # fractional times too
    tf = torch.linspace(0, 999, 4001, dtype=torch.float64)
    snr_f = sched.snr(tf).double()
    assert torch.all(snr_f[1:] < snr_f[:-1])
    af, sf = sched.alpha(tf).double(), sched.sigma(tf).double()
    torch.testing.assert_close(af**2 + sf**2, torch.ones_like(af), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vp_interpolation_between_neighbours(beta_schedule):
    sched = _vp(beta_schedule)
    lo = torch.tensor([0.0, 3.0, 10.0, 411.0, 998.0])
    for w in (0.25, 0.5, 0.9):
        t = lo + w
        a, a0, a1 = sched.alpha(t), sched.alpha(lo), sched.alpha(lo + 1)
        s, s0, s1 = sched.sigma(t), sched.sigma(lo), sched.sigma(lo + 1)
        assert torch.all(a < a0) and torch.all(a > a1), (w, a, a0, a1)
        # sigma is close to 1 near t = T and rounds in float32: non-strict there
        assert torch.all(s >= s0) and torch.all(s <= s1), (w, s, s0, s1)
        assert torch.all((s > s0)[:-1]) and torch.all((s < s1)[:-1]), (w, s, s0, s1)
    # exact at integers, and log alphas_cumprod is linear in t between them
    ac = sched.alphas_cumprod
    mid = sched.alpha(torch.tensor([100.5])).double() ** 2
    torch.testing.assert_close(mid.log(), 0.5 * (ac[100].log() + ac[101].log()).reshape(1), atol=1e-6, rtol=0)
    # clamped outside [0, T-1]
    torch.testing.assert_close(sched.alpha(torch.tensor([1500.0])), sched.alpha(torch.tensor([999.0])))


def test_vp_from_scheduler_config_file_and_folder(tmp_path):
    ddpm = _ddpm("squaredcos_cap_v2", "v_prediction")
    ddpm.save_pretrained(tmp_path / "scheduler")
    a = VPSchedule.from_scheduler_config(tmp_path / "scheduler")
    b = VPSchedule.from_scheduler_config(tmp_path / "scheduler" / "scheduler_config.json")
    torch.testing.assert_close(a.alphas_cumprod, ddpm.alphas_cumprod.double())
    torch.testing.assert_close(b.alphas_cumprod, ddpm.alphas_cumprod.double())
    # to_config round-trips through schedule_from_config
    c = schedule_from_config(a.to_config())
    assert isinstance(c, VPSchedule)
    torch.testing.assert_close(c.alphas_cumprod, a.alphas_cumprod)


def test_vp_schedules_differ():
    """The three beta schedules really are different (guards against config keys being ignored)."""
    t = torch.tensor([500])
    vals = {b: float(_vp(b).alpha(t)) for b in BETA_SCHEDULES}
    assert len({round(v, 4) for v in vals.values()}) == 3, vals


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_v_target_equals_diffusers_get_velocity(beta_schedule):
    ddpm = _ddpm(beta_schedule, "v_prediction")
    sched = _vp(beta_schedule)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    t = torch.tensor([0, 17, 300, 600, 901, 999])
    v = sched.x0_eps_to_pred(x0, eps, t, "v_prediction")
    torch.testing.assert_close(v, ddpm.get_velocity(x0, eps, t), atol=1e-5, rtol=0)


# -- conversions ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,sched", _all_schedules(), ids=[n for n, _ in _all_schedules()])
@pytest.mark.parametrize("dtype,t_lo,t_hi", [(torch.float64, 0.5, 999.0), (torch.float32, 50.0, 800.0)],
                         ids=["f64-full-range", "f32"])
def test_prediction_round_trips(name, sched: NoiseSchedule, dtype, t_lo, t_hi):
    """float64 data: exact over the whole range (alpha -> 0 at t -> T makes x0-from-eps ill-conditioned
    in float32, as is eps-from-x0 at sigma -> 0: float32 is checked where neither is tiny)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(16, 2, 4, 4, generator=g, dtype=dtype)
    eps = torch.randn(16, 2, 4, 4, generator=g, dtype=dtype)
    t = t_lo + torch.rand(16, generator=g, dtype=torch.float64) * (t_hi - t_lo)
    t[0], t[1] = t_lo, t_hi
    x_t = sched.add_noise(x0, eps, t)
    for pt in PREDICTION_TYPES:
        pred = sched.x0_eps_to_pred(x0, eps, t, pt)
        rx0, reps = sched.pred_to_x0_eps(pred, x_t, t, pt)
        torch.testing.assert_close(rx0, x0, atol=1e-5, rtol=1e-5, msg=f"{name} {pt} x0")
        torch.testing.assert_close(reps, eps, atol=1e-5, rtol=1e-5, msg=f"{name} {pt} eps")
        for pt2 in PREDICTION_TYPES:
            other = sched.convert(pred, x_t, t, pt, pt2)
            torch.testing.assert_close(other, sched.x0_eps_to_pred(x0, eps, t, pt2), atol=1e-5, rtol=1e-5,
                                       msg=f"{name} {pt}->{pt2}")
            back = sched.convert(other, x_t, t, pt2, pt)
            torch.testing.assert_close(back, pred, atol=1e-5, rtol=1e-5, msg=f"{name} {pt}->{pt2}->{pt}")
    # the targets follow their definitions
    a, s = sched.alpha(t).reshape(-1, 1, 1, 1).to(dtype), sched.sigma(t).reshape(-1, 1, 1, 1).to(dtype)
    torch.testing.assert_close(x_t, a * x0 + s * eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.x0_eps_to_pred(x0, eps, t, "v_prediction"), a * eps - s * x0,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.x0_eps_to_pred(x0, eps, t, "flow_prediction"), eps - x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.eps_from_x0(x0, x_t, t), eps, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_raises():
    sched = FlowMatchSchedule()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        sched.pred_to_x0_eps(x, x, 500, "score")
    with pytest.raises(ValueError, match="prediction_type"):
        sched.x0_eps_to_pred(x, x, 500, "score")


# -- flow matching against FlowMatchEulerDiscreteScheduler ------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_diffusers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched = FlowMatchSchedule.from_scheduler_config(dict(ref.config))
    assert sched.shift == shift and sched.num_train_timesteps == 1000
    # diffusers' training sigmas are the shifted s = t / T for t = 1000, 999, ..., 1
    t_unshifted = torch.arange(1000, 0, -1, dtype=torch.float64)
    torch.testing.assert_close(sched.sigma(t_unshifted), ref.sigmas.float(), atol=1e-6, rtol=0)
    # the closed form, with alpha = 1 - sigma
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    want = shift * s / (1 + (shift - 1) * s)
    torch.testing.assert_close(sched.sigma(s * 1000).double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sched.alpha(s * 1000).double(), 1 - want, atol=1e-6, rtol=0)
    # the backbone sees sigma * 1000, like diffusers' scheduler.timesteps
    torch.testing.assert_close(sched.model_timestep(t_unshifted), ref.timesteps.float(), atol=1e-3, rtol=0)
    if shift > 1:
        assert float(sched.sigma(torch.tensor([500.0]))) > 0.5  # shift moves mass to high noise


def test_flow_euler_step_with_exact_velocity_lands_on_path():
    """A diffusers Euler step fed the exact flow target moves along x_t = (1-sigma) x0 + sigma eps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched = FlowMatchSchedule(1000, 3.0)
    ref.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    sig = ref.sigmas
    x = (1 - sig[0]) * x0 + sig[0] * eps
    for i, t in enumerate(ref.timesteps):
        u = sched.x0_eps_to_pred(x0, eps, torch.full((2,), 500.0), "flow_prediction")
        x = ref.step(u, t, x).prev_sample
        torch.testing.assert_close(x, (1 - sig[i + 1]) * x0 + sig[i + 1] * eps, atol=1e-5, rtol=0)


def test_flow_t_from_sigma_inverts_shift():
    sched = FlowMatchSchedule(1000, 3.0)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0], dtype=torch.float64)
    sig = sched.sigma_of(t)
    torch.testing.assert_close(sched.t_from_sigma(sig), t, atol=1e-6, rtol=0)


class _Recorder(nn.Module):
    """Custom backbone returning zeros and recording the timesteps it is conditioned on."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, cond):
        self.seen.append(t.detach().clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampler_conditions_backbone_on_scheduler_timesteps(shift):
    """The flow_euler sampler must call the backbone with the scheduler's own timesteps (sigma * 1000),
    not with the shift applied a second time."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.denoiser import Denoiser
    from stepdistill.pipelines.sampling import make_scheduler, scheduler_sample

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    net = _Recorder()
    den = Denoiser(net, FlowMatchSchedule.from_scheduler_config(dict(ref.config)), "flow_prediction")
    sched = make_scheduler("flow_euler", dict(ref.config))
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scheduler_sample(den, sched, None, 4, 1.0, noise)
    assert len(net.seen) == 4
    seen = torch.stack([s[0] for s in net.seen])
    torch.testing.assert_close(seen, sched.timesteps.float(), atol=1e-3, rtol=0)


def test_vp_sampler_conditions_backbone_on_scheduler_timesteps():
    from stepdistill.denoiser import Denoiser
    from stepdistill.pipelines.sampling import make_scheduler, scheduler_sample

    ddpm = _ddpm("squaredcos_cap_v2")
    net = _Recorder()
    den = Denoiser(net, VPSchedule.from_scheduler_config(dict(ddpm.config)), "epsilon")
    sched = make_scheduler("ddim", dict(ddpm.config))
    scheduler_sample(den, sched, None, 5, 1.0, torch.randn(2, 1, 4, 4))
    torch.testing.assert_close(torch.stack([s[0] for s in net.seen]), sched.timesteps.float())
    assert float(sched.timesteps[0]) == 999.0  # trailing spacing starts at pure noise


# -- family selection ------------------------------------------------------------------------
def test_schedule_from_config_picks_family():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    vp = schedule_from_config(dict(_ddpm("linear").config))
    assert isinstance(vp, VPSchedule) and vp.kind == "vp"
    ddim = schedule_from_config(dict(DDIMScheduler(beta_schedule="scaled_linear").config))
    assert isinstance(ddim, VPSchedule)
    torch.testing.assert_close(ddim.alphas_cumprod, _vp("scaled_linear").alphas_cumprod)
    fl = schedule_from_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert isinstance(fl, FlowMatchSchedule) and fl.shift == 3.0
    own = schedule_from_config({"kind": "flow", "num_train_timesteps": 500, "shift": 2.0})
    assert isinstance(own, FlowMatchSchedule) and own.num_train_timesteps == 500 and own.shift == 2.0
    rt = schedule_from_config(own.to_config())
    assert isinstance(rt, FlowMatchSchedule) and rt.shift == 2.0


def test_sample_t_ranges():
    g = torch.Generator().manual_seed(0)
    vp = _vp("linear")
    t = vp.sample_t(2000, 20, 980, generator=g)
    assert t.min() >= 20 and t.max() <= 980 and torch.all(t == t.round())
    assert t.min() < 40 and t.max() > 960
    fl = FlowMatchSchedule()
    tf = fl.sample_t(2000, 20.0, 980.0, generator=g)
    assert tf.min() >= 20 and tf.max() <= 980 and not torch.all(tf == tf.round())
