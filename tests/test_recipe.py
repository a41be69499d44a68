"""Schedules inside one config (stepdistill/recipe.py): values switch at the named steps, a resume across a switch
is bit-exact, bad keys fail with a line naming them, and the full recipe file loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.recipe import ScheduleEntry, values_at

SCHEDULE = ("[{at: 2, set: {dmd.optim.lr: 5.0e-5, dmd.critic_updates: 1, dmd.regression_weight: 0.5}},"
            " {at: 4, set: {dmd.pixel_gan_g_weight: 0.3, dmd.pixel_gan_lr: 1.0e-3, train.ema_decay: 0.5,"
            " train.batch_size: 4}}]")
BASE = {"dmd.regression_weight": 1.0, "dmd.regression_pairs": 8, "dmd.regression_steps": 2,
        "dmd.pixel_gan_g_weight": 0.1, "dmd.pixel_gan_lr": 2e-4, "train.ema_decay": 0.9, "schedule": SCHEDULE}


def _cfg(teacher, out, **extra):
    return load_config(DistillConfig, None, tiny_distill_overrides(teacher, out, **{**BASE, **extra}))


def test_values_switch_at_the_named_steps_and_ramps_are_linear():
    entries = [ScheduleEntry(at=10, set={"a": 2.0}), ScheduleEntry(at=20, set={"a": 0.0, "b": 3}, ramp=10)]
    base = {"a": 1.0, "b": 5}
    assert [values_at(base, entries, s)["a"] for s in (0, 9, 10, 19)] == [1.0, 1.0, 2.0, 2.0]
    assert [values_at(base, entries, s)["a"] for s in (20, 25, 30, 99)] == [2.0, 1.0, 0.0, 0.0]
    assert values_at(base, entries, 19)["b"] == 5 and values_at(base, entries, 20)["b"] == 3  # ints switch


def test_the_trainer_applies_each_value_from_its_step(tiny_teacher, tmp_path, monkeypatch):
    from stepdistill.trainers import core
    from stepdistill.trainers.dmd import DMDObjective

    seen = []
    orig = DMDObjective.updates

    def spy(self, step):
        names = orig(self, step)
        seen.append((step, len(names), self.cfg.regression_weight, self.cfg.pixel_gan_g_weight))
        return names

    lrs, drawn = [], []
    orig_step = core.Trainer._run_step
    orig_gen = DMDObjective.generator_loss

    def gen_loss(self, ctx):
        drawn.append((ctx.step, ctx.global_batch))
        return orig_gen(self, ctx)

    monkeypatch.setattr(DMDObjective, "generator_loss", gen_loss)

    def run_step(self):
        logs = orig_step(self)
        g = self.opts["critic"].param_groups
        lrs.append((self.step, self.opts["generator"].param_groups[0]["lr"], g[0]["lr"], g[-1]["lr"],
                    self.tcfg.ema_decay))
        return logs

    monkeypatch.setattr(DMDObjective, "updates", spy)
    monkeypatch.setattr(core.Trainer, "_run_step", run_step)
    from stepdistill.trainers.distill import distill

    cfg = _cfg(tiny_teacher, tmp_path / "run", **{"train.max_steps": 6})
    distill(cfg)
    by_step = {s: (n, rw, pg) for s, n, rw, pg in seen}
    assert by_step[0] == (3, 1.0, 0.1) and by_step[1] == (3, 1.0, 0.1)     # 2 critic updates + generator
    assert by_step[2] == (2, 0.5, 0.1) and by_step[3] == (2, 0.5, 0.1)     # critic_updates 1 from step 2
    assert by_step[4] == (2, 0.5, 0.3) and by_step[5] == (2, 0.5, 0.3)
    gen_lr = {s: lr for s, lr, _, _, _ in lrs}
    assert gen_lr[0] == gen_lr[1] == pytest.approx(1e-4) and gen_lr[2] == pytest.approx(5e-5)
    pixel_lr = {s: p for s, _, _, p, _ in lrs}   # the pixel discriminator's own group: absolute lr
    assert pixel_lr[3] == pytest.approx(2e-4) and pixel_lr[4] == pytest.approx(1e-3)
    ema = {s: e for s, _, _, _, e in lrs}
    assert ema[3] == 0.9 and ema[4] == 0.5
    assert dict(drawn) == {0: 8, 1: 8, 2: 8, 3: 8, 4: 4, 5: 4}   # each update draws the batch size in force
    # the config on disk is the one loaded (not the values in force at the end), and so is the live object
    saved = load_config(DistillConfig, str(tmp_path / "run" / "config.yaml"), [])
    assert saved.dmd.regression_weight == 1.0 and saved.dmd.optim.lr == pytest.approx(1e-4)
    assert cfg.dmd.critic_updates == 2 and cfg.train.ema_decay == 0.9
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["schedule"]["values"]["dmd.pixel_gan_g_weight"] == 0.3       # recorded: in force from step 4
    assert meta["config"]["dmd"]["pixel_gan_g_weight"] == 0.1
    assert meta["wall_seconds"] > 0


def test_resume_across_a_switch_is_bit_exact(tiny_teacher, tmp_path):
    from stepdistill.trainers.distill import distill

    distill(_cfg(tiny_teacher, tmp_path / "full", **{"train.max_steps": 6}))
    distill(_cfg(tiny_teacher, tmp_path / "cut", **{"train.max_steps": 3}))      # stops between the switches
    distill(_cfg(tiny_teacher, tmp_path / "cut", **{"train.max_steps": 6}), resume=True)
    a = load_file(tmp_path / "full" / "checkpoints" / "step_000006" / "models.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step_000006" / "models.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_schedule_does_not_resume(tiny_teacher, tmp_path):
    from stepdistill.errors import CheckpointError
    from stepdistill.trainers.distill import distill

    distill(_cfg(tiny_teacher, tmp_path / "r", **{"train.max_steps": 2}))
    other = SCHEDULE.replace("at: 4", "at: 3")
    with pytest.raises(CheckpointError, match="schedule"):
        distill(_cfg(tiny_teacher, tmp_path / "r", **{"train.max_steps": 6, "schedule": other}), resume=True)


@pytest.mark.parametrize("schedule, message", [
    ("[{at: 5, set: {dmd.nope: 1}}]", r"schedule\[0\]\.set\.dmd\.nope: unknown config key dmd\.nope"),
    ("[{at: 5, set: {dmd.gan: false}}]", r"dmd\.gan cannot change during a run"),
    ("[{at: 5, set: {dmd.t_min: 990}}]", r"schedule\[0\] \(from step 5\): dmd\.t_min"),
    ("[{at: -1, set: {dmd.t_min: 3}}]", r"schedule\[0\]\.at: must be >= 0"),
    ("[{at: 5, set: {dmd.critic_updates: 2.5}}]", r"schedule\[0\]\.set\.dmd\.critic_updates: expected int"),
    ("[{at: 5, ramp: 3, set: {dmd.critic_updates: 2}}]", r"cannot ramp"),
    ("[{at: 5, set: {}}]", r"schedule\[0\]\.set: needs a mapping"),
    ("[{at: 5, sett: {dmd.t_min: 3}}]", r"unknown config key schedule\[0\]\.sett"),
])
def test_bad_schedules_fail_with_a_line_naming_the_key(schedule, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, None, [f"schedule={schedule}"])


def test_pixel_discriminator_cannot_be_switched_on_from_zero():
    with pytest.raises(ConfigError, match="pixel discriminator is built only when"):
        load_config(DistillConfig, None, ["schedule=[{at: 5, set: {dmd.pixel_gan_g_weight: 0.3}}]"])


def test_msd_parts_read_a_scheduled_dmd_value_from_its_step(tiny_teacher, tmp_path, monkeypatch):
    """method msd: every part's DMD2 objective reads the one dmd section, so a scheduled DM CFG reaches all of them
    at its step (the teacher ODE pairs, built before step 0, keep the configured value)."""
    from conftest import tiny_cfg
    from stepdistill.trainers.dmd import DMDObjective
    from stepdistill.trainers.distill import distill

    seen = []
    orig = DMDObjective.generator_loss

    def spy(self, ctx):
        seen.append((ctx.step, self.cfg.real_guidance_scale))
        return orig(self, ctx)

    monkeypatch.setattr(DMDObjective, "generator_loss", spy)
    cfg = tiny_cfg(tiny_teacher, tmp_path / "msd", method="msd", **{
        "msd.num_students": 2, "msd.steps_per_student": 2, "schedule": "[{at: 2, set: {dmd.real_guidance_scale: 3.0}}]"})
    distill(cfg)
    assert seen == [(0, 2.0), (1, 2.0), (2, 3.0), (3, 3.0)]   # round robin: student 0, 1, 0, 1


def test_method_specific_keys_are_refused_for_other_methods():
    with pytest.raises(ConfigError, match=r"method dmd \| dmd2 \| msd only, not rcm"):
        load_config(DistillConfig, None, ["method=rcm", "dmd.gan=false",
                                          "schedule=[{at: 5, set: {dmd.regression_weight: 0.5}}]"])


def test_the_full_recipe_file_loads_with_its_schedule():
    cfg = load_config(DistillConfig, str(Path(__file__).parents[1] / "configs" / "dmd2_animal_mnist_full.yaml"), [])
    assert cfg.data.split == "fit" and cfg.dmd.regression_warmup_steps == cfg.schedule[0].at < cfg.train.max_steps
    assert cfg.dmd.pixel_gan_g_weight == 0.3 and cfg.schedule[0].set["train.batch_size"] < cfg.train.batch_size
    assert cfg.schedule[1].set["dmd.regression_weight"] < cfg.dmd.regression_weight


def test_sample_passes_follow_the_scheduled_batch_size():
    from stepdistill.eval.curve import passes_per_step, sample_passes

    cfg = load_config(DistillConfig, None, ["dmd.regression_warmup_steps=0", "dmd.regression_weight=0",
                                            "schedule=[{at: 10, set: {train.batch_size: 16}}]"])
    assert sample_passes(cfg, 15) == (10 * 32 + 5 * 16) * passes_per_step(cfg)


def test_sample_passes_follow_the_scheduled_critic_ratio():
    from stepdistill.eval.curve import passes_per_step, sample_passes

    cfg = load_config(DistillConfig, None, ["schedule=[{at: 10, set: {dmd.critic_updates: 1}}]"])
    one = load_config(DistillConfig, None, ["dmd.critic_updates=1"])
    assert sample_passes(cfg, 10) == 10 * 32 * passes_per_step(cfg)
    assert sample_passes(cfg, 15) == 10 * 32 * passes_per_step(cfg) + 5 * 32 * passes_per_step(one)


def test_a_config_can_extend_another_with_base(tmp_path):
    """``base: other.yaml``: the other file first, this file's keys merged over it section by section."""
    root = Path(__file__).parents[1] / "configs"
    js = load_config(DistillConfig, str(root / "fdistill_js_animal_mnist.yaml"), [])
    warmup = load_config(DistillConfig, str(root / "dmd2_warmup_animal_mnist.yaml"), [])
    assert js.dmd.divergence == "js" and js.output_dir == "runs/fdistill_js_animal_mnist"
    assert js.dmd.regression_warmup_steps == warmup.dmd.regression_warmup_steps == 300   # inherited
    assert js.train == warmup.train and js.dmd.critic_updates == 5
    full = load_config(DistillConfig, str(root / "dmd2_animal_mnist_full.yaml"), [])
    main_job = load_config(DistillConfig, str(root / "dmd2_animal_mnist.yaml"), [])
    assert full.train.max_steps == 2000 and main_job.train.max_steps < full.train.max_steps
    assert full.dmd == main_job.dmd and full.schedule[:2] == main_job.schedule  # the full recipe: the main job, longer
    assert full.schedule[2].at == 1000 and full.schedule[2].set == {"dmd.real_guidance_scale": 3.0}  # then CFG 3
    assert full.schedule[3].at == 1600 and full.schedule[3].set == {"dmd.real_guidance_scale": 4.0}  # then CFG 4
    assert len(full.schedule) == 4
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {seed: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: chain loops"):
        load_config(DistillConfig, str(tmp_path / "a.yaml"), [])
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist \\(the base of"):
        load_config(DistillConfig, str(tmp_path / "c.yaml"), [])


def test_schedule_entries_of_another_methods_options_are_dropped_with_a_warning(tmp_path):
    """The main job's file under another method (``method=pso``): its schedule's DMD-only keys go, as the DMD-only
    settings themselves do, each named in a warning; an entry left empty goes too; a key no method has still fails."""
    root = Path(__file__).parents[1] / "configs"
    with pytest.warns(UserWarning, match=r"schedule entry at step 300: dmd.critic_optim.lr = 2e-05 is an option of"):
        pso = load_config(DistillConfig, str(root / "dmd2_animal_mnist.yaml"), ["method=pso"])
    assert [e.at for e in pso.schedule] == [300]  # the step-450 entry only set dmd.regression_weight
    assert pso.schedule[0].set == {"dmd.optim.lr": 2e-5, "train.batch_size": 16, "train.ema_decay": 0.99}
    main_job = load_config(DistillConfig, str(root / "dmd2_animal_mnist.yaml"), [])
    assert [e.at for e in main_job.schedule] == [300, 450] and "dmd.critic_optim.lr" in main_job.schedule[0].set
    (tmp_path / "bad.yaml").write_text("method: pso\nschedule:\n  - {at: 5, set: {dmd.nope: 1}}\n")
    with pytest.raises(ConfigError, match="dmd.nope"):
        load_config(DistillConfig, str(tmp_path / "bad.yaml"), [])
