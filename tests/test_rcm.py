"""rCM / sCM: the TrigFlow view of our schedules, the JVP tangent against finite differences, plain sCM at
dmd_weight 0, a zero sCM target on an analytically self-consistent model, and training + export end to end."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.dmd import DMDConfig
from stepdistill.trainers.rcm import RCMConfig
from stepdistill.data import ArrayDataset
from stepdistill.denoiser import Denoiser
from stepdistill.schedules import FlowMatchSchedule, VPSchedule
from stepdistill.trainers.objective import Ctx
from stepdistill.trigflow import TrigFlow, tangent


def _vp():
    return VPSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                            "prediction_type": "v_prediction"})


class Net(nn.Module):
    """A small smooth custom denoiser: conv(x) modulated by the timestep (forward-mode AD works everywhere)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1, dtype=dtype)

    def forward(self, x, tm, cond=None):
        return torch.tanh(self.conv(x)) * (1 + torch.sin(tm / 300.0).view(-1, 1, 1, 1)) + 0.1 * x


@pytest.mark.parametrize("sched", [_vp(), FlowMatchSchedule(1000, shift=3.0)], ids=["vp", "flow"])
def test_trigflow_round_trips_our_schedules(sched):
    tf = TrigFlow(Denoiser(Net(), sched, "v_prediction" if sched.kind == "vp" else "flow_prediction"))
    t = torch.tensor([0.5, 1.0, 37.0, 250.25, 500.0, 873.5, 998.0], dtype=torch.float64)
    s = tf.s_of_t(t)
    assert (s > 0).all() and (s < math.pi / 2).all() and (s[1:] > s[:-1]).all()
    torch.testing.assert_close(tf.t_of_s(s), t, rtol=0, atol=1e-4)
    # the same noisy sample in both spaces: x_t = alpha x0 + sigma eps  <->  x_s = cos(s) x0 + sin(s) eps
    x0, eps = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.randn(7, 1, 4, 4, dtype=torch.float64)
    x_s = torch.cos(s).view(-1, 1, 1, 1) * x0 + torch.sin(s).view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(tf.to_model_space(x_s, s), sched.add_noise(x0, eps, t).double(), rtol=0, atol=1e-5,
                               check_dtype=False)


@pytest.mark.parametrize("pt", ["v_prediction", "epsilon", "sample"])
def test_trigflow_x0_is_the_denoisers_and_F_is_v_for_vp(pt):
    den = Denoiser(Net(), _vp(), pt)
    tf = TrigFlow(den)
    t = torch.tensor([120.0, 640.0])
    s, x = tf.s_of_t(t), torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(tf.x0(x, s, None), den(x, t, None), rtol=1e-5, atol=1e-5, check_dtype=False)
        if pt == "v_prediction":  # VP + v-prediction: TrigFlow's F is the network's v
            torch.testing.assert_close(tf.F(x, s, None), den.raw(x, t, None), rtol=1e-5, atol=1e-5, check_dtype=False)


def test_jvp_tangent_matches_finite_differences():
    den = Denoiser(Net(torch.float64), _vp(), "v_prediction")
    tf = TrigFlow(den)
    fn = lambda x, s: tf.F(x, s, None)  # noqa: E731
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    s = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    tx, ts = torch.randn_like(x), torch.tensor([0.5, 1.0, -0.7], dtype=torch.float64)
    out_j, tan_j, how_j = tangent(fn, x, s, tx, ts, "jvp")
    out_f, tan_f, how_f = tangent(fn, x, s, tx, ts, "fd", fd_size=1e-5)
    assert (how_j, how_f) == ("jvp", "fd")
    torch.testing.assert_close(out_j, out_f)
    torch.testing.assert_close(tan_j, tan_f, rtol=1e-6, atol=1e-7)


def test_auto_tangent_falls_back_to_finite_differences_once():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    fn = lambda x, s: NoForwardAD.apply(x) * s.view(-1, 1)  # noqa: E731 - no jvp rule
    x, s = torch.randn(2, 3, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="finite-difference tangent"):
        _, tan, how = tangent(fn, x, s, torch.ones_like(x), torch.zeros_like(s), "auto", fd_size=1e-6)
    assert how == "fd"
    torch.testing.assert_close(tan, 2 * s.view(-1, 1).expand(2, 3))
    with pytest.raises((NotImplementedError, RuntimeError)):
        tangent(fn, x, s, torch.ones_like(x), torch.zeros_like(s), "jvp")


class Const(nn.Module):
    """x0-predictor ``w * point + (1 - w) * x_t``; w = 1 always answers ``point``: the exact consistency function
    of data = one point (constant along every trajectory)."""

    def __init__(self, point: torch.Tensor, w: float = 1.0):
        super().__init__()
        self.register_buffer("point", point)
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x, tm, cond=None):
        return self.w * self.point + (1 - self.w) * x


def _objective(student_scale: float, dmd_weight: float = 0.0):
    from stepdistill.trainers.rcm import RCMObjective

    point = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    sched = _vp()
    teacher = Denoiser(Const(point), sched, "sample")
    student = Denoiser(Const(point, student_scale), sched, "sample")
    critic = Denoiser(Const(point), sched, "sample")
    dcfg = DMDConfig(gan=False, student_timesteps=[999.0])
    obj = RCMObjective(teacher, student, critic, dcfg, 0, (1, 4, 4), rcm=RCMConfig(dmd_weight=dmd_weight,
                                                                                    tangent_warmup_steps=10))
    data = ArrayDataset(point.expand(32, -1, -1, -1).clone(), torch.zeros(32, dtype=torch.long), ["x"])
    return obj, data


def test_scm_target_is_zero_for_a_self_consistent_model():
    """Data = one point x0*; teacher and student both answer x0* (F = (cos s x - x0*) / sin s, exactly
    consistent along the ODE): g = 0 and the loss and its gradient vanish. A student whose answer drifts with x_s
    (0.5 x0* + 0.5 x_s) is not consistent: g != 0 and the student gets a gradient."""
    obj, data = _objective(1.0)
    ctx = Ctx(torch.Generator().manual_seed(0), 0, 1, 16, torch.device("cpu"), 50, data)  # past the warm-up: r = 1
    loss, logs = obj.generator_loss(ctx)
    assert logs["tangent_warmup"] == 1.0 and logs["scm_g_abs"] < 1e-6 and loss.item() < 1e-10
    obj2, _ = _objective(0.5)
    ctx = Ctx(torch.Generator().manual_seed(0), 0, 1, 16, torch.device("cpu"), 50, data)
    loss2, logs2 = obj2.generator_loss(ctx)
    assert logs2["scm_g_abs"] > 1e-3
    loss2.backward()
    assert obj2.student.backbone.w.grad.abs() > 0


def test_dmd_weight_zero_is_plain_scm(tiny_teacher, tmp_path):
    from stepdistill.trainers.distill import build_method

    over = {"method": "rcm", "dmd.gan": "false", "rcm.dmd_weight": 0.0, "rcm.tangent_warmup_steps": 0}
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **over))
    obj, data, _ = build_method(cfg)
    assert obj.updates(0) == ["generator"] == obj.updates(10**6)  # no critic at all
    ctx = lambda: Ctx(torch.Generator().manual_seed(1), 0, 1, 8, torch.device("cpu"), 7, data)  # noqa: E731
    total, logs = obj.generator_loss(ctx())
    scm, _ = obj.scm_loss(ctx())
    assert total.item() == scm.item() and "dm_loss" not in logs
    over["rcm.dmd_weight"] = 1.0
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path / "b", **over))
    obj, data, _ = build_method(cfg)
    total, logs = obj.generator_loss(Ctx(torch.Generator().manual_seed(1), 0, 1, 8, torch.device("cpu"), 7, data))
    assert "dm_loss" in logs and obj.updates(7)[0] == "critic"


def test_rcm_trains_exports_and_samples(tiny_teacher, tmp_path):
    import json

    from stepdistill.pipelines.student import StepDistillPipeline
    from stepdistill.trainers.distill import distill

    over = {"method": "rcm", "dmd.gan": "false", "rcm.tangent_warmup_steps": 1, "dmd.student_timesteps": "[999,633]",
            "train.max_steps": 3, "train.sample_every": 3}
    folder = distill(load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **over)))
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["method"] == "rcm" and meta["student_timesteps"] == [999.0, 633.0]
    assert "rCM" in (folder / "README.md").read_text()
    x = StepDistillPipeline.from_pretrained(folder)(class_labels=[1, 2], seed=0, output_type="pt").images
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    # eval / bench / report load it like any student, the demo reads it as a 2-step student
    from stepdistill.frontends.demo import read_model_info
    from stepdistill.eval.generate import load_any

    m = load_any(folder, device="cpu")
    assert m.kind == "student" and m.nfe_per_sample() == 2 and m.nfe_per_sample(1) == 1
    assert m.generate(n=4, steps=2, seed=0).shape == (4, 1, 16, 16)
    info = read_model_info(str(folder), "student")
    assert info.max_student_steps == 2 and info.method == "rcm"
    with pytest.raises(Exception, match="dmd.gan"):
        load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, method="rcm"))
