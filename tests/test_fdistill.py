"""f-distill: h(r) = f''(r) r^2 per divergence, the weighted gradient against finite differences of D_f on 1-D
Gaussians, batch-normalised weights from the discriminator, and reverse_kl = DMD2 exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import generator_grads, tiny_distill_overrides, tiny_objective
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.divergences import DIVERGENCES, f_of_r, f_weights, h_of_r


@pytest.mark.parametrize("div", DIVERGENCES)
def test_h_is_f_second_derivative_times_r_squared(div):
    r = torch.logspace(-2, 1.5, 60, dtype=torch.float64).requires_grad_(True)
    (d1,) = torch.autograd.grad(f_of_r(r, div).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    torch.testing.assert_close(h_of_r(r.detach(), div), d2 * r.detach() ** 2, rtol=1e-10, atol=1e-12)
    assert abs(float(f_of_r(torch.tensor(1.0, dtype=torch.float64), div))) < 1e-12  # f(1) = 0: D_f(p||p) = 0


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("param", ["loc", "scale"])
def test_weighted_score_gradient_is_the_divergence_gradient(div, param):
    """p = N(0, 1) (teacher), q = N(m, s^2) (student, x = m + s z). Gauss-Hermite quadrature over z:
    d/dtheta E_q[f(p/q)] (central differences) = E_z[h(r(x)) (s_q(x) - s_p(x)) dx/dtheta]."""
    from numpy.polynomial.hermite_e import hermegauss

    z, w = hermegauss(160)
    z, w = torch.tensor(z), torch.tensor(w / w.sum())

    def parts(m, s):
        x = m + s * z
        log_p = -0.5 * x**2
        log_q = -0.5 * ((x - m) / s) ** 2 - np.log(s)
        return x, torch.exp(log_p - log_q)

    def divergence(m, s):
        return float((w * f_of_r(parts(m, s)[1], div)).sum())

    m, s, e = 0.6, 0.8, 1e-5
    fd = ((divergence(m + e, s) - divergence(m - e, s)) if param == "loc"
          else (divergence(m, s + e) - divergence(m, s - e))) / (2 * e)
    x, r = parts(m, s)
    score_gap = -(x - m) / s**2 - (-x)                  # s_q(x) - s_p(x)
    dx = torch.ones_like(z) if param == "loc" else z    # dx/dm, dx/ds
    weighted = float((w * h_of_r(r, div) * score_gap * dx).sum())
    assert weighted == pytest.approx(fd, rel=1e-6, abs=1e-9)
    if div != "reverse_kl":  # the weights matter: plain DMD's gradient is a different number
        assert float((w * score_gap * dx).sum()) != pytest.approx(fd, rel=1e-3)


def test_weights_are_batch_normalised_clipped_and_finite():
    logits = torch.tensor([-50.0, -1.0, 0.0, 2.0, 400.0])
    for div in DIVERGENCES:
        w = f_weights(logits, div, logit_clip=10.0)
        assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(f_weights(logits, "reverse_kl"), torch.ones(5))
    fk = f_weights(logits, "forward_kl", logit_clip=10.0)
    assert fk[-1] / fk[-2] == pytest.approx(np.exp(8.0), rel=1e-5)  # 400 clipped to 10
    js = f_weights(logits, "js")
    assert (js[1:] > js[:-1]).all()  # larger p/q (under-covered modes) weigh more


def test_reverse_kl_is_dmd2_and_js_reweights(tiny_teacher, tmp_path, monkeypatch):
    import stepdistill.trainers.fdistill as fdistill

    torch.manual_seed(0)
    ref, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "a"))
    assert "f_weight_min" not in logs
    # reverse_kl never computes weights: the DMD2 path, untouched
    monkeypatch.setattr(fdistill, "f_weights", lambda *a, **k: (_ for _ in ()).throw(AssertionError("called")))
    torch.manual_seed(0)
    again, _ = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "b", **{"dmd.divergence": "reverse_kl"}))
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    # js with unit weights: exactly DMD2 (the weighting adds no other change, no extra random draws)
    monkeypatch.setattr(fdistill, "f_weights", lambda logits, *a: torch.ones_like(logits))
    torch.manual_seed(0)
    unit, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "c", **{"dmd.divergence": "js"}))
    assert all(torch.equal(a, b) for a, b in zip(ref, unit)) and logs["f_weight_min"] == 1.0
    # js with the discriminator's weights: a different gradient, weights around 1
    monkeypatch.undo()
    torch.manual_seed(0)
    js, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "d", **{"dmd.divergence": "js"}))
    assert any(not torch.equal(a, b) for a, b in zip(ref, js))
    assert 0 < logs["f_weight_min"] <= 1.0 <= logs["f_weight_max"]
    torch.manual_seed(0)  # with gan_fresh_t the ratio still comes from D at the DM step's own sample
    _, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "e", **{"dmd.divergence": "forward_kl",
                                                                          "dmd.gan_fresh_t": "true"}))
    assert logs["f_weight_max"] >= 1.0


def test_divergence_needs_the_discriminator(tiny_teacher, tmp_path):
    over = tiny_distill_overrides(tiny_teacher, tmp_path, **{"dmd.divergence": "js", "dmd.gan": "false"})
    with pytest.raises(ConfigError, match="dmd.divergence.*need dmd.gan=true"):
        load_config(DistillConfig, None, over)
    with pytest.raises(ConfigError, match="dmd.divergence"):
        load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **{"dmd.divergence": "tv"}))


def test_a_scheduled_switch_to_forward_kl_is_dmd2_before_it(tiny_teacher, tmp_path):
    """``schedule: [{at: 2, set: {dmd.divergence: forward_kl}}]`` (the video file's recipe): the run trains with the
    f-distill objective, equals a DMD2 run bit for bit up to step 2 (reverse_kl in force: no weights computed), then
    weighs the DM term (logged weights from step 2 on) and leaves DMD2's path."""
    import json

    from safetensors.torch import load_file

    from stepdistill.frontends.cli import main
    from stepdistill.trainers.dmd_method import dmd_objective_class
    from stepdistill.trainers.fdistill import FDistillObjective

    runs = {}
    for name, extra in (("dmd2", {}), ("switch", {"schedule": "[{at: 2, set: {dmd.divergence: forward_kl}}]"})):
        over = tiny_distill_overrides(tiny_teacher, tmp_path / name, **{"dmd.gan": "true", **extra})
        if name == "switch":
            cfg = load_config(DistillConfig, None, over)
            assert cfg.dmd.divergence == "reverse_kl" and dmd_objective_class(cfg.dmd, cfg.schedule) is FDistillObjective
        assert main(["distill", "--config", "", *over]) == 0
        runs[name] = tmp_path / name
    ck = lambda run, s: load_file(run / "checkpoints" / f"step_{s:06d}" / "models.safetensors")  # noqa: E731
    a2, b2 = ck(runs["dmd2"], 2), ck(runs["switch"], 2)
    assert a2.keys() == b2.keys() and all(torch.equal(a2[k], b2[k]) for k in a2)
    a4, b4 = ck(runs["dmd2"], 4), ck(runs["switch"], 4)
    assert any(not torch.equal(a4[k], b4[k]) for k in a4)
    rows = [json.loads(line) for line in (runs["switch"] / "log.jsonl").read_text().splitlines()]
    weighted = sorted(r["step"] for r in rows if "f_weight_max" in r)
    assert weighted and min(weighted) >= 2 and all("f_weight_max" not in r for r in rows if r.get("step", 0) < 2)
    meta = json.loads((runs["switch"] / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["schedule"]["values"]["dmd.divergence"] == "forward_kl"
