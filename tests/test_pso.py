"""PSO (Pairwise Sample Optimization): loss value and direction on a closed-form toy, reference caching,
online refresh from the current model, preference pairs, config checks, and a tiny end-to-end tune."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, OptimConfig, load_config
from stepdistill.trainers.pso import PSOConfig
from stepdistill.data import ArrayDataset, DataError
from stepdistill.denoiser import Denoiser
from stepdistill.schedules import VPSchedule
from stepdistill.trainers import losses, pso, pso_data
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.objective import Ctx
from stepdistill.trainers.distill import build_method, distill


def _ctx(seed=0, batch=8, step=0):
    return Ctx(torch.Generator().manual_seed(seed), 0, 1, batch, torch.device("cpu"), step, None)


# -- a closed-form toy: a Gaussian "generator" --------------------------------------------------
class ConstGen(nn.Module):
    """G(x_t, t) = mu: a one-step model whose sample law, with a Gaussian decoder N(mu, s^2 I), has the
    closed-form log-likelihood log p(x) = -||x - mu||^2 / (2 s^2) + const (s = 1 here)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float32).clone())

    def forward(self, x_t, t, cond):
        return self.mu.view(1, -1, 1, 1).expand_as(x_t)


def _toy_model(mu):
    sched = VPSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                              "prediction_type": "sample"})
    return Denoiser(ConstGen(mu), sched, "sample")


def _log_p(x, mu):  # (B, C, 1, 1), (C,) -> (B,)
    return -0.5 * (x - mu.view(1, -1, 1, 1)).pow(2).flatten(1).sum(1)


def _toy_pso(beta=4.0, n=8, timesteps=(), weights=()):
    g = torch.Generator().manual_seed(0)
    x_tgt = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1) + 0.3 * torch.randn(n, 2, 1, 1, generator=g)
    x_rej = torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1) + 0.3 * torch.randn(n, 2, 1, 1, generator=g)
    cfg = PSOConfig(beta=beta, timesteps=list(timesteps), weights=list(weights), optim=OptimConfig(lr=0.1))
    model = _toy_model([0.0, 0.0])
    obj = pso.PSOObjective(model, cfg, [999.0], ArrayDataset(x_tgt, torch.zeros(n, dtype=torch.long), ["all"]),
                           conditional=False, rejected=x_rej)
    return obj, x_tgt, x_rej


def test_loss_is_log2_at_init_and_gradient_is_closed_form():
    beta, n = 4.0, 8
    obj, x_tgt, x_rej = _toy_pso(beta, n)
    mu = obj.players["generator"].module.mu
    loss, logs = obj.loss("generator", _ctx(3, n))
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))       # theta == ref: margin 0
    assert logs["pso_margin"] == 0.0
    loss.backward()
    idx = _ctx(3, n).randint(0, n)                                         # the batch the loss drew
    # dL/dmu = -beta sigmoid(0) * mean_b d(margin_b)/dmu, d(margin)/dmu = (2 / D) (x_tgt - x_rej), D = 2
    expected = -beta * 0.5 * (2 / 2) * (x_tgt[idx] - x_rej[idx]).mean(0).flatten()
    torch.testing.assert_close(mu.grad, expected)


@pytest.mark.parametrize("timesteps,weights", [((), ()), ((999.0, 499.0), (0.25, 0.75))])
def test_gradient_step_raises_relative_likelihood_of_targets_lowers_references(timesteps, weights):
    obj, x_tgt, x_rej = _toy_pso(4.0, 8, timesteps, weights)
    assert obj.timesteps == [float(t) for t in (timesteps or (999.0,))]
    gen = obj.players["generator"].module
    mu0 = gen.mu.detach().clone()
    loss, _ = obj.loss("generator", _ctx(0, 8))
    loss.backward()
    with torch.no_grad():
        gen.mu -= 0.1 * gen.mu.grad
    mu1 = gen.mu.detach()
    # closed-form relative log-likelihoods log p_theta(x) - log p_ref(x)
    rel_tgt = (_log_p(x_tgt, mu1) - _log_p(x_tgt, mu0)).mean()
    rel_rej = (_log_p(x_rej, mu1) - _log_p(x_rej, mu0)).mean()
    assert rel_tgt > 0 > rel_rej
    # and the surrogate margin of the next loss is positive, the loss below log 2
    loss2, logs = obj.loss("generator", _ctx(0, 8))
    assert logs["pso_margin"] > 0 and loss2 < math.log(2.0)
    assert logs["pso_delta_tgt"] > 0 > logs["pso_delta_ref"]


def test_loss_saturates_and_sign_of_pso_loss():
    e = torch.tensor([[1.0], [2.0]])
    w = torch.tensor([1.0])
    # theta denoises targets better than ref and references worse: margin > 0, loss < log 2
    loss, margin = losses.pso_loss(e * 0.5, e, e * 2, e, w, beta=1.0)
    assert (margin > 0).all() and loss < math.log(2)
    loss_bad, _ = losses.pso_loss(e * 2, e, e * 0.5, e, w, beta=1.0)
    assert loss_bad > math.log(2)
    big, _ = losses.pso_loss(e * 0.5, e, e * 2, e, w, beta=100.0)
    assert big < 1e-6                                          # saturated: the implicit regulariser


def test_naive_objective_is_the_denoising_loss():
    x = torch.randn(6, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    obj = pso.NaiveFinetuneObjective(_toy_model([0.5, -0.5]), PSOConfig(), [999.0],
                                     ArrayDataset(x, torch.zeros(6, dtype=torch.long), ["all"]), False)
    loss, _ = obj.loss("generator", _ctx(1, 6))
    idx = _ctx(1, 6).randint(0, 6)
    expected = (x[idx] - torch.tensor([0.5, -0.5]).view(1, 2, 1, 1)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


# -- tiny distilled student ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_student(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("pso_student")
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(
        tiny_teacher, out, **{"train.max_steps": 2, "train.checkpoint_every": 2, "dmd.student_timesteps": "[999,499]"}))
    return distill(cfg)


def _pso_cfg(student, out, **extra):
    base = {"output_dir": str(out), "method": "pso", "pso.model": str(student), "data.name": "digits",
            "data.resolution": 16, "pso.num_reference": 16, "pso.lr": 1e-3, "pso.beta": 5.0,
            "train.batch_size": 4, "train.max_steps": 3, "train.sample_every": 100, "train.checkpoint_every": 100,
            "train.log_every": 1, "train.threads": 1, "train.cpu": "true"}
    base.update(extra)
    return load_config(DistillConfig, None, [f"{k}={v}" for k, v in base.items()])


def test_offline_references_are_cached_by_weights_and_settings(tiny_student, tmp_path, monkeypatch):
    cfg = _pso_cfg(tiny_student, tmp_path, **{"pso.target_classes": "[1,2]"})
    obj, target, meta = build_method(cfg)
    assert isinstance(obj, pso.PSOObjective) and meta.student_timesteps == [999.0, 499.0]
    assert set(obj.pool.labels.tolist()) == {1, 2} and obj.pool.images.shape == (16, 1, 16, 16)
    first = obj.pool.images.clone()
    calls = []
    real_draw = pso.draw_references
    monkeypatch.setattr(pso, "draw_references", lambda *a, **k: calls.append(1) or real_draw(*a, **k))
    obj2, _, _ = build_method(cfg)                                   # hit: nothing sampled, same tensors
    assert obj2.reference_cache_hit and not calls and obj2.reference_cache == obj.reference_cache
    assert torch.equal(obj2.pool.images, first)
    for over in ({"pso.num_reference": 12}, {"train.seed": 1}, {"pso.target_classes": "[1,3]"}):
        o, _, _ = build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.target_classes": "[1,2]", **over}))
        assert not o.reference_cache_hit and o.reference_cache != obj.reference_cache, over
    # a different model (same settings) misses too
    from stepdistill.models import load_denoiser

    den, m = load_denoiser(str(tiny_student))
    with torch.no_grad():
        next(den.backbone.parameters()).add_(0.01)
    o, _, _ = pso.build_pso(cfg, model=den, meta=m)
    assert not o.reference_cache_hit and o.reference_cache != obj.reference_cache
    assert len(calls) == 4


def test_references_share_the_target_condition(tiny_student, tmp_path):
    obj, target, _ = build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.target_classes": "[1,2,5]"}))
    labels = torch.tensor([5, 1, 2, 2, 5, 1])
    u = torch.linspace(0, 0.99, 6, dtype=torch.float64)
    picked = obj.pool.pick(labels, u)
    lut = {tuple(img.flatten().tolist()): int(lab) for img, lab in zip(obj.pool.images, obj.pool.labels)}
    assert [lut[tuple(p.flatten().tolist())] for p in picked] == labels.tolist()


def test_online_refresh_every_n_steps_from_the_current_model(tiny_student, tmp_path):
    cfg = _pso_cfg(tiny_student, tmp_path, **{"pso.mode": "online", "pso.refresh_every": 2, "train.max_steps": 5,
                                              "pso.num_reference": 8})
    obj, data, _ = build_method(cfg)
    assert obj.pool is None and obj.players["generator"].module is obj.student.backbone
    seen = []
    real = obj.draw_online

    def spy(step):
        state = {k: v.clone() for k, v in obj.student.backbone.state_dict().items()}  # the live weights now
        pool = real(step)
        seen.append((step, state, pool.images.clone()))
        return pool

    obj.draw_online = spy
    Trainer(obj, cfg, data=data).train()
    assert [s for s, _, _ in seen] == [0, 2, 4] and obj.refreshes == [0, 2, 4]
    init = obj.reference.backbone.state_dict()
    for step, state, images in seen:
        changed = any(not torch.equal(state[k], init[k]) for k in state)
        assert changed == (step > 0)                                    # step 0 is the initial model
        copy_den, _ = pso.load_denoiser(str(tiny_student))
        copy_den.backbone.load_state_dict(state)
        redo = pso.draw_references(copy_den, obj.sample_timesteps, pso.reference_labels(obj.classes, 8),
                                   obj.shape, obj.online_seed(step))
        torch.testing.assert_close(images, redo)                      # drawn from exactly those weights


def test_online_resume_reuses_the_checkpointed_pool(tiny_student, tmp_path):
    def run(out, steps, resume=False):
        cfg = _pso_cfg(tiny_student, out, **{"pso.mode": "online", "pso.refresh_every": 2, "train.max_steps": steps})
        obj, data, _ = build_method(cfg)
        Trainer(obj, cfg, data=data).train(resume=resume)
        return obj

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert full.refreshes == [0, 2] and resumed.refreshes == []        # step 3 used the pool saved at step 3
    for p, q in zip(full.student.backbone.parameters(), resumed.student.backbone.parameters()):
        assert torch.equal(p, q)


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


def test_preference_pairs_folder_and_file(tmp_path, tiny_student, monkeypatch):
    root = tmp_path / "pairs"
    for cls, name, c, r in (("1", "a", 250, 10), ("2", "b", 240, 20), ("2", "c", 230, 30)):
        _png(root / "chosen" / cls / f"{name}.png", c)
        _png(root / "rejected" / cls / f"{name}.png", r)
    names = [str(i) for i in range(10)]
    ch, rj, lab = pso_data.load_preference_pairs(root, 16, 1, names)
    assert lab.tolist() == [1, 2, 2] and (ch > 0.5).all() and (rj < -0.5).all()
    _png(root / "chosen" / "2" / "d.png", 0)
    with pytest.raises(DataError, match="only one of chosen/ and rejected/"):
        pso_data.load_preference_pairs(root, 16, 1, names)
    from safetensors.torch import save_file

    f = tmp_path / "pairs.safetensors"
    save_file({"chosen": ch.contiguous(), "rejected": rj.contiguous(), "labels": lab}, str(f))
    obj, target, _ = build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.pairs": str(f)}))
    assert obj.mode == "pairs" and obj.pool is None
    seen = []
    real = pso.squared_errors
    monkeypatch.setattr(pso, "squared_errors", lambda den, x, c, ts, e: seen.append((x, c)) or real(den, x, c, ts, e))
    loss, _ = obj.loss("generator", _ctx(0, 4))
    idx = _ctx(0, 4).randint(0, 3)
    x, c = seen[0]
    assert torch.equal(x[:4], ch[idx]) and torch.equal(x[4:], rj[idx])  # target = chosen, reference = rejected
    assert torch.equal(c, torch.cat([lab[idx], lab[idx]]))               # same conditions
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))


def test_config_checks_name_the_key(tiny_student, tmp_path):
    ok = load_config(DistillConfig, None, ["method=pso", "pso.naive=true"])
    assert ok.method == "pso_naive"                                    # one switch, two spellings
    assert load_config(DistillConfig, None, ["method=pso_naive"]).pso.naive is True
    for over, key in ((["pso.mode=sometimes"], "pso.mode"), (["pso.beta=0"], "pso.beta"),
                      (["pso.refresh_every=0"], "pso.refresh_every"),
                      (["pso.target_transform=blur"], "pso.target_transform"),
                      (["pso.timesteps=[499,999]"], "pso.timesteps"), (["pso.weights=[-1]"], "pso.weights"),
                      (["pso.pairs=x.safetensors", "pso.target_transform=invert"], "pso.pairs"),
                      (["pso.pairs=x.safetensors", "pso.mode=online"], "pso.mode"), (["pso.modle=x"], "pso.modle")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(DistillConfig, None, ["method=pso", *over])
    with pytest.raises(ValueError, match="pso.target_classes"):
        build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.target_classes": "[cat]"}))
    with pytest.raises(ValueError, match="pso.weights"):
        build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.weights": "[1.0]"}))     # 2-step model: 2 weights


def test_target_transform_and_class_subset(tiny_student, tmp_path):
    from stepdistill.data import digits

    obj, target, _ = build_method(_pso_cfg(tiny_student, tmp_path, **{"pso.target_transform": "invert",
                                                                    "pso.target_classes": "['3', 7]"}))
    d = digits(16, "train")
    keep = (d.labels == 3) | (d.labels == 7)
    assert torch.equal(target.images, -d.images[keep]) and set(target.labels.tolist()) == {3, 7}
    assert obj.conds.grid(4, "cpu").tolist() == [3, 7, 3, 7]


@pytest.mark.parametrize("method", ["pso", "pso_naive"])
def test_end_to_end_tune_export_reload(tiny_student, tmp_path, method):
    from stepdistill.models import load_denoiser
    from stepdistill.pipelines.student import StepDistillPipeline

    cfg = _pso_cfg(tiny_student, tmp_path, **{"method": method, "pso.target_transform": "invert",
                                              "pso.target_classes": "[1,2]"})
    out = distill(cfg)
    meta = json.loads((out / "stepdistill.json").read_text())
    assert meta["student_timesteps"] == [999.0, 499.0] and meta["method"] == method
    assert meta["extra"]["base_model"] == str(tiny_student)
    assert json.loads((out / "model_index.json").read_text())["student_timesteps"] == [999.0, 499.0]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and ("pso_loss" if method == "pso" else "naive_loss") in log[-1]
    if method == "pso":
        assert abs(log[0]["pso_loss"] - math.log(2)) < 1e-6
    pipe = StepDistillPipeline.from_pretrained(out)
    assert pipe.config.student_timesteps == [999.0, 499.0]
    x = pipe(class_labels=[1, 2], seed=0, output_type="pt").images
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    tuned, _ = load_denoiser(out)
    base, _ = load_denoiser(str(tiny_student))
    assert any(not torch.equal(p, q) for p, q in zip(tuned.backbone.parameters(), base.backbone.parameters()))
    # `stepdistill export` path: EMA weights from the checkpoint, the base model's scheduler and timesteps
    from stepdistill.methods import get_method
    from stepdistill.trainers.loading import load_trained

    g = load_trained(cfg)[0]["generator"]
    obj2, _, meta2 = build_method(cfg)
    again = get_method(cfg.method).export({"generator": g}, obj2, cfg, meta2, tmp_path / "exported")
    assert json.loads((again / "stepdistill.json").read_text())["student_timesteps"] == [999.0, 499.0]
    re, _ = load_denoiser(again)
    assert all(torch.equal(p, q) for p, q in zip(re.backbone.parameters(), tuned.backbone.parameters()))


# -- the pure-noise step: soft-min (KDE) likelihood, DPO-Positive anchor, bold transform ------------
class Identity(nn.Module):
    def forward(self, x_t, t, cond):
        return x_t


def _identity_model():
    sched = VPSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                              "prediction_type": "sample"})
    return Denoiser(Identity(), sched, "sample")


def test_softmin_errors_limits_and_gradient_goes_to_the_nearest_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    z = torch.randn(3, 5, 2, 4, 4, generator=g).requires_grad_(True)
    d = (z - x.unsqueeze(1)).pow(2).flatten(2).mean(2)                           # (3, 5)
    den = _identity_model()
    sharp = pso.softmin_errors(den, x, None, 999.0, z, tau=1e-4)
    torch.testing.assert_close(sharp, d.min(1).values, atol=1e-3, rtol=0)     # tau -> 0: the nearest sample
    flat = pso.softmin_errors(den, x, None, 999.0, z, tau=1e3)
    torch.testing.assert_close(flat, d.mean(1), atol=3e-3, rtol=0)            # tau -> inf: the forward surrogate
    sharp.sum().backward()
    norms = z.grad.flatten(2).norm(dim=2)                                      # (3, 5)
    nearest = d.argmin(1)
    assert (norms.argmax(1) == nearest).all()
    assert (norms[torch.arange(3), nearest] > 0.99 * norms.sum(1)).all()


def test_auto_likelihood_uses_kde_for_the_pure_noise_first_step_only():
    x = torch.zeros(4, 2, 1, 1)
    data = ArrayDataset(x, torch.zeros(4, dtype=torch.long), ["all"])

    def cols(sample_ts, **kw):
        return pso.PSOObjective(_toy_model([0.0, 0.0]), PSOConfig(**kw), sample_ts, data, False,
                                rejected=x).kde_columns

    assert cols([999.0]) == [0]
    assert cols([999.0], timesteps=[999.0, 499.0]) == [0]
    assert cols([999.0, 499.0], timesteps=[499.0]) == []     # t_0 not among the likelihood timesteps
    assert cols([749.0, 249.0]) == []                          # x_749 still carries the image: forward surrogate
    assert cols([999.0], likelihood="forward") == []
    assert cols([749.0, 249.0], likelihood="kde") == [0]


def test_kde_margin_rewards_a_model_that_moves_its_samples_to_the_targets():
    """A one-step model G(z) = z + b sampling from pure noise: under the forward surrogate a target and a
    reference at the same distance from E[G] look alike; the soft-min likelihood credits the nearest samples."""
    obj, x_tgt, x_rej = _toy_pso(4.0, 8)
    gen = obj.players["generator"].module
    gen.forward = lambda x_t, t, cond: 0.5 * x_t + gen.mu.view(1, -1, 1, 1)      # samples spread around mu
    obj.reference.backbone.forward = lambda x_t, t, cond: 0.5 * x_t             # the frozen copy (mu = 0)
    obj.cfg.kde_samples, obj.cfg.kde_tau = 16, 0.05
    loss, logs = obj.loss("generator", _ctx(0, 8))
    assert abs(loss.item() - math.log(2)) < 1e-6 and obj.kde_columns == [0]
    loss.backward()
    assert float(gen.mu.grad @ (x_tgt - x_rej).mean(0).flatten()) < 0              # descent moves mu toward the targets


def test_target_anchor_penalises_a_falling_target_likelihood():
    e = torch.tensor([[1.0], [1.0]])
    w = torch.tensor([1.0])
    # theta got worse on the targets (err 1.5 > 1.0) but much worse on the references: a positive plain margin ...
    _, plain = losses.pso_loss(e * 1.5, e, e * 3.0, e, w, beta=1.0)
    _, anchored = losses.pso_loss(e * 1.5, e, e * 3.0, e, w, beta=1.0, anchor=10.0)
    torch.testing.assert_close(plain, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(anchored, plain - 10.0 * 0.5)                  # ... that the anchor turns negative
    _, better = losses.pso_loss(e * 0.5, e, e * 3.0, e, w, beta=1.0, anchor=10.0)
    torch.testing.assert_close(better, torch.tensor([2.5, 2.5]))              # no penalty while targets improve


def test_bold_transform_and_likelihood_keys_are_checked():
    x = -torch.ones(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    b = pso_data.apply_transform(x, "bold")
    assert int((b > 0).sum()) == 9 and b[0, 0, 1:4, 1:4].eq(1).all()
    for over, key in ((["pso.likelihood=exact"], "pso.likelihood"), (["pso.kde_tau=0"], "pso.kde_tau"),
                      (["pso.target_anchor=-1"], "pso.target_anchor"), (["pso.target_transform=blur"],
                                                                         "pso.target_transform")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(DistillConfig, None, ["method=pso", *over])
