"""FSDP (train.fsdp=true, trainers/fsdp.py): 2 gloo CPU processes under accelerate launch.

Checks that the players and the EMA are really sharded, that DMD2 steps match a single process with
the same global batch, that checkpoints are full (single-process format) state dicts, that a sharded
run resumes (sharded or not) and that the exported student is the gathered EMA.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from accelerate import Accelerator
from conftest import tiny_distill_overrides
from stepdistill.config import DistillConfig, load_config
from stepdistill.trainers import core
from stepdistill.trainers.distill import distill
from stepdistill.trainers.fsdp import local_numel

out, fsdp, resume, teacher = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
over = {{"train.fsdp": fsdp, "train.fsdp_shard_teacher": teacher}}
cfg = load_config(DistillConfig, None, tiny_distill_overrides({teacher!r}, out, **over))
acc = Accelerator(cpu=True)
os.makedirs(out, exist_ok=True)
orig = core.Trainer.__init__

def init(self, *a, **k):  # record what each process holds once the trainer is built
    orig(self, *a, **k)
    sizes = {{n: local_numel(p.module) for n, p in self.obj.players.items()}}
    sizes.update({{"ema." + n: local_numel(m) for n, m in self.ema.items()}})
    sizes["teacher"] = local_numel(self.obj.teacher.backbone)
    with open(os.path.join(out, f"shards_{{acc.process_index}}.json"), "w") as f:
        json.dump({{"fsdp": self.fsdp, "world": acc.num_processes, "sizes": sizes}}, f)

core.Trainer.__init__ = init
distill(cfg, resume=resume, accelerator=acc)
from stepdistill.frontends.cli import close_process_group
close_process_group()  # as the CLI does: a process group left open can abort the interpreter's exit
"""


def _run(tiny_teacher, tmp_path, out: Path, procs: int, fsdp: bool, resume: bool = False, port: int = 29541,
         shard_teacher: bool = False):
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), teacher=str(tiny_teacher)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent),
           "CUDA_VISIBLE_DEVICES": ""}   # gloo CPU processes, also on a GPU machine (rank 1 has no cuda:1 there)
    args = [str(out), str(fsdp).lower(), "1" if resume else "0", str(shard_teacher).lower()]
    if procs == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def test_fsdp_two_processes_shard_match_resume_and_export(tiny_teacher, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _run(tiny_teacher, tmp_path, single, 1, fsdp=False)
    _run(tiny_teacher, tmp_path, sharded, 2, fsdp=True)

    # (a) every player and the EMA are split: each process holds about half of every module
    shards = [json.loads((sharded / f"shards_{r}.json").read_text()) for r in (0, 1)]
    assert all(s["fsdp"] and s["world"] == 2 for s in shards)
    assert set(shards[0]["sizes"]) == {"generator", "critic", "ema.generator", "teacher"}
    assert shards[0]["sizes"]["teacher"][0] == shards[0]["sizes"]["teacher"][1]  # not sharded by default
    for name in ("generator", "critic", "ema.generator"):
        (l0, full), (l1, _) = shards[0]["sizes"][name], shards[1]["sizes"][name]
        assert l0 + l1 == full and full > 100_000, (name, l0, l1, full)
        assert abs(l0 - full / 2) < 0.01 * full and abs(l1 - full / 2) < 0.01 * full, (name, l0, l1, full)
    assert json.loads((single / "shards_0.json").read_text())["fsdp"] is False

    # (b) same global batch: the sharded run follows the single process (losses and weights)
    logs = {k: [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for k, d in
            (("single", single), ("fsdp", sharded))}
    assert len(logs["single"]) == len(logs["fsdp"]) == 4
    for a, b in zip(logs["single"], logs["fsdp"]):
        for key in ("dm_loss", "fake_loss", "gan_d_loss", "gan_g_loss", "generator_grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    w1, w2 = (load_file(_ckpt(d, 4) / "models.safetensors") for d in (single, sharded))
    assert w1.keys() == w2.keys()  # full state dicts, single-process names and shapes
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-4, rtol=1e-3, msg=k)
    o1, o2 = (torch.load(_ckpt(d, 4) / "optim.pt", weights_only=True) for d in (single, sharded))
    for n in o1:  # AdamW moments gathered into the single-process layout
        assert o1[n]["param_groups"] == o2[n]["param_groups"] and o1[n]["state"].keys() == o2[n]["state"].keys()
        for i in o1[n]["state"]:
            torch.testing.assert_close(o1[n]["state"][i]["exp_avg_sq"], o2[n]["state"][i]["exp_avg_sq"],
                                       atol=1e-7, rtol=1e-3)

    # the export is the gathered EMA generator, a plain diffusers UNet folder
    unet = load_file(sharded / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    for k, v in unet.items():
        assert torch.equal(v, w2[f"ema.generator.{k}"]), k

    # (c) resume from the step-2 checkpoint: sharded (2 processes; the teacher sharded too) and unsharded (1 process)
    for name, procs, fsdp, ref in (("resume_fsdp", 2, True, w2), ("resume_single", 1, False, w1)):
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(_ckpt(sharded, 2), _ckpt(out, 2))
        (out / "checkpoints" / "latest").write_text("step_000002")
        _run(tiny_teacher, tmp_path, out, procs, fsdp=fsdp, resume=True, port=29542, shard_teacher=fsdp)
        if fsdp:
            (l0, full), (l1, _) = (json.loads((out / f"shards_{r}.json").read_text())["sizes"]["teacher"]
                                   for r in (0, 1))
            assert l0 + l1 == full and abs(l0 - full / 2) < 0.01 * full
        w = load_file(_ckpt(out, 4) / "models.safetensors")
        atol = 1e-6 if fsdp else 2e-4  # the same sharded computation again vs. another summation order
        for k in ref:
            torch.testing.assert_close(w[k], ref[k], atol=atol, rtol=1e-5 if fsdp else 1e-3, msg=f"{name}: {k}")


def test_fsdp_units_cover_every_parameter_and_lora_is_refused(tiny_teacher, tmp_path):
    """The wrapping plan (no process group needed): every parameter of a diffusers backbone sits in a child
    unit (the root keeps none, so gradients entering at the GAN features re-gather what they need); a
    ModuleDict player is split into its callable children; LoRA players are refused before any sharding."""
    import pytest

    from conftest import tiny_distill_overrides
    from stepdistill.config import DistillConfig, load_config
    from stepdistill.trainers.distill import build_method
    from stepdistill.trainers.fsdp import callable_units, fsdp_units, shard_objective

    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path))
    obj, _, _ = build_method(cfg)
    critic_units = callable_units(obj.players["critic"].module)
    assert critic_units == [obj.critic.backbone, obj.head]
    for unit in critic_units + [obj.student.backbone]:
        inner = fsdp_units(unit)
        owned = [id(p) for u in inner for p in u.parameters()]
        assert len(owned) == len(set(owned)) == len(list(unit.parameters())), type(unit).__name__
    blocks = fsdp_units(obj.student.backbone)
    assert all(b in blocks for b in obj.student.backbone.down_blocks) and obj.student.backbone.mid_block in blocks

    lora_cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, **{"dmd.lora_rank": 4}))
    lora_obj, _, _ = build_method(lora_cfg)
    with pytest.raises(ValueError, match="LoRA"):
        shard_objective(lora_obj, {}, mesh=None)
