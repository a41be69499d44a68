"""SiD and Uni-Instruct (trainers/score_implicit.py, losses.score_implicit_loss): the score-implicit gradient equals
the gradient of the (f-weighted) Fisher divergence on 1-D and 2-D Gaussians in closed form; SiD's own scaling;
uni_instruct with reverse KL and no score-implicit branch is DMD2 bit for bit; both methods train and export."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import distill_argv, generator_grads, run_cli, tiny_distill_overrides, tiny_objective
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.losses import score_implicit_loss

A, SG = 0.8, 0.6                      # x_t = A x + SG eps
MP, SP = 0.7, 1.3                     # teacher N(MP, SP^2) in 1-D


def _post_mean(x, m, s):
    """E[x0 | x_t = x] for x0 ~ N(m, s^2): the exact denoiser (x0 prediction) of a Gaussian."""
    v = A * A * s * s + SG * SG
    return m + A * s * s / v * (x - A * m)


def _log_qt(x, m, s):
    v = A * A * s * s + SG * SG
    return -0.5 * (x - A * m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)


H = {"reverse_kl": lambda r: torch.ones_like(r), "forward_kl": lambda r: r, "js": lambda r: r / (1 + r)}


def _fisher_1d(mu, s, div):
    """E_{q_t}[h(r) (f_p - f_q)^2] on a fine grid (q_t, p_t Gaussian; r = p_t / q_t), differentiable in (mu, s)."""
    xs = torch.linspace(-12, 12, 120001, dtype=torch.float64)
    lq = _log_qt(xs, mu, s)
    lp = _log_qt(xs, torch.tensor(MP, dtype=torch.float64), torch.tensor(SP, dtype=torch.float64))
    u = _post_mean(xs, MP, SP) - _post_mean(xs, mu, s)
    return (torch.exp(lq) * H[div](torch.exp(lp - lq)) * u * u).sum() * (xs[1] - xs[0])


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "js"])
def test_score_implicit_gradient_is_the_weighted_fisher_gradient_1d(div):
    """Generator x = mu + s z; exact fake score (the denoiser of q_t at the current parameters, held fixed) and
    exact ratio: the estimator's gradient = autograd of E_{q_t}[h(r) ||f_p - f_q||^2] (alpha = 0.5, n = 1)."""
    theta = torch.tensor([0.2, 0.9], dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(_fisher_1d(theta[0], theta[1], div), theta)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    z, e = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    th = theta.detach().clone().requires_grad_(True)
    mu0, s0 = theta.detach()
    x = th[0] + th[1] * z
    x_t = A * x + SG * e
    f_p, f_q = _post_mean(x_t, MP, SP), _post_mean(x_t, mu0, s0)
    # the exact log ratio as a function of x_t (q_t at the current parameters, held fixed), with its graph
    log_r = (_log_qt(x_t, torch.tensor(MP, dtype=torch.float64), torch.tensor(SP, dtype=torch.float64))
             - _log_qt(x_t, mu0, s0)).squeeze(1)
    loss, _ = score_implicit_loss(x, f_p, f_q, 0.5, log_r, div, normalise=False)
    (got,) = torch.autograd.grad(loss, th, retain_graph=True)
    torch.testing.assert_close(got.double(), want, rtol=0.03, atol=2e-3)
    if div != "reverse_kl":  # the ratio's graph matters: h as a constant weight gives another gradient
        u = f_p - f_q
        plain = (H[div](log_r.detach().exp()) * (2 * u * (f_p - x) - u * u).squeeze(1)).mean()
        (wrong,) = torch.autograd.grad(plain, th)
        assert ((wrong - want).abs() / want.abs()).max() > 0.1  # the estimator is within 3 %


def test_score_implicit_gradient_2d_and_sid_alpha():
    """2-D: teacher N(m_p, diag), student x = m + L z (full 2x2 L). Reverse KL: the Fisher divergence
    E||f_p - f_q||^2 in closed form (f linear in x_t); alpha = 0.5 gives its exact gradient; SiD's alpha = 1.2
    adds -1.4 x the gradient of ||u||^2 through x_t (the identity between the two)."""
    mp = torch.tensor([0.5, -0.3], dtype=torch.float64)
    cp = torch.diag(torch.tensor([1.2, 0.6], dtype=torch.float64))

    def denoiser(m, c):  # E[x0 | x_t] for x0 ~ N(m, c): m + A c V^-1 (x - A m), V = A^2 c + SG^2 I
        v = A * A * c + SG * SG * torch.eye(2, dtype=torch.float64)
        g = A * c @ torch.linalg.inv(v)
        return lambda x: m + (x - A * m) @ g.T, v

    def fisher(m, lmat):
        c = lmat @ lmat.T
        fp, _ = denoiser(mp, cp)
        fq, v = denoiser(m, c)
        # u(x) = fp(x) - fq(x) = b + x M^T, x ~ N(A m, v): E||u||^2 = ||b + A m M^T||^2 + tr(M v M^T)
        zero = torch.zeros(1, 2, dtype=torch.float64)
        b = (fp(zero) - fq(zero)).squeeze(0)
        mm = torch.stack([fp(torch.eye(2, dtype=torch.float64)[i:i + 1]).squeeze(0) - fq(
            torch.eye(2, dtype=torch.float64)[i:i + 1]).squeeze(0) - b for i in range(2)], 1)
        mean_u = b + mm @ (A * m)
        return mean_u @ mean_u + torch.trace(mm @ v @ mm.T)

    m = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    lm = torch.tensor([[0.9, 0.0], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(fisher(m, lm), (m, lm))
    g = torch.Generator().manual_seed(1)
    n = 400_000
    z, e = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    fp, _ = denoiser(mp, cp)
    fq, _ = denoiser(m.detach(), lm.detach() @ lm.detach().T)
    def grads(alpha):
        x = m + z @ lm.T
        x_t = A * x + SG * e
        loss, _ = score_implicit_loss(x, fp(x_t), fq(x_t), alpha, normalise=False)
        return torch.autograd.grad(loss, (m, lm))

    for got, w in zip(grads(0.5), want):  # the loss is a mean over the 2 coordinates: x 2 for the sum
        torch.testing.assert_close(2 * got.double(), w, rtol=0.03, atol=2e-3)
    x = m + z @ lm.T
    x_t = A * x + SG * e
    u = fp(x_t) - fq(x_t)
    naive = torch.autograd.grad((u * u).sum(1).mean() / 2, (m, lm))  # d/dtheta ||u||^2 through x_t, per numel
    for g12, g05, gn in zip(grads(1.2), grads(0.5), naive):
        torch.testing.assert_close(g12, g05 - 2 * 0.7 * gn, rtol=1e-6, atol=1e-9)


def test_sid_scaling_is_the_authors_loss_times_two_over_numel():
    """With DMD2's / SiD's per-sample normaliser: L = mean_b sum (2 x SiD's per-element loss) / (n_b C H W)."""
    g = torch.Generator().manual_seed(0)
    x, fp, fq = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    loss, _ = score_implicit_loss(x, fp, fq, alpha=1.2)
    wf = (x - fp).abs().mean(dim=[1, 2, 3], keepdim=True)
    sid = (fp - fq) * ((fp - x) - 1.2 * (fp - fq)) / wf  # the authors' per-element loss (training/sid_loss.py)
    assert loss.item() == pytest.approx(2 * sid.sum().item() / 3 / 16, rel=1e-5)


@pytest.mark.parametrize("div", ["reverse_kl", "js"])
def test_uni_instruct_without_the_implicit_branch_is_dmd2_or_fdistill_bit_for_bit(tiny_teacher, tmp_path, div):
    torch.manual_seed(0)
    ref, _ = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "a", **{"dmd.divergence": div}))
    torch.manual_seed(0)
    ui, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "b", method="uni_instruct", **{
        "dmd.divergence": div, "sid.si_weight": 0}))
    assert all(torch.equal(a, b) for a, b in zip(ref, ui)) and "si_loss" not in logs
    torch.manual_seed(0)  # with the implicit branch: another gradient, through the teacher and the fake score
    full, logs = generator_grads(*tiny_objective(tiny_teacher, tmp_path / "c", method="uni_instruct", **{"dmd.divergence": div}))
    assert any(not torch.equal(a, b) for a, b in zip(ref, full))
    assert math.isfinite(logs["si_loss"]) and logs["si_nonfinite_frac"] == 0.0
    if div == "js":
        assert 0 < logs["si_weight_min"] <= 1.0 <= logs["si_weight_max"]


def test_sid_gradient_flows_through_both_networks(tiny_teacher, tmp_path):
    """SiD (no DI branch): blocking the graph through the teacher's and critic's outputs changes the gradient;
    their weights get none."""
    obj, data = tiny_objective(tiny_teacher, tmp_path, method="sid", **{"dmd.gan": "false"})
    ref, logs = generator_grads(obj, data)
    assert "dm_loss" not in logs and "si_loss" in logs
    assert all(p.grad is None for p in obj.players["critic"].module.parameters())
    assert all(p.grad is None for p in obj.teacher.backbone.parameters())
    real_call = type(obj.critic).forward

    def detached(self, *a, **k):
        return real_call(self, *a, **k).detach()

    obj2, data2 = tiny_objective(tiny_teacher, tmp_path / "d", method="sid", **{"dmd.gan": "false"})
    obj2.critic.forward = detached.__get__(obj2.critic)
    blocked, _ = generator_grads(obj2, data2)
    assert any(not torch.allclose(a, b) for a, b in zip(ref, blocked))


def test_config_checks(tiny_teacher, tmp_path):
    over = lambda **k: tiny_distill_overrides(tiny_teacher, tmp_path, **k)  # noqa: E731
    with pytest.raises(ConfigError, match="dmd.divergence.*uni_instruct"):
        load_config(DistillConfig, None, over(method="sid", **{"dmd.divergence": "js", "dmd.gan": "true"}))
    with pytest.raises(ConfigError, match="sid.si_weight.*both 0"):
        load_config(DistillConfig, None, over(method="uni_instruct", **{"sid.si_weight": 0, "sid.di_weight": 0}))
    with pytest.raises(ConfigError, match="dmd.divergence.*need dmd.gan"):
        load_config(DistillConfig, None, over(method="uni_instruct", **{"dmd.divergence": "js", "dmd.gan": "false"}))
    assert load_config(DistillConfig, None, over(method="sid")).sid.alpha == 1.2
    assert load_config(DistillConfig, None, over(method="uni_instruct")).sid.di_weight == 1.0


@pytest.mark.parametrize("method,extra", [("sid", {"dmd.gan": "false"}),
                                          ("uni_instruct", {"dmd.gan": "true", "dmd.divergence": "js"})])
def test_trains_and_exports_through_the_cli(tiny_teacher, tmp_path, capsys, method, extra):
    import json

    out = tmp_path / method
    code, _, err = run_cli(capsys, distill_argv(tiny_teacher, out, method=method, **extra))
    assert code == 0, err
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("si_loss" in r for r in logs) and all(math.isfinite(r.get("si_loss", 0.0)) for r in logs)
    meta = json.loads((out / "student" / "stepdistill.json").read_text())
    assert meta["method"] == method
