"""The pixel-space patch discriminator of DMD / DMD2 (``dmd.pixel_gan_*``, trainers/pixel_gan.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.distill import build_method
from stepdistill.trainers.losses import pixel_d_loss, pixel_g_loss
from stepdistill.trainers.pixel_gan import PixelDiscriminator, labels_of

PIXEL = {"dmd.gan": "true", "dmd.pixel_gan_g_weight": 0.05, "dmd.pixel_gan_r1": 0.1}


def _objective(tiny_teacher, tmp_path, **extra):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **extra))
    obj, data, _ = build_method(cfg)
    return obj, data, cfg


def _ctx(seed, data, step=5):
    return Ctx(torch.Generator().manual_seed(seed), 0, 1, 8, torch.device("cpu"), step, data)


def test_discriminator_shapes_and_zero_initialised_projection():
    torch.manual_seed(0)
    d = PixelDiscriminator(1, width=8, num_classes=10)
    x = torch.randn(5, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4])
    assert d(x).shape == (5,)
    assert torch.equal(d(x), d(x, y))  # the projection starts at zero: an unconditional D
    torch.nn.init.normal_(d.embed.weight)
    assert not torch.allclose(d(x), d(x, y))  # and then depends on the label
    assert labels_of(y) is y and labels_of(torch.randn(5, 4)) is None and labels_of(None) is None


def test_discriminator_learns_texture_and_its_g_loss_removes_it():
    """Real: smooth blobs; fake: the same blobs plus pixel speckle. D must separate them, and the
    generator loss's gradient must point against the speckle."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")

    def blobs(n):
        c = torch.rand(n, 2, 1, 1, generator=g) - 0.5
        return torch.exp(-((xx - c[:, :1]) ** 2 + (yy - c[:, 1:]) ** 2) * 4) * 2 - 1  # (n, 1, 16, 16)

    d = PixelDiscriminator(1, width=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    for _ in range(150):
        real, base = blobs(32), blobs(32)
        fake = base + 0.3 * torch.randn(base.shape, generator=g)
        loss, logs = pixel_d_loss(d, fake, None, real, None, r1=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["pixel_d_real_acc"] > 0.9 and logs["pixel_d_fake_acc"] > 0.9
    assert logs["pixel_d_loss"] < 0.5 and logs["pixel_d_r1"] > 0
    # the G loss's descent direction reduces the speckle: a small step along -grad lowers the high-pass energy
    base = blobs(16)
    noise = 0.3 * torch.randn(base.shape, generator=g)
    fake = (base + noise).requires_grad_(True)
    l_g = pixel_g_loss(d, fake, None)
    (grad,) = torch.autograd.grad(l_g, fake)
    cos = F.cosine_similarity(grad.flatten(), noise.flatten(), dim=0)
    assert cos > 0.1  # descending -grad removes noise
    assert pixel_g_loss(d, (fake - 5 * grad).detach(), None) < l_g


def test_r1_penalty_is_the_gradient_norm_of_d_on_real_data():
    torch.manual_seed(0)
    d = PixelDiscriminator(1, width=4)
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    plain, _ = pixel_d_loss(d, fake, None, real, None, r1=0.0)
    with_r1, logs = pixel_d_loss(d, fake, None, real, None, r1=2.0)
    x = real.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(d(x).sum(), x)
    pen = gx.pow(2).flatten(1).sum(1).mean()
    assert logs["pixel_d_r1"] == pytest.approx(pen.item(), rel=1e-5)
    assert with_r1.item() == pytest.approx(plain.item() + pen.item(), rel=1e-5)


def test_pixel_discriminator_trains_with_the_critic_and_pulls_the_generator(tiny_teacher, tmp_path):
    ref, _, _ = _objective(tiny_teacher, tmp_path / "ref", **{"dmd.gan": "true"})
    assert ref.pixel_disc is None and "pixel_disc" not in ref.players["critic"].module  # off by default
    obj, data, cfg = _objective(tiny_teacher, tmp_path / "px", **PIXEL)
    gen, critic = obj.players["generator"].module, obj.players["critic"].module
    assert critic["pixel_disc"] is obj.pixel_disc and obj.pixel_disc.embed is not None  # class-conditional teacher
    # critic update: the pixel D gets gradients with the fake score and the head; the generator none
    gen.requires_grad_(False)
    loss, logs = obj.critic_loss(_ctx(1, data))
    loss.backward()
    assert {"pixel_d_loss", "pixel_d_real_acc", "pixel_d_fake_acc", "pixel_d_r1"} <= set(logs)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic["pixel_disc"].parameters())
    assert all(p.grad is None for p in gen.parameters())
    critic.zero_grad(set_to_none=True)
    # generator update: the G term adds pixel_gan_g_weight * softplus(-D(x)) and reaches the generator only
    critic.requires_grad_(False)
    gen.requires_grad_(True)
    loss, logs = obj.generator_loss(_ctx(2, data))
    loss.backward()
    assert logs["pixel_gan_g_loss"] > 0
    assert all(p.grad is None for p in critic.parameters())
    g_on = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad(set_to_none=True)
    obj.cfg.pixel_gan_g_weight = 0.0  # same draws without the term: a different gradient
    loss0, logs0 = obj.generator_loss(_ctx(2, data))
    loss0.backward()
    assert loss.item() - loss0.item() == pytest.approx(0.05 * logs["pixel_gan_g_loss"], rel=1e-4, abs=1e-7)
    assert any(not torch.equal(a, p.grad) for a, p in zip(g_on, gen.parameters()))


def test_pixel_discriminator_is_checkpointed_and_resume_is_exact(tiny_teacher, tmp_path):
    def trainer(out, **extra):
        cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, out, **PIXEL, **extra))
        obj, data, _ = build_method(cfg)
        return Trainer(obj, cfg, data=data)

    trainer(tmp_path / "full").train()
    trainer(tmp_path / "part", **{"train.max_steps": 2}).train()
    trainer(tmp_path / "part").train(resume=True)
    a = load_file(tmp_path / "full" / "checkpoints" / "step_000004" / "models.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "step_000004" / "models.safetensors")
    keys = [k for k in a if "pixel_disc" in k]
    assert keys and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_gan_config_is_checked(tiny_teacher, tmp_path):
    def cfg(**extra):
        return load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **extra))

    with pytest.raises(ConfigError, match="dmd.pixel_gan_g_weight"):
        cfg(**{"dmd.pixel_gan_g_weight": -1})
    with pytest.raises(ConfigError, match="dmd.pixel_gan_r1"):
        cfg(**{"dmd.pixel_gan_r1": -0.5})
    with pytest.raises(ConfigError, match="dmd.pixel_gan_width"):
        cfg(**{"dmd.pixel_gan_width": 0})
    with pytest.raises(ConfigError, match="dmd.pixel_gan_g_weight.*dmd / dmd2 / msd only, not phased_dmd"):
        cfg(**{"method": "phased_dmd", "dmd.pixel_gan_g_weight": 0.1})


def test_pixel_discriminator_has_its_own_learning_rate(tiny_teacher, tmp_path):
    def groups(**extra):
        cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **PIXEL, **extra))
        obj, data, _ = build_method(cfg)
        tr = Trainer(obj, cfg, data=data)
        tr._run_step()  # the lr is re-set at every update (warm-up schedule): the scale must survive it
        return obj, tr.opts["critic"].param_groups

    obj, (g,) = groups()  # pixel_gan_lr 0: one group at dmd.critic_optim.lr, as without the discriminator
    assert g["lr"] == 1e-4 and "lr_scale" not in g
    obj, (rest, pix) = groups(**{"dmd.pixel_gan_lr": 1e-3})
    assert rest["lr"] == 1e-4 and pix["lr"] == pytest.approx(1e-3)
    assert {id(q) for q in pix["params"]} == {id(q) for q in obj.pixel_disc.parameters()}
    assert not {id(q) for q in rest["params"]} & {id(q) for q in pix["params"]}
