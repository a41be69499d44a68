"""Collapse / over-saturation guards: a constant-output generator trips them (stop raises after a checkpoint, warn
logs and continues, the grid is saved); a healthy generator does not."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from stepdistill.config import DistillConfig, load_config
from stepdistill.denoiser import Denoiser
from stepdistill.models import ModelMeta
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.distill import build_method
from stepdistill.trainers.guards import CollapseError, diversity, saturation

torch.set_num_threads(1)


class ConstNet(nn.Module):
    """Collapsed: the same image whatever the noise, time or label (prediction_type 'sample')."""

    def __init__(self, value: float):
        super().__init__()
        self.img = nn.Parameter(torch.full((1, 1, 16, 16), value))

    def forward(self, x, t, cond):
        return self.img.expand_as(x)


class HealthyNet(nn.Module):
    """Output follows the noise: diverse, and bounded by 0.5 (never saturated)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, cond):
        return 0.5 * torch.tanh(self.w * x)


def _vp():
    from diffusers import DDPMScheduler

    from stepdistill.schedules import VPSchedule

    return VPSchedule.from_scheduler_config(dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config))


META = ModelMeta(prediction_type="sample", conditioning="class", class_names=[str(i) for i in range(10)],
                 null_class=10)


def _trainer(net, out, **extra):
    base = {"output_dir": str(out), "data.name": "digits", "data.resolution": 16, "train.batch_size": 4,
            "train.max_steps": 3, "train.sample_every": 100, "train.checkpoint_every": 100, "train.log_every": 1,
            "train.threads": 1, "train.cpu": "true", "dmd.critic_updates": 1, "dmd.gan": "false",
            "dmd.student_lr": 1e-5, "dmd.critic_lr": 1e-5, "train.guard_every": 1}
    base.update(extra)
    cfg = load_config(DistillConfig, None, [f"{k}={v}" for k, v in base.items()])
    obj, data, _ = build_method(cfg, teacher=Denoiser(net, _vp(), "sample", null_class=10), meta=META)
    return Trainer(obj, cfg, data=data)


def _rows(path):
    return [json.loads(r) for r in path.read_text().splitlines()]


def test_stats():
    g = torch.Generator().manual_seed(0)
    same = torch.zeros(8, 1, 4, 4) + 0.2
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert diversity(same, groups) == 0.0
    iid = torch.randn(400, 1, 32, 32, generator=g)
    assert diversity(iid, torch.arange(400) % 4, data_std=1.0) == pytest.approx(1.0, abs=0.02)
    assert diversity(iid, torch.arange(400) % 4, data_std=2.0) == pytest.approx(0.5, abs=0.01)
    assert saturation(torch.tensor([1.0, -0.99, 0.5, 0.0])) == 0.5
    with pytest.raises(ValueError, match="two samples"):
        diversity(iid[:3], torch.arange(3))


def test_collapsed_generator_stop_mode_checkpoints_and_raises(tmp_path):
    tr = _trainer(ConstNet(0.3), tmp_path, **{"train.guard_action": "stop"})
    with pytest.raises(CollapseError, match="step 1: diversity 0.0000 < train.guard_min_diversity"):
        tr.train()
    assert tr.step == 1
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert (tmp_path / "checkpoints" / "step_000001" / "meta.json").exists()
    assert (tmp_path / "samples" / "guard_step_1.png").exists()
    (row,) = _rows(tmp_path / "guards.jsonl")
    assert row["step"] == 1 and row["diversity"] == 0.0 and row["tripped"] and row["data_std"] > 0
    # the checkpoint resumes (e.g. after changing the recipe): guards off, it finishes
    again = _trainer(ConstNet(0.3), tmp_path, **{"train.guard_every": 0})
    assert again.train(resume=True)["steps"] == 3


def test_collapsed_generator_warn_mode_logs_and_continues(tmp_path, capsys):
    tr = _trainer(ConstNet(0.3), tmp_path, **{"train.guard_every": 2, "train.max_steps": 4})
    result = tr.train()
    assert result["steps"] == 4
    err = capsys.readouterr().err
    assert err.count("collapse guard at step") == 2 and "diversity 0.0000" in err
    assert [r["step"] for r in _rows(tmp_path / "guards.jsonl")] == [2, 4]
    assert {p.name for p in (tmp_path / "samples").glob("guard_step_*.png")} == {"guard_step_2.png", "guard_step_4.png"}
    log = _rows(tmp_path / "log.jsonl")
    assert "guard_diversity" not in log[0] and log[1]["guard_diversity"] == 0.0 and "guard_saturation" in log[3]


def test_saturated_generator_trips_saturation(tmp_path, capsys):
    tr = _trainer(ConstNet(0.995), tmp_path, **{"train.max_steps": 1, "train.guard_min_diversity": 0.0})
    tr.train()
    (row,) = _rows(tmp_path / "guards.jsonl")
    assert row["saturation"] == 1.0 and len(row["tripped"]) == 1 and "saturation" in row["tripped"][0]
    assert "data_saturation" in row and "guard_max_saturation" in capsys.readouterr().err


def test_healthy_generator_passes(tmp_path, capsys):
    tr = _trainer(HealthyNet(), tmp_path, **{"train.guard_action": "stop", "train.max_steps": 2})
    assert tr.train()["steps"] == 2
    rows = _rows(tmp_path / "guards.jsonl")
    assert len(rows) == 2 and all(not r["tripped"] for r in rows)
    assert all(r["diversity"] > 0.2 and r["saturation"] == 0.0 for r in rows)
    assert not list((tmp_path / "samples").glob("guard_step_*.png"))
    assert "collapse guard" not in capsys.readouterr().err


def test_guard_config_validation(tmp_path):
    from stepdistill.config import ConfigError

    with pytest.raises(ConfigError, match="train.guard_action"):
        load_config(DistillConfig, None, ["train.guard_action=panic"])
    with pytest.raises(ConfigError, match="train.guard_max_saturation"):
        load_config(DistillConfig, None, ["train.guard_max_saturation=1.5"])
