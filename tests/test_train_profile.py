"""`stepdistill bench --train` (profiling/train_profile.py) and the recipe options of the quality issue:
regression warm-up on teacher ODE pairs and fresh GAN noise levels."""
import json
from pathlib import Path

import pytest
import torch

from stepdistill.frontends.cli import main
from stepdistill.config import ConfigError, DistillConfig, load_config
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


def test_curve_pick_reads_class_accuracy_on_more_samples_when_measured():
    from stepdistill.eval.curve import pick_checkpoint

    pts = [{"step": 1000, "fid": 62.7, "class_accuracy": 0.976},
           {"step": 1100, "fid": 59.7, "class_accuracy": 0.972, "class_accuracy_more": {"num": 2000, "accuracy": 0.957}},
           {"step": 1600, "fid": 54.2, "class_accuracy": 0.966}]
    p = pick_checkpoint(pts, 0.97)
    assert p["step"] == 1000 and p["met_bar"] and p["class_accuracy"] == 0.976   # 1100 fails on the 2,000 samples
    assert pick_checkpoint(pts[1:], 0.97) == {"step": 1600, "fid": 54.2, "class_accuracy": 0.966, "met_bar": False,
                                               "rule": "lowest FID among checkpoints with class accuracy >= 0.97, "
                                                       "else the lowest FID"}                       # none passes
    assert pick_checkpoint(pts, 0.95)["step"] == 1600


def test_curve_scores_video_runs_by_per_frame_metrics_and_never_picks_collapsed_clips():
    from stepdistill.eval.curve import pick_checkpoint, video_aliases

    r = {"frame_fid": 36.8, "frame_precision": 0.09, "frame_recall": 0.58, "frame_class_accuracy": 0.32,
         "collapsed_frac": 0.0}
    assert video_aliases(r) == {"fid": 36.8, "precision": 0.09, "recall": 0.58, "class_accuracy": 0.32}
    assert video_aliases({"fid": 50.0, "class_accuracy": 0.9}) == {}          # image runs keep their own keys
    pts = [{"step": 1000, "fid": 40.0, "collapsed_frac": 0.0}, {"step": 1200, "fid": 33.0, "collapsed_frac": 0.023},
           {"step": 1400, "fid": 35.0, "collapsed_frac": 0.0}]
    p = pick_checkpoint(pts, 0.0)
    assert p["step"] == 1400 and p["met_bar"] and "no collapsed clip" in p["rule"]   # 1200 has empty clips
    assert pick_checkpoint(pts[1:2], 0.0)["step"] == 1200 and not pick_checkpoint(pts[1:2], 0.0)["met_bar"]


def test_pick_over_noise_seeds_reads_the_mean_and_excludes_a_collapse_on_any_seed():
    """--pick-with: P5 (BENCHMARKS "The regression pull off on video") read 30.1 / 31.8 at steps 800 / 1000 on seed 1
    and 30.2 / 31.8 on seed 2, with a collapsed clip at 1000 on seed 2 only."""
    from stepdistill.eval.curve import mean_points, pick_checkpoint

    s1 = {"points": [{"step": 600, "fid": 34.9, "collapsed_frac": 0.0}, {"step": 800, "fid": 30.1, "collapsed_frac": 0.0},
                     {"step": 1000, "fid": 31.8, "collapsed_frac": 0.0}]}
    s2 = {"points": [{"step": 800, "fid": 30.2, "collapsed_frac": 0.0},
                     {"step": 1000, "fid": 31.8, "collapsed_frac": 1 / 128}]}
    m = mean_points([s1, s2])
    assert [p["step"] for p in m] == [800, 1000]                     # 600 was not scored on seed 2
    assert m[0]["fid"] == pytest.approx(30.15) and m[0]["per_seed"] == [30.1, 30.2]
    assert m[1]["collapsed_frac"] == 1 / 128                            # a collapse on any seed counts
    assert pick_checkpoint(m, 0.0)["step"] == 800
    # the mean can reverse a one-seed pick: seed 1 alone prefers 1000, the mean prefers 800
    a = {"points": [{"step": 800, "fid": 31.0, "class_accuracy": 0.9}, {"step": 1000, "fid": 30.0, "class_accuracy": 0.9}]}
    b = {"points": [{"step": 800, "fid": 30.0, "class_accuracy": 0.8}, {"step": 1000, "fid": 32.0, "class_accuracy": 0.9}]}
    assert pick_checkpoint(a["points"], 0.0)["step"] == 1000
    mab = mean_points([a, b])
    assert pick_checkpoint(mab, 0.0)["step"] == 800 and mab[0]["class_accuracy"] == pytest.approx(0.85)
    assert pick_checkpoint(mab, 0.86)["step"] == 1000                  # the bar reads the mean accuracy too


def test_curve_scores_class_accuracy_on_more_noise_and_records_the_pick(tmp_path, monkeypatch):
    """``--acc-num``: the extra accuracy uses other noise (seed + 1) than the FID samples; ``--pick-acc`` writes the
    pick into curve.json and the printed JSON."""
    from stepdistill.eval import curve as C
    from stepdistill.eval import generate

    calls = []

    def fake_eval(folder, steps=None, num=0, seed=0, progress=False, **kw):
        step = int(Path(folder).name)
        return {"fid": {2: 50.0, 4: 40.0}[step], "class_accuracy": 0.99, "num": num, "seed": seed}

    def fake_acc(folder, num, seed, steps=None):
        calls.append((num, seed))
        return {"num": num, "seed": seed, "accuracy": {2: 0.98, 4: 0.90}[int(Path(folder).name)]}

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for s in (2, 4):
        (run / "checkpoints" / f"step_{s:06d}").mkdir()
        (run / "checkpoints" / f"step_{s:06d}" / "meta.json").write_text('{"wall_seconds": 1}')
    (run / "config.yaml").write_text("method: dmd2\n")

    import dataclasses

    from stepdistill import methods

    real_get = methods.get_method

    def get_method(name):  # the real record, exporting to a folder named by the step
        return dataclasses.replace(real_get(name), export=lambda modules, obj, cfg, meta, out: out / str(modules))

    monkeypatch.setattr(generate, "evaluate_model", fake_eval)
    monkeypatch.setattr(generate, "class_accuracy_of", fake_acc)
    monkeypatch.setattr(methods, "get_method", get_method)
    monkeypatch.setattr("stepdistill.trainers.loading.load_trained", lambda cfg, ckpt: (int(ckpt.name[5:]), None, None))
    monkeypatch.setattr(C, "plot_curve", lambda curve, path: path)
    monkeypatch.setattr(C.tempfile, "TemporaryDirectory", lambda: _Here(tmp_path))
    res = C.quality_curve(run, num=20, seed=3, acc_num=100, pick_acc=0.95, out=tmp_path / "c")
    assert calls == [(100, 4), (100, 4)]
    assert [p["class_accuracy_more"]["accuracy"] for p in res["points"]] == [0.98, 0.90]
    assert res["pick"]["step"] == 2 and res["pick"]["met_bar"]   # step 4 has the lower FID but fails the bar
    saved = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert saved["pick"] == res["pick"] and saved["acc_num"] == 100
    with pytest.raises(ConfigError, match="acc_num=100"):       # another --acc-num into the same file: refused
        C.quality_curve(run, num=20, seed=3, acc_num=0, out=tmp_path / "c")
    with pytest.raises(ConfigError, match="--pick-acc"):
        C.quality_curve(run, num=20, seed=3, pick_acc=1.5, out=tmp_path / "d")
    # --pick-with: another noise seed's curve of the same run; the pick reads the mean of the two
    other = {"run": str(run), "num": 20, "seed": 7,
             "points": [{"step": 2, "fid": 50.0, "class_accuracy": 0.98}, {"step": 4, "fid": 20.0, "class_accuracy": 1.0}]}
    (tmp_path / "seed7.json").write_text(json.dumps(other))
    res = C.quality_curve(run, num=20, seed=3, acc_num=100, pick_acc=0.94, out=tmp_path / "c",
                          pick_with=[tmp_path / "seed7.json"])
    assert res["pick"]["step"] == 4 and res["pick"]["seeds"] == [3, 7]   # 4 now passes: (0.90 + 1.0) / 2 >= 0.94
    assert res["pick"]["fid"] == pytest.approx(30.0) and "mean over noise seeds 3, 7" in res["pick"]["rule"]
    scored = len(calls)
    for bad, msg in (({**other, "seed": 3}, "at another seed"), ({**other, "run": "elsewhere"}, "is not this run"),
                     ({**other, "num": 500}, "num=500")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=msg):     # a fresh --out: refused before any checkpoint is scored
            C.quality_curve(run, num=20, seed=3, acc_num=100, pick_acc=0.95, out=tmp_path / "fresh",
                            pick_with=[tmp_path / "bad.json"])
    with pytest.raises(ConfigError, match="seed=7 is not this run"):   # two curves at one seed count once, not twice
        C.quality_curve(run, num=20, seed=3, acc_num=100, pick_acc=0.95, out=tmp_path / "fresh",
                        pick_with=[tmp_path / "seed7.json", tmp_path / "seed7.json"])
    assert len(calls) == scored and not (tmp_path / "fresh" / "curve.json").exists()
    with pytest.raises(ConfigError, match="needs --pick-acc"):
        C.quality_curve(run, num=20, seed=3, acc_num=100, out=tmp_path / "c", pick_with=[tmp_path / "seed7.json"])
    with pytest.raises(ConfigError, match="no such curve.json"):
        C.quality_curve(run, num=20, seed=3, acc_num=100, pick_acc=0.9, out=tmp_path / "c", pick_with=[tmp_path / "x"])


class _Here:
    def __init__(self, root):
        self.root = root

    def __enter__(self):
        (self.root / "tmp").mkdir(exist_ok=True)
        return str(self.root / "tmp")

    def __exit__(self, *exc):
        return False
