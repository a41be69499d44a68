"""What stepdistill may write over and delete: only what it wrote itself.

Every folder stepdistill creates as a whole (a training run's ``output_dir``, an exported model, an ONNX
export's files, a report) carries a marker, ``.stepdistill.json``, that says what kind of folder it is and, for
folders written at once, which files are ours. ``--overwrite`` then

* clears a *run* folder of the files a run writes (:data:`RUN_OUTPUTS`) and nothing else;
* replaces an *export* / *report* folder only when everything in it is listed in its marker;
* refuses, with one line and exit 2, a folder that is neither empty nor marked, the working folder or one
  above it, the home folder, a filesystem root, a folder that holds ``.git``, a folder that holds one of the
  run's own inputs (teacher, data, fork checkpoint, config file), and any path through a symbolic link.

Single files (``sample --out``, ``onnx --out``'s ``.json``) are replaced without ``--overwrite`` only when they
are ours (a PNG tagged by stepdistill, a JSON with our marker key). :func:`run_lock` refuses a second
process writing the same run folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import OutputExistsError

MARKER = ".stepdistill.json"
LOCK = ".stepdistill.lock"
#: what a training run writes into its output_dir (trainers/core.py, distill.py, teacher.py, guards.py, curve)
RUN_OUTPUTS = ("checkpoints", "log.jsonl", "guards.jsonl", "samples", "loss.png", "config.yaml", "student", "model",
               "training_result.json", "curve", MARKER)
#: a stepdistill PNG carries this tEXt key (utils.save_grid); a stepdistill JSON this top-level key
PNG_TAG = "stepdistill"
JSON_TAG = "stepdistill_output"


def read_marker(folder: Path) -> dict | None:
    p = Path(folder) / MARKER
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and "kind" in m else None


def write_marker(folder: Path, kind: str, files: list[str] | None = None, run_id: str | None = None) -> None:
    from . import __version__

    body = {"kind": kind, "written_by": f"stepdistill {__version__}"}
    if run_id:
        body["run_id"] = run_id
    if files is not None:
        body["files"] = sorted(files)
    (Path(folder) / MARKER).write_text(json.dumps(body, indent=1) + "\n")


def _within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def protected_reason(out: Path, inputs: list | tuple = ()) -> str | None:
    """Why ``out`` must never be cleared, or None. ``inputs``: paths the command reads (teacher, data, config,
    the checkpoint it starts from)."""
    out = Path(out).expanduser()
    absolute = Path(os.path.abspath(out))
    real = Path(os.path.realpath(out))
    if real != absolute:
        return f"{out} is reached through a symbolic link ({absolute} -> {real})"
    home = Path(os.path.realpath(Path.home()))
    cwd = Path(os.path.realpath(Path.cwd()))
    if real == Path(real.anchor):
        return f"{out} is a filesystem root"
    if _within(home, real):
        return f"{out} is the home folder or holds it"
    if _within(cwd, real):
        return f"{out} is the working folder or holds it"
    if (real / ".git").exists():
        return f"{out} holds a .git repository"
    for item in inputs:
        if not item or "://" in str(item) or str(item).startswith("builtin:"):
            continue
        p = Path(os.path.realpath(Path(str(item)).expanduser()))
        if p.exists() and _within(p, real):
            return f"{out} holds one of this command's inputs ({item})"
    return None


def _refuse(msg: str) -> None:
    raise OutputExistsError(msg)


def run_inputs(cfg, fork=None) -> list:
    """Paths a training run reads (teacher, student init, data, text encoder and prompts, PSO model and targets,
    the fork checkpoint, the config file): ``--overwrite`` never clears a folder that holds one."""
    keys = ("dmd.teacher", "dmd.student_init", "pso.model", "pso.target", "pso.pairs", "data.name", "text.encoder",
            "text.prompts")
    out = [fork, getattr(cfg, "source_path", None)]
    for k in keys:
        obj = cfg
        for part in k.split("."):
            obj = getattr(obj, part, None)
        out.append(obj)
    return [str(p) for p in out if p]


def prepare_run_dir(out: Path, overwrite: bool, inputs: list | tuple = (), delete: bool = True) -> None:
    """A fresh training run into ``out``. A folder that holds a run is refused unless ``overwrite``; then only
    the run's own outputs (:data:`RUN_OUTPUTS`) are deleted, and only in a folder that carries our marker.
    ``delete=False`` only checks (nothing is written or removed)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        _refuse(f"output_dir {out} is a file, not a folder; choose another output_dir")
    used = [m for m in RUN_OUTPUTS if (out / m).exists() and m != MARKER]
    if not used:
        return  # nothing of a run here (an empty folder, or the user's own files beside which a run may live)
    if not overwrite:
        _refuse(f"{out} already holds a run ({', '.join(used)}); pass --overwrite to delete it and start afresh, "
                f"--resume to continue it, or choose another output_dir")
    why = protected_reason(out, inputs)
    if why:
        _refuse(f"--overwrite refused: {why}; nothing was deleted. Choose another output_dir")
    marker = read_marker(out)
    if marker is None or marker.get("kind") != "run":
        _refuse(f"--overwrite refused: {out} holds {', '.join(used)} but no {MARKER} (stepdistill did not create "
                f"it as a run folder); nothing was deleted. Delete those files yourself or choose another output_dir")
    if not delete:
        return
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def mark_run_dir(out: Path) -> str:
    """Mark ``out`` as a run folder (once; a fresh start after ``--overwrite`` gets a new one) and return the run's
    identity, which its checkpoints record and ``--resume`` checks."""
    import uuid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = read_marker(out)
    if marker is not None and marker.get("kind") == "run" and marker.get("run_id"):
        return marker["run_id"]
    run_id = uuid.uuid4().hex[:16]
    write_marker(out, "run", run_id=run_id)
    return run_id


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold ``out/.stepdistill.lock`` (an advisory ``flock``, released when the process ends, even on SIGKILL)
    for the block; a second process that wants it gets one line and exit 2."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        _refuse(f"{out} is being written by another stepdistill process ({holder}); wait for it to finish, or "
                f"choose another output_dir")
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


def check_replace_folder(out: Path, overwrite: bool, kind: str, inputs: list | tuple = ()) -> None:
    """Before writing the folder ``out`` at once (export, report): an empty or missing folder is fine; a folder
    with files needs ``overwrite``, our marker of the same ``kind`` and nothing in it that the marker does not
    list (the user's own files), and must not be protected (:func:`protected_reason`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        _refuse(f"{out} is a file, not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        why = protected_reason(out, inputs) if out.exists() else None
        if why:
            _refuse(f"refused: {why}; choose another --out")
        return
    if not overwrite:
        _refuse(f"{out} already exists and is not empty; pass --overwrite to replace it or choose another folder")
    why = protected_reason(out, inputs)
    if why:
        _refuse(f"--overwrite refused: {why}; nothing was deleted. Choose another --out")
    marker = read_marker(out)
    if marker is None or marker.get("kind") != kind:
        what = f"a stepdistill {marker['kind']} folder" if marker else f"not a folder stepdistill wrote (no {MARKER})"
        _refuse(f"--overwrite refused: {out} is {what}, not a {kind} folder; nothing was deleted. Choose another --out")
    listed = set(marker.get("files", []))
    extra = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER
                   and str(p.relative_to(out)) not in listed)
    if extra:
        _refuse(f"--overwrite refused: {out} holds files stepdistill did not write ({extra[0]}"
                f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}); nothing was deleted. Move them away "
                f"or choose another --out")


def check_report_dir(out: Path, overwrite: bool) -> None:
    """``report --out``: a missing, empty or earlier report folder is written into; another folder with files
    needs ``overwrite`` (only the report's own file names are then replaced, nothing is deleted)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        marker = read_marker(out)
        if marker is None or marker.get("kind") != "report":
            _refuse(f"--out {out} already holds files that no stepdistill report wrote; pass --overwrite to write "
                    f"the report's files (report.md, report.json, PNGs) beside them, or choose another folder")


_TEMP = re.compile(r"^\.(?:tmp|old)_.+_(\d+)$|^\..+\.(\d+)\.(?:json\.)?tmp(?:\.png)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files and folders our atomic writes leave when a process is killed (their names carry
    the writer's pid; only those of processes that no longer run are removed). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def mark_folder(folder: Path, kind: str) -> None:
    """Write the marker of a folder written at once, listing every file in it."""
    folder = Path(folder)
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER]
    write_marker(folder, kind, files)


def is_our_file(path: Path) -> bool:
    """Whether ``path`` is a file stepdistill wrote: a PNG with our tEXt tag or a JSON with our marker key."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return PNG_TAG in getattr(im, "text", {})
        if path.suffix.lower() == ".json":
            d = json.loads(path.read_text())
            return isinstance(d, dict) and JSON_TAG in d
        if path.suffix.lower() == ".onnx":  # ours when the JSON beside it is ours and names it
            side = path.with_suffix(".json")
            return side.exists() and is_our_file(side)
    except (OSError, ValueError, SyntaxError):
        return False
    return False


def check_replace_file(path: Path, overwrite: bool, what: str = "--out") -> None:
    """A single output file: a missing file or one of ours is replaced; anything else needs ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        _refuse(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite and not is_our_file(path):
        _refuse(f"{what} {path} already exists and stepdistill did not write it; pass --overwrite to replace it or "
                f"choose another name")
