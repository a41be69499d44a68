"""Checkpoints of a training run, and the run folder they live in: the half of the trainer that touches the disk.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` written atomically (a temp folder, every file hashed into
``meta.json``, then renamed into place): ``models.safetensors`` (players and their EMA), ``optim.pt``, ``rng.pt`` and
``meta.json`` (step, update, the config as loaded, the teacher's hash, the run id, wall seconds, the schedule's
values in force). ``--resume`` continues only the run that wrote it (same config apart from
:data:`RESUME_MAY_CHANGE`, same teacher, same run id); ``--fork`` branches a new run off it. The run folder's
policy (what may be written or deleted) is :mod:`stepdistill.outputs`'s.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..config import drop_foreign_keys, to_dict, upgrade_keys
from ..errors import CheckpointError
from ..outputs import clean_stale_temps, mark_run_dir, prepare_run_dir, read_marker, run_inputs, run_lock, write_marker
from ..utils import atomic_write_text, sha256_file, swap_into_place


class CheckpointIO:
    """The :class:`~stepdistill.trainers.core.Trainer`'s checkpoints and run folder (a mixin: it reads the
    trainer's ``obj``, ``cfg``, ``acc``, ``opts``, ``ema``, ``step`` / ``update``, ``out`` / ``ckpt_dir``)."""

    def open_run_folder(self, stack, resume, overwrite: bool, fork) -> None:
        """Take the run folder before the loop starts: refuse what must not be written (``outputs.prepare_run_dir``:
        only a folder stepdistill made may be cleared by ``--overwrite``, and only of the run's own files), hold
        the one-writer lock for the run's lifetime (``stack``), mark the folder with its run id and clear the
        temp litter of a killed earlier process. Main process only."""
        inputs = run_inputs(self.cfg, fork)
        if not resume:  # refuse before anything is written, the lock file included
            prepare_run_dir(self.out, overwrite, inputs, delete=False)
        stack.enter_context(run_lock(self.out))
        if not resume:
            prepare_run_dir(self.out, overwrite, inputs)
        self._marker_is_new = read_marker(self.out) is None  # checkpoints copied into a new folder
        self.run_id = mark_run_dir(self.out)
        for folder in (self.out, self.ckpt_dir, self.out / "samples"):  # litter of a killed earlier process
            clean_stale_temps(folder)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.fsdp:  # gathered: collective, the main process gets the full tensors (others {})
            return self._gathered_state()[0]
        out = {}
        for n, p in self.obj.players.items():
            for k, v in p.module.state_dict().items():
                out[f"player.{n}.{k}"] = v.detach().cpu().contiguous()
        for n, m in self.ema.items():
            for k, v in m.state_dict().items():
                out[f"ema.{n}.{k}"] = v.detach().cpu().contiguous()
        return out

    def save_checkpoint(self, tag: str | None = None) -> Path | None:
        """Atomic: write into a temp folder, hash every file, then rename into place. A signal that arrives
        meanwhile stops the run after the save (see :func:`_install_sigterm`)."""
        self._saving = True
        try:
            return self._save_checkpoint(tag)
        finally:
            self._saving = False

    def _save_checkpoint(self, tag: str | None) -> Path | None:
        self.acc.wait_for_everyone() if tag is None else None
        gathered = self._gathered_state() if self.fsdp else None  # collective: every process takes part
        if not self.acc.is_main_process:
            return None
        name = tag or f"step_{self.step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp_{name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_checkpoint(tmp, gathered)
        except OSError as e:  # disk full, quota, permissions: leave no partial folder behind to fill the disk
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint "
                                  f"is intact. Free disk space in {self.ckpt_dir.parent}, then resume with "
                                  f"--resume") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_into_place(tmp, final)
        if tag is None:
            atomic_write_text(self.ckpt_dir / "latest", name)
            self.obj.on_checkpoint(self, final)  # PSO saves its online references beside the weights
        return final

    def _write_checkpoint(self, tmp: Path, gathered) -> None:
        tmp.mkdir(parents=True)
        tensors, optim = gathered if gathered is not None else (self.state_tensors(),
                                                                 {n: o.state_dict() for n, o in self.opts.items()})
        save_file(tensors, tmp / "models.safetensors")
        torch.save(optim, tmp / "optim.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        meta = {"step": self.step, "update": self.update, "seed": self.tcfg.seed,
                "config": self.base_config,  # resume checks it (_check_same_config)
                "teacher_sha256": self.teacher_digest(),  # resume checks it: the same frozen teacher
                "run_id": self.run_id,  # resume checks it: a checkpoint continues only the run that wrote it
                "wall_seconds": round(self.wall_seconds(), 3),  # setup + training, summed over resumes
                "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}}
        if self.schedule:  # the values in force for the next step (recipe.py): what a resume applies
            meta["schedule"] = {"step": self.step, "values": self.schedule.values(self.step)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    def teacher_digest(self) -> str | None:
        """sha256 (16 hex) of the frozen teacher's weights, or None for methods without one (teacher training)."""
        if not hasattr(self, "_teacher_digest"):
            from ..pairs import weights_digest

            teacher = self.obj.teacher
            try:
                self._teacher_digest = weights_digest(teacher.backbone) if teacher is not None else None
            except (RuntimeError, NotImplementedError, TypeError):  # weights without data (meta tensors): no hash
                self._teacher_digest = None
        return self._teacher_digest

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> list[str]:
        """Load a (hash-checked) checkpoint. ``strict=False`` (``--fork``) tolerates modules added or removed by a
        config change (e.g. ``dmd.gan``): their weights keep their initialisation and an optimizer whose
        parameters changed starts afresh. Returns what was not restored."""
        path = Path(path)
        meta = verify_checkpoint(path)
        tensors = load_file(path / "models.safetensors")
        load_sd, load_opt = (lambda m, sd: m.load_state_dict(sd, strict=strict)), (lambda o, sd: o.load_state_dict(sd))
        if self.fsdp:  # full tensors -> this process's shards
            from .fsdp import load_full_optim_state, load_full_state_dict

            load_sd, load_opt = load_full_state_dict, load_full_optim_state
        skipped = []
        for prefix, mods in (("player", {n: p.module for n, p in self.obj.players.items()}), ("ema", self.ema)):
            for n, m in mods.items():
                sd = {k[len(f"{prefix}.{n}."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{n}.")}
                res = load_sd(m, sd)
                if not strict and res is not None and (res.missing_keys or res.unexpected_keys):
                    skipped.append(f"{prefix}.{n}: {len(res.missing_keys)} new, {len(res.unexpected_keys)} dropped tensors")
        opt_states = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        for n, o in self.opts.items():
            try:
                load_opt(o, opt_states[n])
            except (ValueError, KeyError, RuntimeError):
                if strict:
                    raise
                skipped.append(f"optimizer {n}: started afresh")
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        self.step, self.update = int(meta["step"]), int(meta["update"])
        self._wall_before = float(meta.get("wall_seconds", 0.0))
        return skipped

    def wall_seconds(self) -> float:
        """Wall seconds this run has cost so far: earlier processes (resumed from) + this one's setup and loop."""
        loop = time.time() - self._t0 if self._t0 is not None else 0.0
        return self._wall_before + self.setup_seconds + loop

    def _gathered_state(self) -> tuple[dict, dict]:
        """(models, optimizer states) in the single-process checkpoint format, gathered from the FSDP
        shards (trainers/fsdp.py). Collective; the main process gets them, the others ``({}, {})``."""
        from .fsdp import full_optim_state, full_state_dict

        keep, out = self.acc.is_main_process, {}
        for prefix, mods in (("player", {n: p.module for n, p in self.obj.players.items()}), ("ema", self.ema)):
            for n, m in mods.items():
                for k, v in full_state_dict(m, keep).items():
                    out[f"{prefix}.{n}.{k}"] = v
        optim = {n: full_optim_state(o, keep) for n, o in self.opts.items()}  # collective on every process
        return (out, optim) if keep else ({}, {})

    def plain_ema(self) -> dict[str, nn.Module]:
        """EMA modules as ordinary (unsharded) modules for export: ``self.ema`` itself without FSDP;
        under FSDP gathered copies on the main process (collective; the others get ``{}``)."""
        if not self.fsdp:
            return dict(self.ema)
        from .fsdp import full_state_dict, plain_copy

        keep = self.acc.is_main_process
        full = {n: full_state_dict(m, keep) for n, m in self.ema.items()}
        return {n: plain_copy(self._ema_templates[n], sd) for n, sd in full.items()} if keep else {}

    def load_resume_point(self, which: bool | str = "latest") -> bool:
        """Load the checkpoint to resume from (see :meth:`train`); False when the run has none yet (predicted before
        the build by :func:`restores_checkpoint`)."""
        which = "latest" if which is True else str(which)
        say = print if self.acc.is_main_process else (lambda *a, **k: None)
        if which != "latest":
            path = Path(which) if Path(which).is_dir() else self.ckpt_dir / which
            if not path.is_dir():
                raise CheckpointError(f"--resume {which}: no checkpoint {path}")
            self._check_same_config(path)
            self.load_checkpoint(path)
            say(f"--resume: continuing from {path} (step {self.step}, update {self.update})", file=sys.stderr)
            return True
        newest = latest_checkpoint(self.out)
        if newest is None:
            say(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            return False
        candidates = [newest] + sorted((p for p in self.ckpt_dir.glob("step_*") if p != newest and p.is_dir()),
                                       key=lambda p: p.name, reverse=True)
        errors = []
        for path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            self._check_same_config(path)
            self.load_checkpoint(path)
            if path != newest:
                say(f"--resume: the latest checkpoint failed its check ({errors[0]}); using {path.name}, the newest "
                    f"one that passes (step {self.step})", file=sys.stderr)
            return True
        raise CheckpointError(f"no usable checkpoint in {self.ckpt_dir}: " + "; ".join(errors))

    def _config_diff(self, path: Path) -> list[tuple[str, object, object]]:
        """(key, checkpoint's value, current value) for every config key that differs, apart from
        RESUME_MAY_CHANGE; [] for checkpoints written before configs were recorded. A key the checkpoint does
        not record (added by a later stepdistill) counts as its default value: the run used the default behaviour."""
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        return config_diff(type(self.cfg), meta.get("config"), self.base_config)

    def _check_same_config(self, path: Path) -> None:
        """A checkpoint resumes only the run it came from: same config apart from RESUME_MAY_CHANGE, and the same
        teacher weights (a teacher retrained at the same path is another teacher)."""
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
        self._check_config_diff(path)  # the most telling difference first
        if meta.get("run_id") and self.run_id and meta["run_id"] != self.run_id and self._marker_is_new:
            write_marker(self.out, "run", run_id=meta["run_id"])  # a folder the run's checkpoints were moved into
            self.run_id = meta["run_id"]
        if meta.get("run_id") and self.run_id and meta["run_id"] != self.run_id:
            raise CheckpointError(
                f"checkpoint {path} was written by another run (run {meta['run_id']}, this folder holds run "
                f"{self.run_id}); --resume continues only its own run. Branch off it with --fork {path}")
        had, now = meta.get("teacher_sha256"), self.teacher_digest()
        if had and now and had != now:
            raise CheckpointError(
                f"checkpoint {path} was trained against other teacher weights (sha256 {had}, now {now}): the teacher "
                f"at {getattr(getattr(self.cfg, 'dmd', None), 'teacher', 'its path')} changed since. Resume needs the "
                f"same teacher: restore it, or start a new run (another output_dir, or --fork {path} to keep the "
                f"student's weights)")

    def _check_config_diff(self, path: Path) -> None:
        diff = self._config_diff(path)
        if diff:
            shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diff[:6])
            raise CheckpointError(
                f"checkpoint {path} belongs to a run with another config: {shown}"
                f"{' ...' if len(diff) > 6 else ''}. Resume with the run's own config "
                f"({self.out / 'config.yaml'}), start a new run with --overwrite or another output_dir, or branch off "
                f"this checkpoint into a new output_dir with --fork {path}")


#: config keys a resumed run may change: a longer run, the logging / checkpoint cadence, threads, guards, and
#: where the same math runs (processes, FSDP sharding, CPU, activation recomputation, an offloaded teacher)
RESUME_MAY_CHANGE = ("output_dir", "train.max_steps", "train.log_every", "train.sample_every",
                     "train.checkpoint_every", "train.threads", "train.num_workers", "train.guard_every",
                     "train.guard_action", "train.guard_min_diversity", "train.guard_max_saturation",
                     "train.nonfinite_tolerance", "train.fsdp", "train.fsdp_shard_teacher", "train.cpu",
                     "train.gradient_checkpointing", "dmd.offload_teacher")
def config_diff(cls, old_config: dict | None, new_config: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key of two config mappings of ``cls`` that differs, apart from
    RESUME_MAY_CHANGE; [] when ``old_config`` is None (checkpoints written before configs were recorded). Old key
    spellings are upgraded; a key ``old_config`` lacks (added by a later stepdistill) counts as its default."""
    if old_config is None:
        return []
    old_config = upgrade_keys(cls, old_config)
    drop_foreign_keys(cls, old_config, warn=False)  # other methods' sections, recorded by earlier releases
    old = _flatten(old_config)
    new = _flatten(json.loads(json.dumps(new_config)))
    defaults = _flatten(json.loads(json.dumps(to_dict(cls()))))
    for k in new.keys() - old.keys():
        if k in defaults:
            old[k] = defaults[k]
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)]


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's meta.json after checking every file against its recorded sha256."""
    path = Path(path)
    meta_p = path / "meta.json"
    if not meta_p.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json)")
    try:
        meta = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is corrupt ({e})") from e
    for fname, digest in meta["files"].items():
        f = path / fname
        if not f.exists() or sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {fname} is missing or corrupt (sha256 mismatch)")
    return meta


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def latest_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint folder that a run's ``checkpoints/latest`` names, or None when the run has none."""
    ptr = Path(run) / "checkpoints" / "latest"
    return ptr.parent / ptr.read_text().strip() if ptr.exists() else None


def restores_checkpoint(run: str | Path, resume: bool | str) -> bool:
    """Whether :meth:`CheckpointIO.load_resume_point` will load one of the run's own checkpoints for ``resume``: a
    named one (a folder, ``last_good``: loaded, or refused when missing), or ``latest`` when the run has one (else
    the run starts from step 0). Keep it beside that method's branches."""
    if not resume:
        return False
    return resume not in (True, "latest") or latest_checkpoint(run) is not None


def load_ema_weights(output_dir: str | Path, modules: dict[str, nn.Module], checkpoint: str | Path | None = None,
                     weights: str = "ema") -> Path:
    """Load the EMA weights of the named players (``{"generator": module}``) from a run's checkpoint
    (the latest by default) into ``modules``, for ``stepdistill export``. ``weights="raw"`` loads the
    players' own (un-averaged) weights instead, to measure what the EMA buys. Returns the checkpoint path."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(output_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {Path(output_dir) / 'checkpoints'}; train first or pass --checkpoint")
    verify_checkpoint(path)  # a tampered or truncated checkpoint never reaches an export
    tensors = load_file(path / "models.safetensors")
    for name, m in modules.items():
        pre = f"ema.{name}." if weights == "ema" else f"player.{name}."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    return path
