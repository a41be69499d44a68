"""DMD / DMD2 objective: loss direction, critic learning, GAN gradient routing, backward simulation."""
from __future__ import annotations

import torch

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.losses import dm_loss
from stepdistill.trainers.distill import build_method


def _ctx(seed=0, batch=8, data=None, step=0):
    return Ctx(torch.Generator().manual_seed(seed), 0, 1, batch, torch.device("cpu"), step, data)


def _objective(tiny_teacher, tmp_path, **extra):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **extra))
    obj, data, meta = build_method(cfg)
    return obj, data, cfg


def test_dm_gradient_is_normalised_fake_minus_real():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    real, fake = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    loss, grad = dm_loss(x, real, fake)
    loss.backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / norm
    torch.testing.assert_close(grad, expected)
    # d/dx 0.5 * mean((x - sg(x - grad))^2) = grad / numel
    torch.testing.assert_close(x.grad, expected / x.numel())
    torch.testing.assert_close(loss, 0.5 * (expected**2).mean())


def test_dm_step_moves_samples_toward_real_score():
    """With a critic that reproduces the generator (fake_x0 = x), a DM step moves x toward mu_real."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=g, requires_grad=True)
    real = torch.randn(16, 1, 8, 8, generator=g)
    before = (x.detach() - real).pow(2).sum(dim=(1, 2, 3))
    loss, _ = dm_loss(x, real, x.detach())
    loss.backward()
    with torch.no_grad():
        x_new = x - 0.5 * x.numel() * x.grad
    after = (x_new - real).pow(2).sum(dim=(1, 2, 3))
    assert (after < before).all()


def test_dm_loss_nan_safe():
    """The documented gradient at the edges: the normaliser mean|x - mu_real| is floored at 1e-8, so x == mu_real
    gives (mu_fake - mu_real) / 1e-8 (finite), and x == mu_real == mu_fake (0/0: no signal) gives exactly 0;
    elsewhere DMD2's normalised direction, and the surrogate's gradient is grad / numel."""
    x = torch.zeros(3, 1, 4, 4)
    x[2] = 0.5
    x.requires_grad_(True)
    real = torch.zeros(3, 1, 4, 4)
    fake = torch.ones(3, 1, 4, 4)
    fake[1] = 0.0                                   # sample 1: x = mu_real = mu_fake
    loss, grad = dm_loss(x, real, fake)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    torch.testing.assert_close(grad[0], torch.full((1, 4, 4), 1.0 / 1e-8))  # floored normaliser
    assert torch.equal(grad[1], torch.zeros(1, 4, 4))                       # 0/0 -> no gradient
    torch.testing.assert_close(grad[2], torch.full((1, 4, 4), 1.0 / 0.5))  # (fake - real) / mean|x - real|
    loss.backward()
    torch.testing.assert_close(x.grad, grad / grad.numel())


def test_critic_learns_generator_distribution(tiny_teacher, tmp_path):
    """Critic updates on a fixed generator lower its denoising loss on the generator's samples."""
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"dmd.gan": "false"})
    critic = obj.players["critic"].module
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    obj.student.requires_grad_(False)

    def eval_loss():
        with torch.no_grad():
            return sum(obj.critic_loss(_ctx(100 + i, 16, data))[1]["fake_loss"] for i in range(4)) / 4

    first = eval_loss()
    for i in range(30):
        loss, _ = obj.critic_loss(_ctx(i, 16, data))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.9 * first


def test_gan_gradients_reach_the_right_players(tiny_teacher, tmp_path):
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"dmd.gan": "true", "dmd.dm_weight": 0.0})
    gen, critic = obj.players["generator"].module, obj.players["critic"].module
    # generator update: critic frozen (as the trainer core does), G loss flows through the critic into G
    critic.requires_grad_(False)
    gen.requires_grad_(True)
    loss, logs = obj.generator_loss(_ctx(0, 8, data))
    loss.backward()
    assert "gan_g_loss" in logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is None for p in obj.teacher.parameters())
    gen.zero_grad(set_to_none=True)
    # critic update: head and fake score get gradients, the generator none (samples are detached)
    critic.requires_grad_(True)
    gen.requires_grad_(False)
    loss, logs = obj.critic_loss(_ctx(1, 8, data))
    loss.backward()
    assert "gan_d_loss" in logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic["head"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic["fake"].parameters())
    assert all(p.grad is None for p in gen.parameters())


def test_backward_simulation_uses_students_own_chain(tiny_teacher, tmp_path):
    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"dmd.student_timesteps": "[999,749,499,249]"})
    calls = []
    orig_student, orig_teacher = obj.student.forward, obj.teacher.forward

    def spy_student(x_t, t, cond=None, **kw):
        calls.append(("student", float(t[0]), torch.is_grad_enabled(), x_t.clone()))
        return orig_student(x_t, t, cond, **kw)

    def spy_teacher(*a, **kw):
        calls.append(("teacher",))
        return orig_teacher(*a, **kw)

    obj.student.forward, obj.teacher.forward = spy_student, spy_teacher
    seen_k = set()
    for seed in range(12):
        calls.clear()
        ctx = _ctx(seed, 4, data)
        x0, k = obj.generate(ctx, obj.conds(ctx), grad=True)
        seen_k.add(k)
        assert [c[0] for c in calls] == ["student"] * (k + 1)     # teacher never used to make inputs
        assert [c[1] for c in calls] == obj.timesteps[:k + 1]     # the student's own chain t_0..t_k
        assert [c[2] for c in calls] == [False] * k + [True]      # only the last call carries grad
        assert x0.requires_grad
        if k > 0:  # the training input is a re-noised student output, not pure noise
            prev_in = calls[-2][3]
            assert not torch.allclose(calls[-1][3], prev_in)
    assert len(seen_k) > 1


def test_one_step_generate_feeds_pure_noise_at_t0(tiny_teacher, tmp_path):
    obj, data, cfg = _objective(tiny_teacher, tmp_path)
    seen = []
    orig = obj.student.forward
    obj.student.forward = lambda x_t, t, cond=None, **kw: (seen.append((x_t.clone(), t.clone())), orig(x_t, t, cond))[1]
    ctx = _ctx(3, 4, data)
    obj.generate(ctx, obj.conds(ctx), grad=False)
    ref = _ctx(3, 4, data)
    ref.randint(0, 10)  # the labels drawn first
    torch.testing.assert_close(seen[0][0], ref.randn(1, 16, 16))
    assert float(seen[0][1][0]) == 999.0


def test_two_time_scale_schedule(tiny_teacher, tmp_path):
    obj, _, _ = _objective(tiny_teacher, tmp_path, **{"dmd.critic_updates": 5})
    assert obj.updates(0) == ["critic"] * 5 + ["generator"]
    assert obj.players["generator"].betas[0] == 0.0 and obj.players["critic"].betas[0] == 0.0


def test_regression_pairs_are_cached_and_used(tiny_teacher, tmp_path):
    from stepdistill.pairs import teacher_ode_pairs

    obj, data, cfg = _objective(tiny_teacher, tmp_path, **{"method": "dmd", "dmd.gan": "false",
                                                           "dmd.regression_weight": 0.25, "dmd.regression_pairs": 8,
                                                           "dmd.regression_steps": 3})
    noise, labels, x0 = obj.pairs
    assert noise.shape == (8, 1, 16, 16) and x0.shape == noise.shape and x0.abs().max() <= 1.0
    again = teacher_ode_pairs(obj.teacher, cfg.dmd, 10, (1, 16, 16), seed=cfg.train.seed)
    assert torch.equal(again[2], x0)  # cache hit returns the identical tensors
    loss, logs = obj.generator_loss(_ctx(0, 8, data))
    assert logs["regression_loss"] > 0
