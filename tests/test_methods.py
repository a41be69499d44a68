"""The method registry: every built-in method resolves, and a toy method registered from this test file trains,
exports and samples through the public CLI without any package file knowing its name."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_distill_overrides
from stepdistill.cli import main
from stepdistill.methods import BUILTIN, Method, get_method, method_names, register, unregister
from stepdistill.trainers.objective import ObjectiveBase, Player


def test_builtin_methods_resolve():
    assert set(BUILTIN) <= set(method_names())
    for name in BUILTIN:
        m = get_method(name)
        assert m.name == name and callable(m.build) and callable(m.export) and callable(m.ema_modules)
    assert get_method("phased_dmd").pipeline == "PhasedDMDPipeline" and get_method("rcm").curve
    from stepdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'nope'; known: dmd"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("dmd2"))


class ToyObjective(ObjectiveBase):
    """Guidance distillation: regress the student's x0 onto the teacher's CFG (w = 2) x0 at random noise levels
    (one player, EMA)."""

    def __init__(self, teacher, student, num_classes, shape, lr):
        self.teacher, self.student, self.shape, self.num_classes = teacher, student, shape, num_classes
        self.teacher.requires_grad_(False).eval()
        self.players = {"generator": Player(student.backbone, lr, (0.0, 0.999), 0.0, 10.0, 0, ema=True)}
        self.timesteps = [999.0]

    def updates(self, step):
        return ["generator"]

    def loss(self, player, ctx):
        x0 = ctx.randn(*self.shape)
        y = ctx.randint(0, self.num_classes)
        t = ctx.sample_t(self.teacher.schedule, 0, 999)
        x_t = self.teacher.schedule.add_noise(x0.clamp(-1, 1), ctx.randn(*self.shape), t)
        with torch.no_grad():
            target = self.teacher(x_t, t, y, guidance_scale=2.0)
        loss = F.mse_loss(self.student(x_t, t, y), target)
        return loss, {"toy_loss": loss.item()}

    def sample(self, ema, n, device):
        from stepdistill.pipelines.sampling import grid_sample

        y = torch.arange(n, device=device) % self.num_classes
        return grid_sample(self.student, ema["generator"], self.timesteps, y, self.shape, n, device)


def build_toy(cfg, teacher=None, meta=None, data=None, text_bank=None):
    from stepdistill.trainers.setup import prepare, student_and_critic

    s = prepare(cfg, teacher, meta, data, text_bank)
    student, _ = student_and_critic(s)
    obj = ToyObjective(s.teacher, student, s.num_classes, tuple(s.data.images.shape[1:]), cfg.dmd.optim.lr)
    return obj, s.data, s.meta


@pytest.fixture
def toy():
    from stepdistill.trainers.dmd_method import export_generator

    register(Method("toy_regress", build=build_toy, ema_modules=lambda obj: {"generator": obj.student.backbone},
                    export=export_generator, description="a test's own method"))
    yield "toy_regress"
    unregister("toy_regress")


def test_a_method_registered_from_a_test_runs_through_the_cli(toy, tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    over = tiny_distill_overrides(tiny_teacher, run, method=toy, **{"train.max_steps": 3, "train.checkpoint_every": 3,
                                                                    "train.sample_every": 3})
    assert main(["distill", *over]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "toy_loss" in r] and all(r["toy_loss"] > 0 for r in log if "toy_loss" in r)
    meta = json.loads((run / "student" / "stepdistill.json").read_text())
    assert meta["method"] == toy and meta["student_timesteps"] == [999.0]
    out = tmp_path / "exported"
    assert main(["export", "--config", str(run / "config.yaml"), "--out", str(out)]) == 0
    from stepdistill.pipelines.student import StepDistillPipeline

    x1 = StepDistillPipeline.from_pretrained(run / "student")(class_labels=[1, 2], seed=0, output_type="pt").images
    x2 = StepDistillPipeline.from_pretrained(out)(class_labels=[1, 2], seed=0, output_type="pt").images
    assert torch.equal(x1, x2)  # export from the checkpoint = the run's own export
    capsys.readouterr()
    assert main(["sample", "--model", str(out), "--num", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4


def test_a_registered_method_brings_its_own_config_checks(tiny_teacher, tmp_path):
    """Method.checks runs in config validation (a ConfigError naming the key); without checks the DMD-only
    options are refused; the built-in methods' checks are looked up without importing their trainers."""
    import subprocess
    import sys

    from stepdistill.config import ConfigError, DistillConfig, load_config
    from stepdistill.trainers.dmd_method import export_generator

    def checks(cfg, check):
        check(cfg.dmd.critic_updates == 1, "dmd.critic_updates", "must be 1 for this method")

    common = dict(build=build_toy, ema_modules=lambda obj: {"generator": obj.student.backbone}, export=export_generator)
    register(Method("toy_checked", checks=checks, **common))
    register(Method("toy_plain", **common))
    try:
        over = tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_checked")
        with pytest.raises(ConfigError, match=r"^dmd\.critic_updates: must be 1 for this method"):
            load_config(DistillConfig, None, over)
        assert load_config(DistillConfig, None, over + ["dmd.critic_updates=1"]).method == "toy_checked"
        plain = tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_plain")
        with pytest.raises(ConfigError, match=r"^dmd\.divergence: forward_kl / js are supported by method dmd"):
            load_config(DistillConfig, None, plain + ["dmd.divergence=js"])
    finally:
        unregister("toy_checked")
        unregister("toy_plain")
    code = ("import sys; from stepdistill.config import DistillConfig, load_config\n"
            "for m in ('dmd2', 'rcm', 'msd', 'pso', 'phased_dmd'):\n"
            "    load_config(DistillConfig, None, [f'method={m}'] + (['dmd.gan=false'] if m == 'rcm' else []))\n"
            "print(sorted(k for k in sys.modules if k.startswith('stepdistill.trainers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_unknown_method_in_a_config_names_the_known_ones(tiny_teacher, tmp_path, capsys):
    assert main(["distill", *tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_regress")]) == 2
    err = capsys.readouterr().err
    assert "method" in err and "dmd2" in err and "rcm" in err
