"""A research user's own nn.Module denoiser distills through the same DMD2 path."""
from __future__ import annotations

import json

import torch
import torch.nn as nn
from safetensors.torch import load_file

from stepdistill.config import DistillConfig, load_config
from stepdistill.denoiser import Denoiser
from stepdistill.models import ModelMeta
from stepdistill.schedules import VPSchedule
from stepdistill.trainers.distill import distill


class TinyEpsNet(nn.Module):
    """forward(x_t (B,1,16,16), t (B,), cond (B,) long) -> eps (B,1,16,16); exposes a bottleneck."""

    def __init__(self, num_classes=10, ch=16):
        super().__init__()
        self.emb = nn.Embedding(num_classes + 1, ch)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.bottleneck = nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.SiLU())  # (B, ch, 8, 8)
        self.bottleneck_channels = ch
        self.out = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x_t, t, cond):
        h = self.inp(x_t) + self.emb(cond)[:, :, None, None] + (t / 1000.0)[:, None, None, None]
        return self.out(self.bottleneck(h))


def test_custom_module_teacher_distills_and_exports(tmp_path):
    torch.manual_seed(0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = VPSchedule(torch.cumprod(1 - betas, 0))
    teacher = Denoiser(TinyEpsNet(), schedule, "epsilon", null_class=10)
    meta = ModelMeta(prediction_type="epsilon", conditioning="class", class_names=[str(i) for i in range(10)],
                     null_class=10)
    cfg = load_config(DistillConfig, None, [
        f"output_dir={tmp_path}", "data.name=digits", "data.resolution=16", "dmd.teacher=custom",
        "train.batch_size=8", "train.max_steps=3", "train.checkpoint_every=3", "train.sample_every=3",
        "train.log_every=1", "train.cpu=true", "dmd.critic_updates=2", "dmd.student_lr=1e-3"])
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    out = distill(cfg, teacher=teacher, meta=meta)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("gan_g_loss" in r and "dm_loss" in r for r in rows)
    # the teacher stays frozen; the student moved away from it
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(v, before[k])
    student = load_file(out / "unet" / "model.safetensors")
    assert any(not torch.equal(student[k], before[k]) for k in before)
    assert json.loads((out / "unet" / "config.json").read_text())["module"].endswith("TinyEpsNet")
    # the exported scheduler reproduces the custom schedule
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    torch.testing.assert_close(sched.alphas_cumprod.double(), schedule.alphas_cumprod, atol=1e-6, rtol=1e-5)
