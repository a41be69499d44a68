"""Failure behaviour (README "Failure behaviour"): nothing silently wrong, nothing lost, one line per bad input.

Each test asserts the exit code, the message, and that nothing was overwritten."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import distill_argv, run_cli, snapshot, tiny_cfg, tiny_distill_overrides
from stepdistill.frontends.cli import main
from stepdistill.config import ConfigError, DistillConfig, load_config
from stepdistill.errors import CheckpointError, StepDistillError
from stepdistill.trainers.core import Trainer
from stepdistill.errors import NonFiniteLossError
from stepdistill.trainers.distill import build_method, distill


_cfg, _argv, _run = tiny_cfg, distill_argv, run_cli


@pytest.fixture(scope="module")
def done_run(tiny_teacher, tmp_path_factory):
    """A finished 4-step tiny run (checkpoints at steps 2 and 4, exported student)."""
    out = tmp_path_factory.mktemp("done_run")
    distill(_cfg(tiny_teacher, out))
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_snapshot = snapshot


# ----------------------------------------------------------------------------- used output_dir, resume

def test_fresh_run_into_a_used_output_dir_is_refused(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    before = _snapshot(run)
    rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"train.seed": 1}))
    assert rc == 2 and "already holds a run" in err and "--overwrite" in err and err.count("\n") == 1
    assert _snapshot(run) == before                   # log, student and checkpoints untouched


def test_overwrite_clears_the_old_run(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    (run / "checkpoints" / "step_000099").mkdir()     # an old checkpoint a new run must not inherit
    rc, _, _ = _run(capsys, _argv(tiny_teacher, run, **{"train.max_steps": 2, "train.checkpoint_every": 2,
                                                          "train.sample_every": 2}) + ["--overwrite"])
    assert rc == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_a_run_from_before_a_config_key_existed(tiny_teacher, done_run, tmp_path, capsys):
    """A checkpoint that does not record a key added later (here dmd.divergence) resumes with its default, and
    is refused when the key is set to something else."""
    run = _copy_run(done_run, tmp_path / "run")
    for ckpt in (run / "checkpoints").glob("step_*"):
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["config"]["dmd"].pop("divergence")
        (ckpt / "meta.json").write_text(json.dumps(meta))
    rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"dmd.divergence": "js", "dmd.gan": "true",
                                                          "train.max_steps": 6}) + ["--resume"])
    assert rc == 2 and "dmd.divergence (None" not in err and "dmd.divergence ('reverse_kl' -> 'js')" in err
    rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"train.max_steps": 5}) + ["--resume"])
    assert rc == 0, err


def test_resume_with_another_config_names_the_keys(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    before = _snapshot(run / "checkpoints")
    rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"train.seed": 7, "dmd.student_lr": 3e-4,
                                                          "train.max_steps": 6}) + ["--resume"])
    assert rc == 2 and "another config" in err and "train.seed" in err and "dmd.optim.lr" in err
    assert "train.max_steps" not in err               # may change on resume
    assert _snapshot(run / "checkpoints") == before


def test_resume_may_extend_max_steps(tiny_teacher, done_run, tmp_path):
    run = _copy_run(done_run, tmp_path / "run")
    distill(_cfg(tiny_teacher, run, **{"train.max_steps": 6}), resume=True)
    assert (run / "checkpoints" / "step_000006").is_dir()


def test_resume_a_checkpoint_written_with_the_old_optimizer_keys(tiny_teacher, done_run, tmp_path):
    """Checkpoints of earlier releases record dmd.student_lr / critic_lr / beta1 ...: they still resume (the
    config comparison reads them through config.upgrade_keys), and a real change is still refused."""
    run = _copy_run(done_run, tmp_path / "run")
    meta_p = run / "checkpoints" / "step_000004" / "meta.json"
    meta = json.loads(meta_p.read_text())
    d = meta["config"]["dmd"]
    o, c = d.pop("optim"), d.pop("critic_optim")
    assert o == {**c, "lr": o["lr"]}
    d.update(student_lr=o["lr"], critic_lr=c["lr"], **{k: o[k] for k in ("beta1", "beta2", "weight_decay",
                                                                         "grad_clip", "warmup_steps")})
    meta_p.write_text(json.dumps(meta))                # meta.json is not among its own hashed files
    with pytest.raises(CheckpointError, match=r"another config: dmd\.critic_optim\.lr"):
        distill(_cfg(tiny_teacher, run, **{"train.max_steps": 6, "dmd.critic_lr": 3e-4}), resume=True)
    distill(_cfg(tiny_teacher, run, **{"train.max_steps": 6}), resume=True)
    assert (run / "checkpoints" / "step_000006").is_dir()


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_one(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    f = run / "checkpoints" / "step_000004" / "models.safetensors"
    f.write_bytes(f.read_bytes()[:-20])                # truncated
    cfg = _cfg(tiny_teacher, run)
    obj, data, _ = build_method(cfg)
    tr = Trainer(obj, cfg, data=data)
    assert tr.load_resume_point(True)
    assert (tr.step, tr.update) == (2, 0)
    err = capsys.readouterr().err
    assert "failed its check" in err and "step_000002" in err


def test_resume_last_good_after_a_nan_stop(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path)
    obj, data, _ = build_method(cfg)
    tr = Trainer(obj, cfg, data=data)
    orig = obj.loss

    def loss(player, ctx):
        total, logs = orig(player, ctx)
        return (total * float("nan"), logs) if tr.step == 3 and player == "generator" else (total, logs)

    obj.loss = loss
    with pytest.raises(NonFiniteLossError, match="--resume last_good"):
        tr.train()
    obj2, data2, _ = build_method(cfg)
    tr2 = Trainer(obj2, cfg, data=data2)
    res = tr2.train(resume="last_good")
    assert res["steps"] == 4 and not res["interrupted"]


# ----------------------------------------------------------------------------- interruption

def test_second_interrupt_mid_update_saves_nothing_and_resume_is_exact(tiny_teacher, tmp_path, capsys):
    full = Trainer(*_built(tiny_teacher, tmp_path / "full"))
    full.train()
    obj, cfg, data = _built_parts(tiny_teacher, tmp_path / "int")
    tr = Trainer(obj, cfg, data=data)
    real_step = tr.opts["critic"].step

    def step_then_ctrl_c(*a, **k):
        out = real_step(*a, **k)
        if tr.step == 2 and tr.update == 1:
            raise KeyboardInterrupt  # what the second signal does: after the optimizer, before the bookkeeping
        return out

    tr.opts["critic"].step = step_then_ctrl_c
    res = tr.train()
    assert res["interrupted"]
    err = capsys.readouterr().err
    assert "nothing saved" in err and "--resume" in err
    meta = json.loads((tmp_path / "int" / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert (meta["step"], meta["update"]) == (2, 0)  # the boundary before, not the half-applied update
    resumed = Trainer(*_built(tiny_teacher, tmp_path / "int"))
    resumed.train(resume=True)
    a = load_file(tmp_path / "full" / "checkpoints" / "step_000004" / "models.safetensors")
    b = load_file(tmp_path / "int" / "checkpoints" / "step_000004" / "models.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _built_parts(teacher, out):
    cfg = _cfg(teacher, out)
    obj, data, _ = build_method(cfg)
    return obj, cfg, data


def _built(teacher, out):
    obj, cfg, data = _built_parts(teacher, out)
    return obj, cfg, None, data


def test_sigterm_exits_143_with_the_resume_command(tiny_teacher, tmp_path, capsys, monkeypatch):
    real = Trainer._run_step

    def run_step(self):
        if self.step == 1 and self.update == 0:
            os.kill(os.getpid(), signal.SIGTERM)      # a real signal, handled by the trainer
        return real(self)

    monkeypatch.setattr(Trainer, "_run_step", run_step)
    rc, _, err = _run(capsys, _argv(tiny_teacher, tmp_path))
    assert rc == 143
    assert f"stepdistill distill --config {tmp_path / 'config.yaml'} --resume" in err
    assert json.loads((tmp_path / "checkpoints" / "step_000001" / "meta.json").read_text())["update"] in (0, 1)
    assert not (tmp_path / "student").exists()        # an interrupted run exports nothing


# ----------------------------------------------------------------------------- export

def test_export_verifies_the_checkpoint(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    f = run / "checkpoints" / "step_000004" / "models.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    rc, _, err = _run(capsys, ["export", "--config", run / "config.yaml", f"output_dir={run}", "--out", tmp_path / "exp"])
    assert rc == 2 and "corrupt (sha256 mismatch)" in err
    assert not (tmp_path / "exp").exists()


def test_export_refuses_a_non_empty_folder_unless_overwrite(tiny_teacher, done_run, tmp_path, capsys):
    target = tmp_path / "teacher_copy"
    shutil.copytree(tiny_teacher, target)
    before = _snapshot(target)
    rc, _, err = _run(capsys, ["export", "--config", done_run / "config.yaml", "--out", target])
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert _snapshot(target) == before
    (target / "notes.txt").write_text("the user's")  # a file stepdistill did not write: never deleted
    rc, _, err = _run(capsys, ["export", "--config", done_run / "config.yaml", "--out", target, "--overwrite"])
    assert rc == 2 and "did not write (notes.txt)" in err and (target / "notes.txt").read_text() == "the user's"
    (target / "notes.txt").unlink()  # an earlier export (marked, every file listed) is replaced as a whole
    (target / "scheduler" / "scheduler_config.json").unlink()
    rc, out, _ = _run(capsys, ["export", "--config", done_run / "config.yaml", "--out", target, "--overwrite"])
    assert rc == 0 and json.loads(out)["exported"] == str(target)
    assert (target / "scheduler" / "scheduler_config.json").exists()
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "StepDistillPipeline"
    assert not list(tmp_path.glob(".tmp_*")) and not list(tmp_path.glob(".old_*"))
    card = (target / "README.md").read_text()  # written in the temporary folder, it names the final one
    assert "# teacher_copy: " in card and 'from_pretrained("teacher_copy")' in card and ".tmp_" not in card


# ----------------------------------------------------------------------------- non-finite values

def test_nan_teacher_stops_instead_of_training_on_zeroed_gradients(tiny_teacher, tmp_path):
    obj, cfg, data = _built_parts(tiny_teacher, tmp_path)
    real = obj.teacher.forward
    obj.teacher.forward = lambda *a, **k: real(*a, **k) * float("nan")
    tr = Trainer(obj, cfg, data=data)
    with pytest.raises(NonFiniteLossError, match="dm_nonfinite_frac.*train.nonfinite_tolerance"):
        tr.train()


@pytest.mark.parametrize("override, key", [
    ("dmd.real_guidance_scale=inf", "dmd.real_guidance_scale: must be a finite number"),
    ("dmd.real_guidance_scale=-1", "dmd.real_guidance_scale: must be >= 0"),
    ("dmd.gan_g_weight=nan", "dmd.gan_g_weight: must be a finite number"),
    ("dmd.optim.lr=-1e-4", "dmd.optim.lr: must be >= 0"),
    ("dmd.student_lr=-1e-4", "dmd.optim.lr: must be >= 0, got -0.0001 (given as dmd.student_lr"),
    ("data.resolution=0", "data.resolution: must be > 0"),
])
def test_config_refuses_non_finite_and_negative_values(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, [override])
    assert str(e.value).startswith(key)


def test_a_student_as_teacher_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="is a distilled student.*allow_student_teacher"):
        build_method(load_config(DistillConfig, None, ["dmd.teacher=builtin:animal_mnist_dmd2", f"output_dir={tmp_path}"]))


# ----------------------------------------------------------------------------- CLI: one line, exit 2

@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--num", "0"], "--num must be >= 1"),
    (["--seed", str(2**70)], "--seed must be in"),
    (["--scheduler", "bogus", "--num", "2"], "unknown sampler / --scheduler 'bogus'"),
    (["--num", "100000000"], "GiB; lower --num"),
])
def test_sample_refuses_bad_flags(args, message, tmp_path, capsys):
    rc, _, err = _run(capsys, ["sample", "--model", "builtin:animal_mnist", "--out", tmp_path / "g.png", *args])
    assert rc == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    rc, _, err = _run(capsys, ["distill", "--config", bad])
    assert rc == 2 and "not valid" in err and "line 3" in err and "Traceback" not in err
    rc, _, err = _run(capsys, ["distill", "--config", tmp_path])          # a folder as --config
    assert rc == 2 and err.count("\n") == 1
    with pytest.raises(StepDistillError):
        main(["--debug", "distill", "--config", str(tmp_path / "missing.yaml")])


def test_truncated_weights_and_missing_paths_are_one_line(tiny_teacher, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_teacher, broken)
    w = next(broken.rglob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    rc, _, err = _run(capsys, ["sample", "--model", broken, "--out", tmp_path / "g.png"])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    rc, _, err = _run(capsys, ["sample", "--model", tmp_path / "nope" / "model", "--out", tmp_path / "g.png"])
    assert rc == 2 and "no such folder" in err


def test_eval_prints_metrics_before_an_unwritable_out(monkeypatch, tmp_path, capsys):
    from stepdistill.eval import generate

    monkeypatch.setattr(generate, "evaluate_model", lambda *a, **k: {"fid": 12.5, "recall": 0.5})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, out, err = _run(capsys, ["eval", "--model", "builtin:animal_mnist", "--out", blocker / "eval.json"])
    assert rc == 2 and json.loads(out) == {"fid": 12.5, "recall": 0.5} and err.startswith("error: ")


# ----------------------------------------------------------------------------- hub ids, pickle, caches

def test_hub_id_loads_from_a_cached_snapshot_offline(tiny_teacher, tmp_path, monkeypatch):
    from stepdistill.models import load_denoiser

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-teacher"
    shutil.copytree(tiny_teacher, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    den, meta = load_denoiser("someone/tiny-teacher")
    ref, _ = load_denoiser(tiny_teacher)
    assert meta.class_names == [str(i) for i in range(10)] or meta.class_names
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 100.0])
    torch.testing.assert_close(den(x, t, torch.tensor([1, 2])), ref(x, t, torch.tensor([1, 2])))
    with pytest.raises(Exception, match="no local folder 'someone/absent'.*hub id it could not be fetched"):
        load_denoiser("someone/absent")


def test_pickle_only_folder_is_refused_by_the_demo_and_eval(tiny_teacher, tmp_path):
    from diffusers import UNet2DModel

    from stepdistill.frontends.demo import DemoInputError, load_teacher, read_model_info
    from stepdistill.eval.generate import load_any
    from stepdistill.models import ModelLoadError

    folder = tmp_path / "bin_teacher"
    shutil.copytree(tiny_teacher, folder)
    unet = UNet2DModel.from_pretrained(folder / "unet")
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert list((folder / "unet").glob("*.bin"))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_any(folder, device="cpu")
    with pytest.raises((DemoInputError, OSError, EnvironmentError)):
        load_teacher(read_model_info(str(folder), "teacher"))


def test_fidelity_cache_is_private(tmp_path):
    from stepdistill.eval.fid import private_dir

    d = private_dir(tmp_path / "fid_cache")
    assert (d.stat().st_mode & 0o777) == 0o700


def test_fork_branches_a_new_run_off_another_runs_checkpoint(tiny_teacher, done_run, tmp_path, capsys):
    ckpt = done_run / "checkpoints" / "step_000002"
    argv = _argv(tiny_teacher, tmp_path / "branch", **{"dmd.gan": "false"})
    rc, _, err = _run(capsys, argv + ["--resume", str(ckpt)])
    assert rc == 2 and "another config" in err and "--fork" in err      # resume refuses the changed config
    rc, _, err = _run(capsys, argv + ["--fork", str(ckpt)])
    assert rc == 0 and "--fork: starting from" in err and "dmd.gan True -> False" in err
    rows = [json.loads(x) for x in (tmp_path / "branch" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4] and all("gan_g_loss" not in r for r in rows)


def test_resume_followed_by_an_override_on_the_command_line(tiny_teacher, done_run, tmp_path, capsys):
    run = _copy_run(done_run, tmp_path / "run")
    overrides = [o for o in tiny_distill_overrides(tiny_teacher, run) if not o.startswith("train.max_steps=")]
    argv = ["distill", "--config", "", "--resume", "train.max_steps=6", *overrides]  # argparse: --resume [CKPT]
    rc, _, err = _run(capsys, argv)
    assert rc == 0, err
    assert (run / "checkpoints" / "step_000006").is_dir()


@pytest.mark.parametrize("cmd", [["eval", "--model", "builtin:animal_mnist"], ["bench", "--student", "x"],
                                 ["report", "--student", "x", "--out", "r"]])
def test_huge_seed_is_refused_by_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--seed", str(2**64)])
    assert e.value.code == 2 and "--seed: must be in 0..2147483647" in capsys.readouterr().err
