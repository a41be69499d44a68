"""Phased DMD: subinterval score-matching math, routing, progressive training, export round trip."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.pipelines.phased import PhasedDMDPipeline, route
from stepdistill.schedules import FlowMatchSchedule, VPSchedule
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx, update_seed
from stepdistill.trainers.phased_dmd import even_split, subinterval_targets, subinterval_weight

VP = VPSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                       "prediction_type": "v_prediction"})
FLOW = FlowMatchSchedule(1000, shift=3.0)


def _ab(sched, t):
    a, s = sched.alpha_sigma(torch.tensor([float(t)]))
    return float(a), float(s)


# -- subinterval math -------------------------------------------------------------------------------
@pytest.mark.parametrize("sched,s,t", [(VP, 300.0, 600.0), (VP, 500.0, 900.0), (FLOW, 200.0, 700.0)],
                         ids=["vp-300-600", "vp-500-900", "flow-200-700"])
def test_subinterval_targets_match_gaussian_marginal_score(sched, s, t):
    """x0 ~ N(mu, tau^2) (4 independent dims): the subinterval process has the direct forward
    marginal, and the least-squares minimiser of E||f(x_t) - eps_target||^2 is -s_t * true score
    (x0_target's minimiser is E[x0 | x_t]), within Monte-Carlo tolerance."""
    g = torch.Generator().manual_seed(0)
    n, d, mu, tau = 400_000, 4, 0.3, 0.5
    x0 = mu + tau * torch.randn(n, d, generator=g, dtype=torch.float64)
    a_s, s_s = _ab(sched, s)
    a_t, s_t = _ab(sched, t)
    x_s = a_s * x0 + s_s * torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_t, eps_tgt, x0_tgt = subinterval_targets(sched, x_s, eps, s, t)
    # identities: the targets describe x_t exactly
    torch.testing.assert_close(a_t * x0_tgt + s_t * eps_tgt, x_t, atol=1e-5, rtol=1e-5)
    a_ts = a_t / a_s
    beta2 = s_t**2 - a_ts**2 * s_s**2
    torch.testing.assert_close(eps_tgt, s_t * (x_t - a_ts * x_s) / beta2, atol=1e-5, rtol=1e-5)
    # marginal of x_t == direct forward process a_t x0 + s_t e
    var = a_t**2 * tau**2 + s_t**2
    m, v = x_t.mean().item(), x_t.var().item()
    assert abs(m - a_t * mu) < 5 * (var / (n * d)) ** 0.5
    assert abs(v / var - 1) < 5 * (2 / (n * d)) ** 0.5
    # least squares eps_target ~ c0 + c1 x_t, pooled over the (iid) dims
    X = torch.stack([torch.ones(n * d, dtype=torch.float64), x_t.reshape(-1)], 1)
    for target, c1_true, c0_true in [
        (eps_tgt, s_t / var, -s_t * a_t * mu / var),                    # eps = -s_t * score
        (x0_tgt, a_t * tau**2 / var, mu - a_t**2 * tau**2 * mu / var),  # E[x0 | x_t]
    ]:
        y = target.reshape(-1)
        coef = torch.linalg.lstsq(X, y[:, None]).solution.flatten()
        resid = y - X @ coef
        se1 = (resid.var() / (n * d * x_t.var())).sqrt().item()
        se0 = (resid.var() / (n * d)).sqrt().item() * (1 + (m**2 / v)) ** 0.5
        assert abs(coef[1].item() - c1_true) < 5 * se1 + 1e-6, (coef, c1_true, se1)
        assert abs(coef[0].item() - c0_true) < 5 * se0 + 1e-6, (coef, c0_true, se0)


def test_subinterval_clean_anchor_is_ordinary_denoising_and_flow_coefficients():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([50.0, 200, 400, 600, 800, 950])
    x_t, e, x = subinterval_targets(VP, x0, eps, None, t)
    torch.testing.assert_close(x_t, VP.add_noise(x0, eps, t))
    assert e is eps and x is x0
    assert torch.equal(subinterval_weight(VP, None, t, 6), torch.ones(6))
    w = subinterval_weight(VP, 500.0, torch.tensor([501.0, 600, 900]), 3)
    assert (w > 0).all() and (w < 1).all() and w[0] < w[1] < w[2]
    # flow form (METHODS.md): alpha = (1 - sigma_t) / (1 - sigma_s), beta = sqrt(sigma_t^2 - alpha^2 sigma_s^2)
    sig_s, sig_t = float(FLOW.sigma_of(300.0)), float(FLOW.sigma_of(800.0))
    al = (1 - sig_t) / (1 - sig_s)
    be = (sig_t**2 - al**2 * sig_s**2) ** 0.5
    x_t, _, _ = subinterval_targets(FLOW, x0, eps, 300.0, 800.0)
    torch.testing.assert_close(x_t, al * x0 + be * eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="t > s"):
        subinterval_targets(VP, x0, eps, 500.0, 400.0)


# -- routing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bounds", [[999, 500, 0], [999, 700, 300, 0], [999, 0]])
def test_routing_is_total_and_by_timestep(bounds):
    K = len(bounds) - 1
    for t in [-5.0, *range(0, 1000), 999.5, 1500.0]:
        k = route(t, bounds)
        assert 0 <= k < K
        if 0 <= t <= 999:  # owned by exactly the phase (b_{k+1}, b_k] (last phase down to 0)
            assert (t <= bounds[k]) and (t > bounds[k + 1] or k == K - 1)
    assert [route(s, bounds) for s in bounds[:-1]] == list(range(K))   # phase starts -> their expert
    assert even_split(7, 3) == [2, 2, 3] and even_split(240, 2) == [120, 120]


# -- training -------------------------------------------------------------------------------------
def _ctx(seed=0, batch=8, data=None, step=0):
    return Ctx(torch.Generator().manual_seed(seed), 0, 1, batch, torch.device("cpu"), step, data)


def _cfg(tiny_teacher, tmp_path, **extra):
    base = {"method": "phased_dmd", "phased.boundaries": "[999,500,0]", "train.max_steps": 3,
            "phased.steps_per_phase": "[1,2]", "dmd.critic_updates": 1, "dmd.gan": "true"}
    base.update(extra)
    return load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **base))


def _objective(tiny_teacher, tmp_path, **extra):
    from stepdistill.trainers.distill import build_method

    cfg = _cfg(tiny_teacher, tmp_path, **extra)
    obj, data, meta = build_method(cfg)
    return obj, data, cfg


def _spy_raw(den, name, calls):
    orig = den.raw

    def raw(x_t, t, cond=None, *a, **kw):
        out = None
        try:
            out = orig(x_t, t, cond, *a, **kw)
            return out
        finally:  # also a pass that Denoiser.features ends at the bottleneck (out stays None)
            calls.append((name, x_t.detach().clone(), t.detach().clone(), torch.is_grad_enabled(),
                          None if out is None else out.detach().clone()))

    den.raw = raw


def test_progressive_training_freezes_earlier_experts_and_chains_their_outputs(tiny_teacher, tmp_path):
    obj, data, cfg = _objective(tiny_teacher, tmp_path)
    assert obj.updates(0) == ["critic_0", "expert_0"]
    assert obj.updates(1) == obj.updates(2) == ["critic_1", "expert_1"]
    assert obj.head is not None and "head" in obj.players["critic_1"].module
    assert "head" not in obj.players["critic_0"].module
    trainer = Trainer(obj, cfg, data=data)

    def snap(name):
        return {k: v.detach().clone() for k, v in obj.players[name].module.state_dict().items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    before = {n: snap(n) for n in obj.players}
    trainer._run_step()                     # step 0: phase 0
    trainer.step, trainer.update = 1, 0
    after0 = {n: snap(n) for n in obj.players}
    assert not same(after0["expert_0"], before["expert_0"]) and not same(after0["critic_0"], before["critic_0"])
    assert same(after0["expert_1"], before["expert_1"]) and same(after0["critic_1"], before["critic_1"])

    calls = []
    _spy_raw(obj.experts[0], "expert_0", calls)
    _spy_raw(obj.experts[1], "expert_1", calls)
    for step in (1, 2):                     # phase 1
        trainer._run_step()
        trainer.step, trainer.update = step + 1, 0
    after1 = {n: snap(n) for n in obj.players}
    assert same(after1["expert_0"], after0["expert_0"]) and same(after1["critic_0"], after0["critic_0"])
    assert not same(after1["expert_1"], after0["expert_1"]) and not same(after1["critic_1"], after0["critic_1"])

    # every phase-1 generator call: expert_0 (no grad) on pure noise at 999, then expert_1 at 500 on
    # the DDIM transport of expert_0's own prediction
    names = [c[0] for c in calls]
    assert names == ["expert_0", "expert_1"] * 4     # 2 steps x (1 critic + 1 expert update)
    sched = obj.experts[0].schedule
    for (n0, x_in0, t0, grad0, pred0), (n1, x_in1, t1, grad1, _) in zip(calls[::2], calls[1::2]):
        assert float(t0[0]) == 999.0 and float(t1[0]) == 500.0 and not grad0
        x0, eps = sched.pred_to_x0_eps(pred0.float(), x_in0, t0, obj.experts[0].prediction_type)
        torch.testing.assert_close(x_in1, sched.add_noise(x0, eps, torch.full_like(t0, 500.0)))
    assert [c[3] for c in calls[1::2]] == [False, True] * 2  # expert_1 carries grad only in its own update
    # the phase-1 noise draw is the trainer's (seed, step, update) stream: first input == ctx.randn after labels
    ref = Ctx(torch.Generator().manual_seed(update_seed(cfg.train.seed, 1, 0)), 0, 1, cfg.train.batch_size,
              torch.device("cpu"), 1, data)
    ref.randint(0, 10)
    torch.testing.assert_close(calls[0][1], ref.randn(1, 16, 16))


def test_fake_score_and_dm_times_stay_inside_the_current_subinterval(tiny_teacher, tmp_path):
    obj, data, cfg = _objective(tiny_teacher, tmp_path)
    assert obj.t_range(0) == (501.0, 980.0) and obj.t_range(1) == (20.0, 500.0)
    for k in (0, 1):
        crit, teach = [], []
        _spy_raw(obj.critics[k], f"critic_{k}", crit)
        _spy_raw(obj.teacher, "teacher", teach)
        for seed in range(4):
            obj.critic_loss(_ctx(seed, 8, data), k)
        n_critic_calls = len(crit)
        for seed in range(3):
            obj.generator_loss(_ctx(100 + seed, 8, data), k)
        lo, hi = obj.t_range(k)
        ts = torch.cat([c[2] for c in crit + teach])
        assert ts.min() >= lo and ts.max() <= hi, (k, ts.min(), ts.max())
        assert ts.max() - ts.min() > 0.5 * (hi - lo)     # spread over the subinterval, not one point
        assert n_critic_calls == 4 * (2 if k == 1 else 1)  # last phase: fake + real (GAN) passes
        obj.critics[k].__dict__.pop("raw")
        obj.teacher.__dict__.pop("raw")


def test_phase0_critic_target_uses_the_subinterval_form(tiny_teacher, tmp_path):
    """The critic's regression target at phase 0 is the subinterval target, weighted by beta^2/sigma_t^2."""
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"dmd.gan": "false"})
    seen = []
    _spy_raw(obj.critics[0], "critic_0", seen)
    loss, logs = obj.critic_loss(_ctx(7, 8, data), 0)
    _, x_t, t, _, pred = seen[0]
    # replay the draws: labels, noise, t, eps
    ctx = _ctx(7, 8, data)
    cond = obj.conds(ctx)
    with torch.no_grad():
        _, x_s = obj.generate(ctx, cond, 0, grad=False)
    sched = obj.critics[0].schedule
    t2 = ctx.sample_t(sched, *obj.t_range(0))
    assert torch.equal(t, t2)
    x_t2, e_tgt, x0_tgt = subinterval_targets(sched, x_s, ctx.randn(1, 16, 16), 500.0, t2)
    torch.testing.assert_close(x_t, x_t2)
    target = sched.x0_eps_to_pred(x0_tgt, e_tgt, t2, "v_prediction")
    w = subinterval_weight(sched, 500.0, t2, 8)
    expected = (w * (pred - target).pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


# -- export round trip ----------------------------------------------------------------------------
def test_distill_exports_phased_folder_that_matches_training_sampler(tiny_teacher, tmp_path):
    from stepdistill.trainers.distill import distill
    from stepdistill.trainers.loading import load_trained

    cfg = _cfg(tiny_teacher, tmp_path, **{"train.max_steps": 4, "phased.steps_per_phase": "[2,2]"})
    folder = distill(cfg)
    meta = json.loads((folder / "stepdistill.json").read_text())
    assert meta["method"] == "phased_dmd" and meta["student_timesteps"] == [999.0, 500.0]
    assert meta["extra"]["experts"] == [
        {"name": "expert_0", "subfolder": "unet", "timesteps": [999.0], "phase": [999.0, 500.0]},
        {"name": "expert_1", "subfolder": "expert_1", "timesteps": [500.0], "phase": [500.0, 0.0]}]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PhasedDMDPipeline" and index["expert_1"] == ["diffusers", "UNet2DModel"]
    assert "PhasedDMDPipeline.from_pretrained" in (folder / "README.md").read_text()

    pipe = PhasedDMDPipeline.from_pretrained(folder)
    assert pipe.expert_for(999) == 0 and pipe.expert_for(500) == 1 and pipe.expert_for(0) == 1
    labels = [0, 3, 7]
    out = pipe(class_labels=labels, seed=5, output_type="pt").images
    assert pipe.last_experts == ["expert_0", "expert_1"] and pipe.last_latency_s > 0
    again = pipe(class_labels=labels, num_inference_steps=2, seed=5, output_type="pt").images
    assert torch.equal(out, again)                         # deterministic chain
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(class_labels=labels, num_inference_steps=1)

    # training-time sampler on the run's EMA experts (final checkpoint), same starting noise
    modules, obj, _ = load_trained(cfg)
    experts = [modules[f"expert_{k}"] for k in range(obj.K)]
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    trace = []
    ref = obj.sample({f"expert_{k}": m for k, m in enumerate(experts)}, 3, "cpu", noise=noise,
                     cond=torch.tensor(labels), trace=trace)
    assert trace == [0, 1]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    # stock diffusers reproduction of the chain (v-prediction, DDIM transport with the predicted eps)
    from diffusers import DDPMScheduler, UNet2DModel

    nets = [UNet2DModel.from_pretrained(folder, subfolder=s).eval() for s in ("unet", "expert_1")]
    ac = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    x, y = noise.clone(), torch.tensor(labels)
    for k, t in enumerate([999, 500]):
        a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
        with torch.no_grad():
            v = nets[k](x, torch.full((3,), float(t)), class_labels=y).sample
        x0, eps = (a * x - s * v) / (a**2 + s**2), (s * x + a * v) / (a**2 + s**2)
        if k == 0:
            x = ac[500].sqrt() * x0 + (1 - ac[500]).sqrt() * eps
    torch.testing.assert_close(out, x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)

    # the model card's stock-diffusers snippet (written by stepdistill/modelcard.py) runs and gives the pipeline's
    # images on the same starting noise
    import os

    from test_modelcard import _code_blocks

    snippet = next(b for b in _code_blocks((folder / "README.md").read_text(), "python") if "DDPMScheduler" in b)
    assert "UNet2DModel.from_pretrained" in snippet
    cwd, ns = os.getcwd(), {}
    os.chdir(folder.parent)  # the snippet loads the folder by its name
    try:
        exec(compile(snippet, "README.md", "exec"), ns)  # noqa: S102 - our own generated code
    finally:
        os.chdir(cwd)
    ref = pipe(class_labels=[0] * 4, seed=0, output_type="pt").images
    torch.testing.assert_close(ns["images"], ref, atol=1e-5, rtol=1e-5)


def test_resume_across_the_phase_switch_is_exact(tiny_teacher, tmp_path):
    """2 steps (phase 0, then phase 1's first) + resume for the last step == 3 steps in one go."""
    def run(out, stop_at=None, resume=False):
        obj, data, cfg = _objective(tiny_teacher, out, **{"train.checkpoint_every": 1, "train.sample_every": 100})
        if stop_at is not None:
            cfg.train.max_steps = stop_at
        Trainer(obj, cfg, data=data).train(resume=resume)
        return obj

    a = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=2)
    b = run(tmp_path / "b", resume=True)
    for name in a.players:
        sa, sb = a.players[name].module.state_dict(), b.players[name].module.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
