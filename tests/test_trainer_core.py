"""Trainer core reliability: resume equality, interruption, corrupt checkpoints, NaN stop, 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.core import Trainer
from stepdistill.errors import CheckpointError, NonFiniteLossError
from stepdistill.trainers.distill import build_method, distill


def _trainer(teacher, out, **extra):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, **extra))
    obj, data, _ = build_method(cfg)
    return Trainer(obj, cfg, data=data), cfg


def _weights(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step_{step:06d}" / "models.safetensors")


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_teacher_training_lowers_the_loss(tiny_teacher):
    rows = [json.loads(line) for line in (tiny_teacher.parent / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["diffusion_loss"] < 0.8 * rows[0]["diffusion_loss"]
    assert (tiny_teacher.parent / "loss.png").exists() and list((tiny_teacher.parent / "samples").glob("*.png"))


def test_resume_equals_uninterrupted_run(tiny_teacher, tmp_path):
    full, _ = _trainer(tiny_teacher, tmp_path / "full")
    full.train()
    part, _ = _trainer(tiny_teacher, tmp_path / "part", **{"train.max_steps": 2})
    part.train()
    resumed, _ = _trainer(tiny_teacher, tmp_path / "part")
    resumed.train(resume=True)
    _assert_same(_weights(tmp_path / "full", 4), _weights(tmp_path / "part", 4))


def test_interrupt_mid_step_then_resume_is_exact(tiny_teacher, tmp_path):
    """SIGTERM/Ctrl-C between two critic updates: checkpoint at that update, resume exactly."""
    full, _ = _trainer(tiny_teacher, tmp_path / "full")
    full.train()
    tr, _ = _trainer(tiny_teacher, tmp_path / "int")
    orig = tr.obj.loss

    def loss(player, ctx):
        if tr.step == 2 and tr.update == 1:
            tr._stop = True  # what the signal handler does
        return orig(player, ctx)

    tr.obj.loss = loss
    res = tr.train()
    assert res["interrupted"] and (tr.step, tr.update) == (2, 2)
    meta = json.loads((tmp_path / "int" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert meta["update"] == 2
    resumed, _ = _trainer(tiny_teacher, tmp_path / "int")
    resumed.train(resume=True)
    _assert_same(_weights(tmp_path / "full", 4), _weights(tmp_path / "int", 4))


def test_corrupt_checkpoint_is_detected(tiny_teacher, tmp_path):
    tr, _ = _trainer(tiny_teacher, tmp_path, **{"train.max_steps": 2})
    tr.train()
    f = tmp_path / "checkpoints" / "step_000002" / "models.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    again, _ = _trainer(tiny_teacher, tmp_path)
    with pytest.raises(CheckpointError, match="models.safetensors.*corrupt"):
        again.train(resume=True)


def test_checkpoint_writes_leave_no_temp_folders(tiny_teacher, tmp_path):
    tr, _ = _trainer(tiny_teacher, tmp_path)
    tr.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000004"


def test_nan_loss_stops_with_named_loss_and_saves_last_good(tiny_teacher, tmp_path):
    tr, _ = _trainer(tiny_teacher, tmp_path)
    orig = tr.obj.loss

    def loss(player, ctx):
        total, logs = orig(player, ctx)
        if tr.step == 3 and player == "generator":
            logs["dm_loss"] = float("nan")
            total = total * float("nan")
        return total, logs

    tr.obj.loss = loss
    with pytest.raises(NonFiniteLossError, match=r"dm_loss.*step 3"):
        tr.train()
    good = tmp_path / "checkpoints" / "last_good"
    meta = json.loads((good / "meta.json").read_text())
    assert (meta["step"], meta["update"]) == (3, 2)  # weights before the failing generator update
    assert all(torch.isfinite(v).all() for v in load_file(good / "models.safetensors").values())


def test_export_after_distill_and_run_folder(tiny_teacher, tmp_path):
    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path))
    out = distill(cfg)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "loss.png").exists()
    assert (tmp_path / "samples" / "step_000004.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("dm_loss" in r and "fake_loss" in r for r in rows)


TWO_PROC = r"""
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from accelerate import Accelerator
from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers.core import Trainer
from stepdistill.trainers.distill import build_method
cfg = load_config(DistillConfig, None, tiny_distill_overrides({teacher!r}, {out!r}))
obj, data, _ = build_method(cfg)
acc = Accelerator(cpu=True)
assert acc.num_processes == int(sys.argv[1]), acc.num_processes
Trainer(obj, cfg, accelerator=acc, data=data).train()
from stepdistill.frontends.cli import close_process_group
close_process_group()  # as the CLI does: a process group left open can abort the interpreter's exit
"""


def test_the_cli_closes_a_process_group_after_success_only(tmp_path, capsys):
    """Under ``accelerate launch`` every process ends its command by destroying the process group (an open gloo
    group can abort the interpreter's exit with SIGABRT, failing a finished run); after an error it is left alone,
    as another process may still be inside a collective."""
    import torch.distributed as dist

    from stepdistill.frontends.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--classes", "cat,dog,cow", "--num", "2",
                     "--out", str(tmp_path / "x.png")]) == 2          # a user error: the group stays
        assert dist.is_initialized()
        assert main(["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "10",
                     "--out", str(tmp_path / "s.png")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    capsys.readouterr()


def test_two_process_gloo_run_matches_single_process(tiny_teacher, tmp_path):
    script = tmp_path / "run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent),
           "CUDA_VISIBLE_DEVICES": ""}   # gloo CPU processes, also on a GPU machine (rank 1 has no cuda:1 there)
    logs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        script.write_text(TWO_PROC.format(tests=str(Path(__file__).parent), teacher=str(tiny_teacher), out=str(out)))
        if n == 1:
            cmd = [sys.executable, str(script), "1"]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517", str(script), "2"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        logs[n] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs[1]) == len(logs[2]) == 4
    for a, b in zip(logs[1], logs[2]):
        for key in ("dm_loss", "fake_loss", "gan_d_loss", "gan_g_loss"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(1.0, abs(a[key])), (key, a[key], b[key])
    w1, w2 = _weights(tmp_path / "p1", 4), _weights(tmp_path / "p2", 4)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-4, rtol=1e-3)
