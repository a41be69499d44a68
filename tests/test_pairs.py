"""Teacher ODE pairs shipped with the package: used only for the key they were made for, and equal to computing them."""
from __future__ import annotations

import torch

from stepdistill import pairs as P


def test_shipped_main_job_pairs_equal_the_teachers_own(monkeypatch, tmp_path):
    """The shipped file is what the teacher computes: its labels are the seed's draw, and the first teacher outputs,
    recomputed here batch for batch as the trainer's build does, match it."""
    from stepdistill.config import DistillConfig, load_config
    from stepdistill.pipelines.sampling import make_scheduler, scheduler_sample
    from stepdistill.trainers.setup import prepare

    torch.set_num_threads(1)
    cfg = load_config(DistillConfig, "configs/dmd2_animal_mnist.yaml", [f"output_dir={tmp_path}"])
    s = prepare(cfg)
    shape = tuple(s.data.images.shape[1:])
    key = P.pairs_key(s.teacher, cfg.dmd, s.num_classes, shape, cfg.train.seed, s.conds)
    shipped = P.shipped_pairs(key)
    assert shipped is not None, f"no shipped pairs for the main job's key {key}"
    n = cfg.dmd.regression_pairs
    assert shipped["x0"].shape == (n, *shape) and shipped["x0"].dtype == torch.float32
    g = torch.Generator().manual_seed(cfg.train.seed)
    noise = torch.randn(n, *shape, generator=g)
    labels = torch.randint(0, s.num_classes, (n,), generator=g)
    assert torch.equal(shipped["labels"], labels)
    sched_cfg = dict(s.teacher.schedule.config)
    sched_cfg.setdefault("prediction_type", s.teacher.prediction_type)
    k = 4  # a few pairs: 25 DDIM steps with CFG each
    x0 = scheduler_sample(s.teacher, make_scheduler("ddim", sched_cfg), labels[:k], cfg.dmd.regression_steps,
                          cfg.dmd.real_guidance_scale, noise[:k])
    assert torch.allclose(x0, shipped["x0"][:k], atol=1e-4), (x0 - shipped["x0"][:k]).abs().max()
    # and the trainer's call returns the shipped outputs with the redrawn noise, without computing anything
    monkeypatch.setattr(P, "scheduler_sample", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("computed")))
    got_noise, got_labels, got_x0 = P.teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape,
                                                        seed=cfg.train.seed, conds=s.conds, cache=tmp_path / "c")
    assert torch.equal(got_noise, noise) and torch.equal(got_labels, labels) and torch.equal(got_x0, shipped["x0"])


def test_shipped_pairs_are_used_only_when_their_labels_match(tiny_teacher, tmp_path, monkeypatch):
    from conftest import tiny_cfg
    from stepdistill.trainers.setup import prepare

    cfg = tiny_cfg(tiny_teacher, tmp_path / "run", **{"dmd.regression_pairs": 8, "dmd.regression_steps": 2})
    s = prepare(cfg)
    shape = tuple(s.data.images.shape[1:])
    computed = P.teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=3, cache=tmp_path / "c0")
    key = P.pairs_key(s.teacher, cfg.dmd, s.num_classes, shape, 3)
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    monkeypatch.setattr(P, "SHIPPED_PAIRS_DIR", shipped_dir)
    from safetensors.torch import save_file

    marked = torch.full_like(computed[2], 0.5)
    save_file({"labels": computed[1], "x0": marked}, str(shipped_dir / P.pairs_key_file(key)))
    used = P.teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=3, cache=tmp_path / "c1")
    assert torch.equal(used[2], marked) and torch.equal(used[0], computed[0])  # the shipped outputs, same noise
    save_file({"labels": (computed[1] + 1) % s.num_classes, "x0": marked},
              str(shipped_dir / P.pairs_key_file(key)))  # another generator stream: not these pairs
    fallback = P.teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=3, cache=tmp_path / "c2")
    assert torch.equal(fallback[2], computed[2])
    other = P.teacher_ode_pairs(s.teacher, cfg.dmd, s.num_classes, shape, seed=4, cache=tmp_path / "c3")
    assert not torch.equal(other[2], marked)  # another seed is another key: never the shipped file
