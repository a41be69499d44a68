"""The method registry: every built-in method resolves, and a toy method registered from this test file trains,
exports and samples through the public CLI without any package file knowing its name."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.methods import BUILTIN, Method, get_method, method_names, register, unregister
from stepdistill.trainers.objective import ObjectiveBase, Player


def test_builtin_methods_resolve():
    assert set(BUILTIN) <= set(method_names())
    for name in BUILTIN:
        m = get_method(name)
        assert m.name == name and callable(m.build) and callable(m.export) and callable(m.ema_modules)
    assert get_method("phased_dmd").pipeline == "PhasedDMDPipeline" and get_method("rcm").curve
    from stepdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method .nope.; known: boot | dmd"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("dmd2"))


@dataclass
class ToyConfig:
    """The toy method's own config section (``toy:``), declared by its Method record."""
    guidance_scale: float = 2.0
    loss_scale: float = 1.0


class ToyObjective(ObjectiveBase):
    """Guidance distillation: regress the student's x0 onto the teacher's CFG (w = toy.guidance_scale) x0 at random
    noise levels (one player, EMA); the loss is scaled by toy.loss_scale."""

    def __init__(self, teacher, student, num_classes, shape, lr, toy_cfg=None):
        self.toy = toy_cfg or ToyConfig()
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
            target = self.teacher(x_t, t, y, guidance_scale=self.toy.guidance_scale)
        loss = self.toy.loss_scale * F.mse_loss(self.student(x_t, t, y), target)
        return loss, {"toy_loss": loss.item()}

    def sample(self, ema, n, device):
        from stepdistill.pipelines.sampling import grid_sample

        y = torch.arange(n, device=device) % self.num_classes
        return grid_sample(self.student, ema["generator"], self.timesteps, y, self.shape, n, device)


def build_toy(cfg, teacher=None, meta=None, data=None, text_bank=None):
    from stepdistill.trainers.setup import prepare, student_and_critic

    s = prepare(cfg, teacher, meta, data, text_bank)
    student, _ = student_and_critic(s)
    obj = ToyObjective(s.teacher, student, s.num_classes, tuple(s.data.images.shape[1:]), cfg.dmd.optim.lr,
                       getattr(cfg, "toy", None))
    return obj, s.data, s.meta


@pytest.fixture
def toy():
    from stepdistill.trainers.dmd_method import export_generator

    def check_toy(cfg, check):
        check(cfg.toy.loss_scale > 0, "toy.loss_scale", "must be > 0")

    register(Method("toy_regress", build=build_toy, ema_modules=lambda obj: {"generator": obj.student.backbone},
                    export=export_generator, description="a test's own method", sections={"toy": ToyConfig},
                    checks=check_toy, card=("Toy regression", "A test's own method.")))
    yield "toy_regress"
    unregister("toy_regress")


def test_a_method_registered_from_a_test_runs_through_the_cli(toy, tiny_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    over = tiny_distill_overrides(tiny_teacher, run, method=toy, **{"train.max_steps": 3, "train.checkpoint_every": 3,
                                                                    "train.sample_every": 3, "train.log_every": 1})
    # the method's own section: a bad value is named by its key, an unknown key too, and a good value is used
    assert main(["distill", *over, "toy.loss_scale=0"]) == 2
    assert "toy.loss_scale: must be > 0" in capsys.readouterr().err
    assert main(["distill", *over, "toy.nope=1"]) == 2
    assert "unknown config key toy.nope" in capsys.readouterr().err
    assert main(["distill", *over]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "toy_loss" in r] and all(r["toy_loss"] > 0 for r in log if "toy_loss" in r)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["toy"] == {"guidance_scale": 2.0, "loss_scale": 1.0} and "phased" not in saved and "pso" not in saved
    assert "**Toy regression.** A test's own method." in (run / "student" / "README.md").read_text()  # the record's card
    scaled = tmp_path / "scaled"
    over3 = tiny_distill_overrides(tiny_teacher, scaled, method=toy, **{"train.max_steps": 1, "train.log_every": 1,
                                                                        "toy.loss_scale": 3})
    assert main(["distill", *over3]) == 0
    first = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][0]["toy_loss"]
    tripled = [json.loads(line) for line in (scaled / "log.jsonl").read_text().splitlines()][0]["toy_loss"]
    assert tripled == pytest.approx(3 * first, rel=1e-5)  # the section reaches the objective
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
    """Method.checks runs in config validation (a ConfigError naming the key); a method's config has the sections it
    declares and no other: DMD's options exist only for methods that extend the ``dmd`` section with DMDConfig.
    Loading a config imports that method's module, never the other methods'."""
    import subprocess
    import sys

    from stepdistill.config import ConfigError, DistillConfig, SharedDistillConfig, load_config
    from stepdistill.trainers.dmd import DMDConfig
    from stepdistill.trainers.dmd_method import export_generator

    def checks(cfg, check):
        check(cfg.dmd.critic_updates == 1, "dmd.critic_updates", "must be 1 for this method")

    common = dict(build=build_toy, ema_modules=lambda obj: {"generator": obj.student.backbone}, export=export_generator)
    register(Method("toy_checked", checks=checks, sections={"dmd": DMDConfig}, **common))
    register(Method("toy_plain", **common))
    try:
        over = tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_checked")
        with pytest.raises(ConfigError, match=r"^dmd\.critic_updates: must be 1 for this method"):
            load_config(DistillConfig, None, over)
        assert load_config(DistillConfig, None, over + ["dmd.critic_updates=1"]).method == "toy_checked"
        plain = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_plain"))
        assert type(plain.dmd) is SharedDistillConfig and not hasattr(plain.dmd, "critic_updates")
        with pytest.warns(UserWarning, match=r"dmd.divergence = 'js' is an option of method dmd \| dmd2"):
            load_config(DistillConfig, None, ["method=toy_plain", "dmd.divergence=js"])
        with pytest.raises(ConfigError, match=r"^unknown config key dmd\.nonsense"):
            load_config(DistillConfig, None, ["method=toy_plain", "dmd.nonsense=1"])
    finally:
        unregister("toy_checked")
        unregister("toy_plain")
    code = ("import sys; from stepdistill.config import DistillConfig, load_config\n"
            "load_config(DistillConfig, None, ['method=dmd2'])\n"
            "print(sorted(k for k in sys.modules if k.startswith('stepdistill.trainers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(r.stdout.strip()))
    assert "stepdistill.trainers.dmd_method" in loaded
    assert not loaded & {f"stepdistill.trainers.{m}" for m in ("phased_dmd", "multi_student", "pso", "rcm")}


def test_a_run_folder_of_an_earlier_release_still_loads(tiny_teacher, tmp_path):
    """Earlier releases wrote every method's section into config.yaml and checkpoints (and accepted, unread, the
    options of other methods): those load and resume as before; one set away from its default is named."""
    from stepdistill.config import DistillConfig, distill_defaults, load_config, to_dict
    from stepdistill.errors import ConfigError
    from stepdistill.trainers.checkpoint import config_diff

    old = to_dict(distill_defaults("dmd2"))
    for m, sec in (("phased_dmd", "phased"), ("msd", "msd"), ("pso", "pso"), ("rcm", "rcm")):
        old[sec] = to_dict(distill_defaults(m))[sec]
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(old))
    cfg = load_config(DistillConfig, f)
    assert cfg == distill_defaults("dmd2")
    assert config_diff(type(cfg), old, to_dict(cfg)) == []  # an old checkpoint resumes
    old["phased"]["margin"] = 3.0
    f.write_text(yaml.safe_dump(old))
    with pytest.warns(UserWarning, match=r"phased.margin = 3.0 is an option of method phased_dmd; method dmd2 does"):
        assert load_config(DistillConfig, f) == distill_defaults("dmd2")
    old["nonsense"] = {"x": 1}  # a key no method defines is still refused
    f.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"unknown config key nonsense"):
        load_config(DistillConfig, f)
    pso_old = to_dict(distill_defaults("pso"))
    pso_old["dmd"].update({k: v for k, v in to_dict(distill_defaults("dmd2"))["dmd"].items() if k not in pso_old["dmd"]})
    f.write_text(yaml.safe_dump(pso_old))
    assert load_config(DistillConfig, f) == distill_defaults("pso")  # DMD's defaults in a PSO run's dmd section


def test_unknown_method_in_a_config_names_the_known_ones(tiny_teacher, tmp_path, capsys):
    assert main(["distill", *tiny_distill_overrides(tiny_teacher, tmp_path, method="toy_regress")]) == 2
    err = capsys.readouterr().err
    assert "method" in err and "dmd2" in err and "rcm" in err
