"""We delete only what we wrote (stepdistill/outputs.py): every probe plants canary files and checks that each one
survives, byte for byte, whatever the command did."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import distill_argv, run_cli, snapshot, tiny_cfg
from stepdistill.errors import CheckpointError, OutputExistsError
from stepdistill.outputs import MARKER, protected_reason, run_lock
from stepdistill.trainers.distill import distill


_cfg, _argv, _run = tiny_cfg, distill_argv, run_cli


_snapshot = snapshot


def _canaries(folder: Path) -> dict:
    """A user's own files, as a probe would find them: notes, a source folder, their own config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes")
    (folder / "src").mkdir(exist_ok=True)
    (folder / "src" / "train.py").write_text("print('mine')")
    (folder / "my_config.yaml").write_text("lr: 1\n")
    return {k: v for k, v in _snapshot(folder).items() if k in ("notes.md", "src/train.py", "my_config.yaml")}


def _still_there(folder: Path, canaries: dict) -> bool:
    now = _snapshot(folder)
    return all(now.get(k) == v for k, v in canaries.items())


@pytest.fixture(scope="module")
def done_run(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("done_run_outputs")
    distill(_cfg(tiny_teacher, out))
    return out


# ----------------------------------------------------------------------------- --overwrite of run folders

def test_overwrite_refuses_a_folder_that_looks_like_a_run_but_is_not_ours(tiny_teacher, tmp_path, capsys):
    folder = tmp_path / "project"
    canaries = _canaries(folder)
    (folder / "config.yaml").write_text("mine: true\n")   # looks like a run...
    (folder / "model").mkdir()
    (folder / "model" / "weights.bin").write_bytes(b"mine")
    before = _snapshot(folder)
    rc, _, err = _run(capsys, _argv(tiny_teacher, folder) + ["--overwrite"])
    assert rc == 2 and MARKER in err and "nothing was deleted" in err and err.count("\n") == 1
    assert _snapshot(folder) == before and _still_there(folder, canaries)


def test_overwrite_of_our_run_deletes_only_the_runs_files(tiny_teacher, done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    canaries = _canaries(run)                              # the user keeps notes inside the run folder
    rc, _, _ = _run(capsys, _argv(tiny_teacher, run, **{"train.max_steps": 2}) + ["--overwrite"])
    assert rc == 0 and _still_there(run, canaries)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]


@pytest.mark.parametrize("where", ["cwd", "git", "symlink", "teacher_inside", "data_inside", "config_inside"])
def test_overwrite_never_clears_protected_folders(where, tiny_teacher, done_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    argv_extra, target = {}, run
    if where == "cwd":
        monkeypatch.chdir(run)
        target = Path(".")
    elif where == "git":
        (run / ".git").mkdir()
        (run / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    elif where == "symlink":
        link = tmp_path / "link"
        link.symlink_to(run)
        target = link
    elif where == "teacher_inside":
        shutil.copytree(tiny_teacher, run / "my_teacher")
        argv_extra["dmd.teacher"] = run / "my_teacher"
    elif where == "data_inside":
        from PIL import Image

        for c in range(10):  # the tiny teacher's 10 classes, one folder each
            (run / "images" / str(c)).mkdir(parents=True)
            Image.new("L", (16, 16), 20 * c).save(run / "images" / str(c) / "0.png")
        argv_extra.update({"data.name": run / "images"})
    before = _snapshot(run)
    argv = _argv(tiny_teacher, target, **argv_extra) + ["--overwrite"]
    if where == "config_inside":
        cfg_file = run / "my.yaml"
        cfg_file.write_text(f"output_dir: {run}\n")
        before = _snapshot(run)
        argv[2] = cfg_file
    rc, _, err = _run(capsys, argv)
    assert rc == 2 and "--overwrite refused" in err and "nothing was deleted" in err, err
    assert _snapshot(run) == before


def test_protected_reasons_name_the_folder(tmp_path):
    assert "filesystem root" in protected_reason(Path("/"))
    assert "home folder" in protected_reason(Path.home())
    assert protected_reason(tmp_path / "fresh") is None


def test_fork_of_the_runs_own_checkpoint_with_overwrite_deletes_nothing(tiny_teacher, done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = _snapshot(run)
    rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"train.max_steps": 6})
                      + ["--overwrite", "--fork", run / "checkpoints" / "step_000004"])
    assert rc == 2 and "holds one of this command's inputs" in err
    assert _snapshot(run) == before


def test_a_second_writer_is_refused_by_the_lock(tiny_teacher, done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = _snapshot(run)
    with run_lock(run):  # another process would hold this flock; a second open file description conflicts too
        rc, _, err = _run(capsys, _argv(tiny_teacher, run, **{"train.max_steps": 6}) + ["--resume"])
    assert rc == 2 and "being written by another stepdistill process" in err
    assert {k: v for k, v in _snapshot(run).items() if ".lock" not in k} == \
        {k: v for k, v in before.items() if ".lock" not in k}


# ----------------------------------------------------------------------------- export, sample, onnx, report

def test_export_into_the_runs_own_folder_is_refused(tiny_teacher, done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = _snapshot(run)
    rc, _, err = _run(capsys, ["export", "--config", run / "config.yaml", "--out", run, "--overwrite"])
    assert rc == 2 and "refused" in err
    assert _snapshot(run) == before


def test_export_refuses_a_checkpoint_of_another_run(tiny_teacher, done_run, tmp_path, capsys):
    other = tmp_path / "two_step"
    distill(_cfg(tiny_teacher, other, **{"dmd.student_timesteps": "[999,500]", "train.max_steps": 2}))
    rc, _, err = _run(capsys, ["export", "--config", done_run / "config.yaml", "--out", tmp_path / "x",
                               "--checkpoint", other / "checkpoints" / "step_000002"])
    assert rc == 2 and "another config" in err and "dmd.student_timesteps" in err
    assert not (tmp_path / "x").exists()


def test_sample_replaces_only_its_own_grids(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    rc, _, err = _run(capsys, ["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "2", "--out", notes])
    assert rc == 2 and ".png" in err and notes.read_text() == "keep me"
    theirs = tmp_path / "photo.png"
    from PIL import Image

    Image.new("L", (4, 4)).save(theirs)
    before = theirs.read_bytes()
    rc, _, err = _run(capsys, ["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "2", "--out", theirs])
    assert rc == 2 and "--overwrite" in err and theirs.read_bytes() == before
    ours = tmp_path / "grid.png"
    for _ in range(2):  # a grid we wrote is replaced without asking
        rc, _, _ = _run(capsys, ["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "2", "--out", ours])
        assert rc == 0
    rc, _, _ = _run(capsys, ["sample", "--model", "builtin:animal_mnist_dmd2", "--num", "2", "--out", theirs,
                             "--overwrite"])
    assert rc == 0 and theirs.read_bytes() != before


def test_report_does_not_write_into_a_users_folder_without_overwrite(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.md").write_text("my report")
    rc, _, err = _run(capsys, ["report", "--student", "builtin:animal_mnist_dmd2", "--out", folder, "--num", "10"])
    assert rc == 2 and "--overwrite" in err and (folder / "report.md").read_text() == "my report"


# ----------------------------------------------------------------------------- failures leave no litter

def test_disk_full_during_a_checkpoint_leaves_no_temp_folder(tiny_teacher, tmp_path, monkeypatch, capsys):
    from stepdistill.trainers import checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    rc, _, err = _run(capsys, _argv(tiny_teacher, tmp_path / "run"))
    last = err.strip().splitlines()[-1]  # after the progress bar: one error line
    assert rc == 2 and last.startswith("error: could not write checkpoint") and "No space left on device" in last
    assert "Free disk space" in last
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.startswith(".tmp")]


def test_resume_refuses_a_retrained_teacher(tiny_teacher, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    run = tmp_path / "run"
    distill(_cfg(teacher, run, **{"train.max_steps": 2}))
    w = next(teacher.rglob("*.safetensors"))
    t = load_file(w)
    k = next(iter(t))
    t[k] = t[k] + 0.01                                      # "retrained at the same path"
    save_file(t, w)
    with pytest.raises(CheckpointError, match="other teacher weights"):
        distill(_cfg(teacher, run, **{"train.max_steps": 4}), resume=True)
    meta = json.loads((run / "checkpoints" / "step_000002" / "meta.json").read_text())
    assert len(meta["teacher_sha256"]) == 16


def test_output_exists_error_is_one_line_with_exit_2(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    from stepdistill.outputs import prepare_run_dir

    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_run_dir(f, overwrite=True)
    assert f.read_text() == "x" and os.path.exists(f)


def test_checkpoints_record_their_run_and_resume_only_it(tiny_teacher, done_run, tmp_path, capsys):
    other = tmp_path / "other"
    distill(_cfg(tiny_teacher, other, **{"train.max_steps": 2}))
    a = json.loads((done_run / "checkpoints" / "step_000002" / "meta.json").read_text())["run_id"]
    b = json.loads((other / "checkpoints" / "step_000002" / "meta.json").read_text())["run_id"]
    assert a and b and a != b and json.loads((other / MARKER).read_text())["run_id"] == b
    rc, _, err = _run(capsys, _argv(tiny_teacher, other, **{"train.max_steps": 6})
                      + ["--resume", done_run / "checkpoints" / "step_000002"])
    assert rc == 2 and "written by another run" in err and "--fork" in err
