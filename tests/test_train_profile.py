"""`stepdistill bench --train` (profiling/train_profile.py) and the recipe options of the quality issue:
regression warm-up on teacher ODE pairs and fresh GAN noise levels."""
import json

import pytest
import torch

from stepdistill.frontends.cli import main
from stepdistill.config import DistillConfig, load_config
from stepdistill.profiling.train_profile import profile_training, tiny_teacher
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.distill import build_method

TINY = ["data.name=digits", "data.resolution=16", "dmd.teacher=custom", "train.batch_size=4", "train.cpu=true",
        "dmd.critic_updates=2", "dmd.regression_pairs=8", "dmd.regression_steps=2"]


def test_profile_fields_and_pass_counts():
    r = profile_training(None, ["train.batch_size=4", "dmd.critic_updates=3"], steps=2, warmup=0, tiny=True)
    assert r["model"] == "tiny_custom" and r["steps_timed"] == 2 and r["updates_per_step"] == 4
    # forwards per step: each critic update generates (student) and scores fake + real (critic, head);
    # the generator update: student, one critic pass (GAN features + mu_fake), one batched CFG teacher pass
    assert r["forward_calls_per_step"] == {"teacher": 1, "student": 4, "critic": 3 * 2 + 1, "head": 3 * 2 + 1}
    assert set(r["passes_s"]) == {"forward.teacher", "forward.student", "forward.critic", "forward.head", "backward"}
    assert all(v > 0 for v in r["passes_s"].values())
    assert r["sum_of_passes_s"] == pytest.approx(sum(r["passes_s"].values()))
    assert 0 < r["sum_of_passes_s"] < r["step_s"]
    assert r["step_over_passes"] == pytest.approx(r["step_s"] / r["sum_of_passes_s"])
    b = r["bookkeeping_s"]
    assert b["other"] == pytest.approx(r["step_s"] - r["sum_of_passes_s"] - b["optimizer"] - b["ema"])
    assert b["optimizer"] > 0 and b["ema"] > 0


def test_bench_train_cli_prints_json(capsys):
    assert main(["bench", "--train", "--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "train.batch_size=4", "dmd.critic_updates=1", "dmd.regression_weight=0"]) in (0, None)
    r = json.loads(capsys.readouterr().out)
    assert r["forward_calls_per_step"]["student"] == 2 and r["threads"] == 1


def test_bench_without_student_or_train_is_refused(capsys):
    assert main(["bench"]) == 2
    assert "--student is required" in capsys.readouterr().err


def _tiny_trainer(tmp_path, extra):
    teacher, meta = tiny_teacher()
    cfg = load_config(DistillConfig, None, TINY + [f"output_dir={tmp_path}"] + extra)
    obj, data, _ = build_method(cfg, teacher=teacher, meta=meta)
    return obj, Trainer(obj, cfg, data=data)


def test_regression_warmup_trains_the_generator_alone(tmp_path, monkeypatch):
    obj, tr = _tiny_trainer(tmp_path, ["dmd.regression_warmup_steps=2", "train.max_steps=3"])
    assert obj.pairs is not None and obj.pairs[0].shape == (8, 1, 16, 16)
    assert [obj.updates(s) for s in range(3)] == [["generator"], ["generator"], ["critic", "critic", "generator"]]
    critic0 = {k: v.clone() for k, v in obj.critic.backbone.state_dict().items()}
    student0 = {k: v.clone() for k, v in obj.student.backbone.state_dict().items()}
    calls = []
    monkeypatch.setattr(obj.teacher, "forward", lambda *a, **k: calls.append(1) or 1 / 0)  # never asked in warm-up
    logs = tr._run_step()
    tr.step, tr.update = 1, 0
    assert set(logs) >= {"regression_loss", "generator_loss"} and "dm_loss" not in logs and not calls
    assert logs["generator_loss"] == pytest.approx(logs["regression_loss"])
    assert all(torch.equal(v, critic0[k]) for k, v in obj.critic.backbone.state_dict().items())
    assert any(not torch.equal(v, student0[k]) for k, v in obj.student.backbone.state_dict().items())


def test_regression_warmup_config_is_checked():
    from stepdistill.config import ConfigError

    # a warm-up as long as the run trains a regression-only student (a smoke test may shorten max_steps)
    assert load_config(DistillConfig, None, ["dmd.regression_warmup_steps=10", "train.max_steps=5"])
    with pytest.raises(ConfigError, match="dmd.regression_warmup_steps"):
        load_config(DistillConfig, None, ["dmd.regression_warmup_steps=-1"])


def test_fresh_gan_t_scores_the_generator_at_its_own_noise_level(tmp_path):
    from stepdistill.trainers.objective import Ctx

    def spy(fn, seen):
        def wrapped(x_t, t, *a, **k):
            seen.append(t.clone())
            return fn(x_t, t, *a, **k)
        return wrapped

    times = {}
    for fresh in (False, True):
        obj, tr = _tiny_trainer(tmp_path / str(fresh), ["train.max_steps=1", f"dmd.gan_fresh_t={fresh}"])
        gan_t, dm_t = [], []
        obj.critic.x0_and_features = spy(obj.critic.x0_and_features, gan_t)  # GAN term on the DM step's x_t
        obj.critic.features = spy(obj.critic.features, gan_t)                # GAN term at its own t
        obj.teacher.forward = spy(obj.teacher.forward, dm_t)
        loss, logs = obj.generator_loss(Ctx(torch.Generator().manual_seed(3), 0, 1, 4, torch.device("cpu"), 0, tr.data))
        assert "gan_g_loss" in logs and "dm_loss" in logs and torch.isfinite(loss)
        assert len(gan_t) == 1 and len(dm_t) == 1
        times[fresh] = (gan_t[0], dm_t[0])
    assert torch.equal(*times[False])                  # DMD2 as before: the GAN term reuses the DM step's x_t
    g, d = times[True]
    assert not torch.equal(g, d) and g.min() >= 0 and g.max() <= 999


def test_quality_curve_scores_each_checkpoint_once(tiny_teacher, tmp_path, monkeypatch):
    from conftest import tiny_distill_overrides
    from stepdistill.eval import generate
    from stepdistill.trainers.distill import distill

    run = tmp_path / "run"
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, run))
    distill(cfg)                                    # checkpoints at steps 2 and 4
    calls = []
    real = generate.evaluate_model
    monkeypatch.setattr(generate, "evaluate_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    argv = ["curve", "--run", str(run), "--num", "20", "--ref", "digits", "--ref-num", "40", "--no-progress"]
    main(argv)
    c = json.loads((run / "curve" / "curve.json").read_text())
    assert [p["step"] for p in c["points"]] == [2, 4] and len(calls) == 2
    for p in c["points"]:
        assert p["num"] == 20 and p["seed"] == 0 and p["fid"] > 0
        assert 0 <= p["recall"] <= 1 and 0 <= p["precision"] <= 1 and 0 <= p["coverage"] <= 1
    # budget in sample passes: batch 8 x (2 critic updates x (1 + 2) + 1 + 1 + 2) per step
    assert c["passes_per_generator_step"] == 2 * 3 + 4
    assert [p["sample_passes"] for p in c["points"]] == [2 * 8 * 10, 4 * 8 * 10]
    assert (run / "curve" / "curve.png").stat().st_size > 1000
    main(argv)                                      # rerun: nothing new to score
    assert len(calls) == 2
