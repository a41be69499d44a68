"""Experiment trackers (train.report_to; stepdistill/trainers/tracking.py): TensorBoard's own event reader finds the
run's scalars (losses, learning rates, grad norms, step time), its sample grids and curve's eval metrics; wandb
writes an offline run; a bad value is refused with the key's name."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_scalars_images_and_curve_metrics(tiny_teacher, tmp_path):
    pytest.importorskip("tensorboard")
    from stepdistill.frontends.cli import main
    from stepdistill.trainers.distill import distill

    run = tmp_path / "run"
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, run, **{
        "train.report_to": "tensorboard", "train.sample_every": 2}))
    distill(cfg)
    ev = _events(run / "tensorboard" / "run")
    tags = ev.Tags()
    assert {"generator_loss", "critic_loss", "generator_lr", "critic_lr", "generator_grad_norm",
            "sec_per_step"} <= set(tags["scalars"])
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    got = [(e.step, e.value) for e in ev.Scalars("generator_loss")]
    assert got == [(r["step"], pytest.approx(r["generator_loss"], rel=1e-6)) for r in rows]
    assert [e.value for e in ev.Scalars("generator_lr")] == pytest.approx([1e-4] * len(rows))
    assert "samples" in tags["images"] and [e.step for e in ev.Images("samples")] == [2, 4]
    img = ev.Images("samples")[0]
    assert img.width > 16 and img.height > 16  # a grid of samples, PNG-encoded
    # stepdistill curve reports each scored checkpoint's metrics to the same run
    main(["curve", "--run", str(run), "--num", "20", "--ref", "digits", "--ref-num", "40", "--no-progress"])
    ev = _events(run / "tensorboard" / "run")
    curve = json.loads((run / "curve" / "curve.json").read_text())
    fid = [(e.step, e.value) for e in ev.Scalars("eval/fid")]
    assert fid == [(p["step"], pytest.approx(p["fid"], rel=1e-5)) for p in curve["points"]]
    assert {"eval/recall", "eval/precision", "eval/sample_passes"} <= set(ev.Tags()["scalars"])  # digits: no classifier


def test_wandb_runs_offline(tiny_teacher, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from stepdistill.trainers.distill import distill

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, run, **{"train.report_to": "wandb"}))
    distill(cfg)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    files = list(offline[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 1000


def test_report_to_is_checked(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **{"train.report_to": "mlflow"}))
