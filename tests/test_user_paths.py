"""The paths a real user takes next (issue "Never lose a user's files"): every silently wrong case is a refusal or a
correct run, every traceback one line with exit 2 (130 for Ctrl-C), every message names the fix, and the commands
share one flag vocabulary."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEACHER_OVERRIDES, run_cli, tiny_distill_overrides
from stepdistill.config import ConfigError, DistillConfig, TeacherConfig, load_config


_run = run_cli


def _last(err: str) -> str:
    return err.strip().splitlines()[-1]


def _stock_unet(folder: Path, classes: int | None = 10, sample_size: int = 16, scheduler: bool = True) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8, num_class_embeds=None if classes is None else classes + 1
                ).save_pretrained(folder / "unet")
    if scheduler:
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


# ----------------------------------------------------------------------------- silently wrong -> refused / right

def test_teacher_initialisation_follows_train_seed(tmp_path):
    from safetensors.torch import load_file

    from stepdistill.trainers.teacher import train_teacher

    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = load_config(TeacherConfig, None, TINY_TEACHER_OVERRIDES + [
            f"output_dir={tmp_path / name}", "train.max_steps=1", "train.sample_every=1", "train.checkpoint_every=1",
            f"train.seed={seed}"])
        outs.append(load_file(next((train_teacher(cfg) / "unet").glob("*.safetensors"))))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])   # identical runs, identical weights
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


@pytest.mark.parametrize("override, message", [
    ("data.resolution=32", "makes 1x16x16 samples but data digits gives 1x32x32 images.*set data.resolution=16"),
    ("data.channels=3", "data.channels=3: digits is grayscale"),
])
def test_resolution_and_channels_are_checked_against_the_teacher(tiny_teacher, tmp_path, override, message):
    from stepdistill.errors import StepDistillError
    from stepdistill.trainers.distill import build_method

    cfg = load_config(DistillConfig, None, tiny_distill_overrides(tiny_teacher, tmp_path) + [override])
    with pytest.raises(StepDistillError, match=message):
        build_method(cfg)


def test_unconditional_models_sample_and_refuse_classes(tmp_path, capsys):
    folder = _stock_unet(tmp_path / "uncond", classes=None)
    rc, out, err = _run(capsys, ["sample", "--model", folder, "--num", "3", "--steps", "2", "--out",
                                 tmp_path / "u.png", "--threads", "1"])
    assert rc == 0 and json.loads(out)["n"] == 3, err
    rc, _, err = _run(capsys, ["sample", "--model", folder, "--classes", "cat", "--out", tmp_path / "v.png"])
    assert rc == 2 and "unconditional" in err


def test_export_refuses_a_teacher_run_and_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "teacher_run").mkdir()
    (tmp_path / "teacher_run" / "config.yaml").write_text("cfg_dropout: 0.1\nmodel: {}\n")
    rc, _, err = _run(capsys, ["export", f"output_dir={tmp_path / 'teacher_run'}"])
    assert rc == 2 and "is a teacher run" in err and "dmd.teacher=" in err
    rc, _, err = _run(capsys, ["export", f"output_dir={tmp_path / 'nothing'}"])
    assert rc == 2 and "holds no run" in err


def test_home_folder_paths_in_yaml_are_expanded(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: ~/stepdistill_runs/x\ndmd:\n  teacher: ~/teachers/t\n")
    cfg = load_config(DistillConfig, str(p), [])
    assert cfg.output_dir == str(Path.home() / "stepdistill_runs" / "x") and not cfg.output_dir.startswith("~")
    assert cfg.dmd.teacher == str(Path.home() / "teachers" / "t")


@pytest.mark.parametrize("override, message", [
    ("train.threads=-3", "train.threads: must be >= 0"),
    ("train.seed=-1", "train.seed: must be an integer in 0..2147483647"),
    ("train.seed=99999999999", "train.seed: must be an integer in 0..2147483647"),
    ("train.num_workers=-1", "train.num_workers: must be >= 0"),
])
def test_numbers_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DistillConfig, None, [override])


@pytest.mark.parametrize("override, message", [
    ("model.block_out_channels=[]", "model.block_out_channels: needs at least one channel count"),
    ("data.resolution=7", "data.resolution: must be a multiple of 4"),
    ("model.norm_num_groups=5", "model.norm_num_groups: must divide"),
])
def test_teacher_architecture_is_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TeacherConfig, None, [override])


@pytest.mark.parametrize("flag, value", [("--gpu-gib", "nan"), ("--gpu-gib", "-1"), ("--batch", "0")])
def test_plan_checks_its_numbers(flag, value, capsys):
    rc, _, err = _run(capsys, ["plan", "--teacher", "sd15", flag, value])
    assert rc == 2 and flag in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- tracebacks -> one line

def test_yaml_alias_bomb_gives_a_short_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    bomb.write_text("\n".join(levels) + "\n")
    rc, _, err = _run(capsys, ["distill", "--config", bomb])
    assert rc == 2 and len(err) < 1200 and err.count("\n") == 1
    bomb.write_text('output_dir: &x [[[[[[["lol", "lol", "lol", "lol"]]]]]]]\n')
    rc, _, err = _run(capsys, ["distill", "--config", bomb])
    assert rc == 2 and "output_dir: expected a string" in err and len(err) < 300


def test_ctrl_c_outside_training_exits_130_in_one_line(monkeypatch, capsys):
    from stepdistill.frontends import cli_tools

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_tools, "cmd_eval", interrupted)
    rc, _, err = _run(capsys, ["eval", "--model", "builtin:animal_mnist_dmd2"])
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_a_decompression_bomb_in_a_data_folder_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from stepdistill.data import DataError, image_folder

    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: PIL's bomb error, as for a real bomb
    with pytest.raises(DataError, match="too large to decode safely"):
        image_folder(tmp_path, 16)


def test_a_huge_sample_size_is_refused_before_allocating(tmp_path, capsys):
    folder = _stock_unet(tmp_path / "huge", sample_size=16)
    cfg_p = folder / "unet" / "config.json"
    cfg_p.write_text(json.dumps({**json.loads(cfg_p.read_text()), "sample_size": 100000}))
    rc, _, err = _run(capsys, ["sample", "--model", folder, "--num", "1", "--out", tmp_path / "h.png"])
    assert rc == 2 and "sample_size" in err and "100000" in err


# ----------------------------------------------------------------------------- messages name the fix

def test_messages_name_the_fix(tmp_path, capsys):
    bare = _stock_unet(tmp_path / "bare", scheduler=False)
    rc, _, err = _run(capsys, ["sample", "--model", bare, "--out", tmp_path / "b.png"])
    assert rc == 2 and "save_pretrained" in err and "scheduler" in err
    (tmp_path / "teachers").mkdir()
    rc, _, err = _run(capsys, ["sample", "--model", "teachers/mdoel", "--out", tmp_path / "c.png"])
    assert rc == 2 and "no local folder 'teachers/mdoel'" in err
    small = _stock_unet(tmp_path / "nine", classes=9)
    from stepdistill.trainers.distill import build_method

    cfg = load_config(DistillConfig, None, tiny_distill_overrides(small, tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"has 9 classes \(its class embedding holds 10 rows.*null class"):
        build_method(cfg)


def test_cards_say_what_the_run_used(tmp_path):
    from stepdistill.modelcard import recipe_text, write_model_card

    cfg = load_config(DistillConfig, str(Path(__file__).parents[1] / "configs" / "dmd2_animal_mnist.yaml"), [])
    from stepdistill.config import to_dict

    text = recipe_text("dmd2", to_dict(cfg))
    assert "regression loss at weight 0.25" in text and "warm-up of 300" in text
    assert "from step 450: dmd.regression_weight = 0.05" in text  # the schedule is part of what the run used
    card = write_model_card(tmp_path / "s", method="dmd2", teacher="../runs/my_teacher/model", steps=[999],
                            config=to_dict(cfg)).read_text()
    assert "base_model" not in card and "../runs" not in card.split("## Training configuration")[0]
    assert "## This run" in card and "regression loss at weight 0.25" in card
    card = write_model_card(tmp_path / "t", method="dmd2", teacher="builtin:animal_mnist", steps=[999],
                            config=to_dict(cfg)).read_text()
    assert "base_model: builtin:animal_mnist" in card


def test_the_demo_warms_a_model_up_before_its_first_timed_call(monkeypatch):
    from stepdistill.frontends import demo

    calls = []
    orig = demo._warm_up
    monkeypatch.setattr(demo, "_warm_up", lambda pipe, plan, role: (calls.append((id(pipe), role)),
                                                                    orig(pipe, plan, role)))
    for _ in range(2):
        demo.generate("builtin:animal_mnist", "builtin:animal_mnist_dmd2", seed=0, batch_size=1, teacher_steps=2)
    assert len(calls) == 4 and id(demo.load_student(demo.read_model_info("builtin:animal_mnist_dmd2"))) in demo._WARM


# ----------------------------------------------------------------------------- one flag vocabulary

def _subcommands() -> dict[str, argparse.ArgumentParser]:
    import stepdistill.frontends.cli as cli

    captured = {}
    orig = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                captured.update(action.choices)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = orig
    return captured


def test_every_subcommand_speaks_one_flag_vocabulary(capsys):
    subs = _subcommands()
    assert set(subs) >= {"teacher", "distill", "export", "sample", "eval", "bench", "curve", "report", "onnx", "plan",
                         "demo"}
    import stepdistill.frontends.cli as cli

    for name in subs:  # the top-level help names every command
        assert name in cli.__doc__
    runs_networks = ("sample", "eval", "bench", "curve", "report", "onnx", "demo")
    for name, p in subs.items():
        flags = {o: a for a in p._actions for o in a.option_strings}
        text = p.format_help()
        assert "--scheduler" not in flags or flags["--scheduler"].dest == "sampler", name  # old spelling = alias
        if name in runs_networks:
            assert "--threads" in flags, f"{name} has no --threads"
        if "--seed" in flags:
            assert "0..2**31-1" in (flags["--seed"].help or ""), name
        if "--teacher-steps" in flags:
            assert flags["--teacher-steps"].default == 50, name     # the teacher's steps: 50 everywhere
        if "--sampler" in flags:
            assert flags["--sampler"].dest == "sampler", name
        if name == "distill":
            assert "export" not in flags["--overwrite"].help and "never other files" in flags["--overwrite"].help
        assert text
