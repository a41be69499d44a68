"""The one training loop every method shares.

A method is an :class:`Objective`: it names its trainable *players* (teacher, generator,
critic, ...), says which players update in each step (``updates(step)``, e.g. five critic
updates then one generator update for DMD2's two time-scale rule) and computes one loss per
update. The loop below owns everything else: optimizers per player, gradient sync across
processes, clipping, warm-up, EMA, logging, sample grids, loss plots, checkpoint/resume and
failure handling. ``train.fsdp=true`` shards the players and their EMA over the processes (FSDP2,
:mod:`stepdistill.trainers.fsdp`); checkpoints keep the single-process format.

Determinism: all randomness of an update comes from a ``torch.Generator`` seeded by
``(seed, step, update)``; every process draws the *global* batch and keeps its slice. Hence a
resumed run equals an uninterrupted one, and N processes equal one process (up to float
summation order), without storing RNG state (it is stored anyway, for the record).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import to_dict, upgrade_keys
from ..recipe import Schedule
from ..outputs import clean_stale_temps, mark_run_dir, prepare_run_dir, read_marker, run_inputs, run_lock, write_marker
from ..utils import atomic_write_text, plot_losses, save_grid, sha256_file


from ..errors import (  # noqa: E402,F401  (re-exported)
    CheckpointError,
    NonFiniteLossError,
    OutputExistsError,
    TrainingInterrupted,
)


@dataclass
class Player:
    """A trainable module with its own optimizer (AdamW) settings."""
    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0
    ema: bool = False
    # child module name -> lr multiplier (its own param group): a number, or a function of no arguments that gives
    # it (read at every update, so a scheduled learning rate moves it: stepdistill/recipe.py)
    lr_scales: dict = field(default_factory=dict)
    optim: object = None  # the OptimConfig this player was made from: its lr is read live (a schedule may change it)

    @classmethod
    def from_optim(cls, module: nn.Module, optim, ema: bool = False) -> "Player":
        """A player trained with an :class:`~stepdistill.config.OptimConfig` (every config's optimizer section)."""
        return cls(module, optim.lr, (optim.beta1, optim.beta2), optim.weight_decay, optim.grad_clip,
                   optim.warmup_steps, ema=ema, optim=optim)

    def current_lr(self) -> float:
        """The base learning rate now: the OptimConfig's (live) or the fixed ``lr``."""
        return float(self.optim.lr) if self.optim is not None else self.lr

    def group_scales(self) -> list:
        """One entry per optimizer param group (see :func:`_param_groups`): None for the main group, then each
        ``lr_scales`` multiplier, evaluated now."""
        return [None] + [s() if callable(s) else s for s in self.lr_scales.values()]


def _param_groups(p: "Player") -> list:
    """The optimizer's parameters: one group, or with ``lr_scales`` one group per scaled child module (its
    ``lr_scale`` is kept in the group) and one for the rest."""
    trainable = [q for q in p.module.parameters() if q.requires_grad]
    if not p.lr_scales:
        return trainable
    scaled = {name: [q for q in p.module.get_submodule(name).parameters() if q.requires_grad] for name in p.lr_scales}
    ids = {id(q) for qs in scaled.values() for q in qs}
    groups = [{"params": [q for q in trainable if id(q) not in ids]}]
    scales = dict(zip(p.lr_scales, p.group_scales()[1:]))
    groups += [{"params": qs, "lr": p.lr * scales[name], "lr_scale": scales[name]} for name, qs in scaled.items()]
    return groups


@dataclass
class Ctx:
    """Randomness and data for one update; draws global batches and returns this rank's slice."""
    gen: torch.Generator
    rank: int
    world: int
    global_batch: int
    device: torch.device
    step: int
    data: object = None  # ArrayDataset or None

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        n = self.local_batch
        return x[self.rank * n:(self.rank + 1) * n].to(self.device)

    def randn(self, *shape) -> torch.Tensor:
        return self._slice(torch.randn(self.global_batch, *shape, generator=self.gen))

    def rand(self) -> torch.Tensor:
        return self._slice(torch.rand(self.global_batch, generator=self.gen, dtype=torch.float64))

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._slice(torch.randint(low, high, (self.global_batch,), generator=self.gen))

    def sample_t(self, schedule, t_min: float, t_max: float) -> torch.Tensor:
        """Training times for the global batch (schedule's own law), this rank's slice."""
        return self._slice(schedule.sample_t(self.global_batch, t_min, t_max, generator=self.gen))

    def scalar_randint(self, low: int, high: int) -> int:
        """The same random int on every rank (e.g. DMD2's backward-simulation step count)."""
        return int(torch.randint(low, high, (1,), generator=self.gen))

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.global_batch,), generator=self.gen)
        idx = idx[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return self.data.images[idx].to(self.device), self.data.labels[idx].to(self.device)


class Objective(Protocol):
    """What a method implements (see trainers/diffusion.py and trainers/dmd.py)."""
    players: dict[str, Player]

    def updates(self, step: int) -> list[str]: ...
    def loss(self, player: str, ctx: Ctx) -> tuple[torch.Tensor, dict[str, float]]: ...
    def sample(self, ema: dict[str, nn.Module], n: int, device) -> torch.Tensor: ...


class StepTimer:
    """Wall seconds and call counts per named section of the training loop (``stepdistill bench --train``).
    A :class:`Trainer` times its sections only when ``trainer.timer`` is set; timing changes no number."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def section(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1


def update_seed(seed: int, step: int, update: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + update) % (2**63 - 1)


class Trainer:
    """Runs an :class:`Objective` for ``train.max_steps`` steps under accelerate."""

    def __init__(self, objective, cfg, accelerator=None, data=None, on_checkpoint: Callable | None = None):
        from accelerate import Accelerator

        self.obj, self.cfg, self.tcfg = objective, cfg, cfg.train
        # the config as loaded: what config.yaml and checkpoints record, whatever a schedule has set meanwhile
        self.base_config = json.loads(json.dumps(to_dict(cfg)))
        self.schedule = Schedule(cfg)  # settings that change at given steps (stepdistill/recipe.py)
        self.setup_seconds = 0.0  # building the objective (teacher ODE pairs, ...): set by the caller, recorded
        self._wall_before = 0.0   # wall seconds of earlier processes of this run (from the resumed checkpoint)
        self.run_id: str | None = None  # the run folder's identity (outputs.mark_run_dir), recorded in checkpoints
        if self.tcfg.threads > 0:
            torch.set_num_threads(self.tcfg.threads)
        self.acc = accelerator or Accelerator(cpu=self.tcfg.cpu, mixed_precision=self.tcfg.mixed_precision)
        self.data = data
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.on_checkpoint = on_checkpoint
        world = self.acc.num_processes
        if self.tcfg.batch_size % world:
            raise ValueError(f"train.batch_size={self.tcfg.batch_size} must be divisible by {world} processes")
        dev = self.acc.device
        for p in self.obj.players.values():
            p.module.to(dev)
            if getattr(self.tcfg, "gradient_checkpointing", False):  # LoRA-aware (stepdistill/lora.py)
                from ..lora import enable_gradient_checkpointing

                enable_gradient_checkpointing(p.module)
        if hasattr(self.obj, "to"):
            self.obj.to(dev)
        self.teacher_digest()  # hashed before FSDP shards the teacher: every process holds the same digest
        self.fsdp = _wants_fsdp(self.acc, self.tcfg)
        self._ema_templates = {}
        if self.fsdp:  # shard players, EMA copies (and the teacher) before the optimizers see the parameters
            from .fsdp import device_mesh, shard_objective

            self.ema = {n: _ema_copy(p.module) for n, p in self.obj.players.items() if p.ema}
            self._ema_templates = shard_objective(self.obj, self.ema, device_mesh(dev, world),
                                                  shard_teacher=getattr(self.tcfg, "fsdp_shard_teacher", False))
        self.opts = {n: torch.optim.AdamW(_param_groups(p), lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)
                     for n, p in self.obj.players.items()}
        if not self.fsdp:
            self.ema = {n: _ema_copy(p.module) for n, p in self.obj.players.items() if p.ema}
        self.step, self.update = 0, 0   # next step / update index to run
        self._stop = False
        self.stop_signal: int | None = None  # SIGINT / SIGTERM that stopped the run (exit 130 / 143)
        self._consistent = True   # (step, update) describes the weights exactly: a checkpoint may be saved
        self._saving = False      # a second signal waits until the checkpoint on disk is complete
        self.command = "distill"  # the CLI sub-command that resumes this run (printed on interruption)
        self.timer: StepTimer | None = None  # set to profile the loop's sections (eval/train_profile.py)

    def _timed(self, name: str):
        return self.timer.section(name) if self.timer is not None else contextlib.nullcontext()

    # -- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool | str = False, overwrite: bool = False, fork: str | Path | None = None) -> dict:
        """Run to ``train.max_steps``. ``resume``: False (a fresh run: ``output_dir`` must not hold a run unless
        ``overwrite``, which clears it), True / ``"latest"`` (the newest checkpoint that passes its hash check),
        ``"last_good"`` (the weights saved by a NaN stop) or a checkpoint folder. A resumed checkpoint must come
        from the same config, apart from :data:`RESUME_MAY_CHANGE`. ``fork``: a fresh run that starts from another
        run's checkpoint (weights, optimizer states, step) under a config that may differ, e.g. an ablation
        branching off a shared warm-up; the differences are printed."""
        acc = self.acc
        with contextlib.ExitStack() as stack:
            if acc.is_main_process:  # one writer per run folder (outputs.run_lock)
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
            acc.wait_for_everyone()
            return self._train(resume, fork)

    def _train(self, resume, fork) -> dict:
        acc, tc = self.acc, self.tcfg
        if fork:
            diff = self._config_diff(Path(fork))
            skipped = self.load_checkpoint(fork, strict=False)
            if acc.is_main_process:
                print(f"--fork: starting from {fork} (step {self.step}); config changes: "
                      + (", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff) or "none")
                      + (f"; not restored: {'; '.join(skipped)}" if skipped else ""), file=sys.stderr)
        elif resume:
            self.load_resume_point(resume)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", _yaml(self.base_config))
        acc.wait_for_everyone()
        old_handler = _install_sigterm(self)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"{type(self.obj).__name__}",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        t0, history = time.time(), []
        self._t0 = t0
        try:
            while self.step < tc.max_steps:
                if self.schedule:
                    self.schedule.apply(self.step)  # before updates(step): the critic ratio may change
                logs = self._run_step()
                if logs is None:  # interrupted at an update boundary
                    break
                history.append(logs)
                self.step += 1
                self.update = 0
                self._consistent = True  # the step is complete, EMA included
                s = self.step
                if getattr(tc, "guard_every", 0) and s % tc.guard_every == 0:  # trainers/guards.py
                    from .guards import run_guards

                    logs.update(run_guards(self))
                if acc.is_main_process and (s % tc.log_every == 0 or s == tc.max_steps):
                    row = {"step": s, **{k: round(v, 6) for k, v in logs.items()},
                           "sec_per_step": round((time.time() - t0) / max(len(history), 1), 4)}
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(logs.items())[:4]})
                if s % tc.sample_every == 0 or s == tc.max_steps:
                    self.save_samples()
                if s % tc.checkpoint_every == 0 or s == tc.max_steps:
                    self.save_checkpoint()
                bar.update(1)
        except KeyboardInterrupt:  # a second signal (or Ctrl-C outside the handler) mid-update
            self._stop = True
            self.stop_signal = self.stop_signal or signal.SIGINT
        finally:
            bar.close()
            if self.schedule:
                self.schedule.restore()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler[0])
                signal.signal(signal.SIGINT, old_handler[1])
        if self._stop:
            resume = f"stepdistill {self.command} --config {self.out / 'config.yaml'} --resume"
            if self._consistent:  # at an update boundary: resume continues exactly here
                self.save_checkpoint()
                msg = f"interrupted: saved checkpoint at step {self.step} update {self.update}"
            else:  # weights are part-way through an update: saving them would make resume re-apply it
                latest = self.ckpt_dir / "latest"
                last = latest.read_text().strip() if latest.exists() else None
                msg = (f"interrupted mid-update at step {self.step}: nothing saved; resume continues from "
                       + (f"checkpoint {last}" if last else "step 0 (no checkpoint yet)"))
            if acc.is_main_process:
                print(f"{msg}. Resume with:\n  {resume}", file=sys.stderr)
        return {"steps": self.step, "seconds": time.time() - t0, "interrupted": self._stop,
                "stop_signal": int(self.stop_signal) if self.stop_signal else None,
                "sec_per_step": (time.time() - t0) / max(len(history), 1), **peak_memory(self.acc.device),
                "last": history[-1] if history else {}}

    def _run_step(self) -> dict | None:
        acc, logs = self.acc, {}
        self._grad_player = None
        names = self.obj.updates(self.step)
        while self.update < len(names):
            if self._stop:
                return None
            name = names[self.update]
            player = self.obj.players[name]
            self._consistent = False  # until this update is applied (the last one: until the step's EMA)
            ctx = Ctx(torch.Generator().manual_seed(update_seed(self.tcfg.seed, self.step, self.update)),
                      acc.process_index, acc.num_processes, self.tcfg.batch_size, acc.device, self.step, self.data)
            if self._grad_player != name:  # switch requires_grad only when the updating player changes
                for n, p in self.obj.players.items():
                    p.module.requires_grad_(n == name)
                self._grad_player = name
            with acc.autocast(), self._timed("loss"):
                loss, parts = self.obj.loss(name, ctx)
            parts = {k: _mean_across(acc, float(v)) for k, v in parts.items()}
            bad = [k for k, v in parts.items() if not math.isfinite(v)
                   or (k.endswith("_nonfinite_frac") and v > getattr(self.tcfg, "nonfinite_tolerance", 1e-3))]
            nonfinite = bool(bad) or not bool(torch.isfinite(loss.detach()).all())
            if self.fsdp:  # saving last_good gathers shards: every process must take the same branch
                from .fsdp import any_across

                nonfinite = any_across(nonfinite, acc.device)
            if nonfinite:
                which = bad[0] if bad else f"{name}_total"
                self.save_checkpoint(tag="last_good")
                what = (f"'{which}' = {parts[which]:.3g} exceeds train.nonfinite_tolerance (NaN/inf teacher or critic "
                        "outputs, or an infinite guidance scale)" if which.endswith("_nonfinite_frac") and which in parts
                        else f"loss '{which}' is not finite ({parts.get(which, float('nan'))})")
                raise NonFiniteLossError(
                    f"{what} at step {self.step} (update {self.update}, player {name}); last good weights saved to "
                    f"{self.ckpt_dir / 'last_good'}; resume from them with --resume last_good")
            self.opts[name].zero_grad(set_to_none=True)
            with self._timed("backward"):
                loss.backward()
            params = [q for q in player.module.parameters() if q.requires_grad]
            if not self.fsdp:  # FSDP reduce-scatters (averages) the gradients in backward itself
                _sync_grads(acc, params)
            if player.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, player.grad_clip)
                parts[f"{name}_grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            base_lr = player.current_lr()
            lr = base_lr * min(1.0, (self.step + 1) / player.warmup_steps) if player.warmup_steps else base_lr
            for g, scale in zip(self.opts[name].param_groups, player.group_scales()):
                if scale is not None:
                    g["lr_scale"] = scale
                g["lr"] = lr * scale if scale is not None else lr
            with self._timed("optimizer"):
                self.opts[name].step()
            self.opts[name].zero_grad(set_to_none=True)
            for k, v in parts.items():
                logs[k] = v  # last value of each key within the step
            self.update += 1
            self._consistent = self.update < len(names)  # the step's last update waits for the EMA
        with self._timed("ema"):
            for n, e in self.ema.items():  # EMA once per step, after all updates
                _ema_update(e, self.obj.players[n].module, self.tcfg.ema_decay)
        for p in self.obj.players.values():
            p.module.requires_grad_(True)
        self._grad_player = None
        return logs

    # -- samples ----------------------------------------------------------------------------
    def ema_modules(self) -> dict[str, nn.Module]:
        return {n: self.ema.get(n, p.module) for n, p in self.obj.players.items()}

    def save_samples(self) -> Path | None:
        if not self.acc.is_main_process and not self.fsdp:  # sharded models sample on every process
            return None
        with torch.no_grad():
            x = self.obj.sample(self.ema_modules(), 40, self.acc.device)
        if not self.acc.is_main_process:
            return None
        path = save_grid(x, self.out / "samples" / f"step_{self.step:06d}.png", nrow=10, scale=2)
        if (self.out / "log.jsonl").exists():
            plot_losses(self.out / "log.jsonl", self.out / "loss.png")
        return path

    # -- checkpoints --------------------------------------------------------------------------
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
        if final.exists():
            old = self.ckpt_dir / f".old_{name}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if tag is None:
            atomic_write_text(self.ckpt_dir / "latest", name)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self, final)
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

            teacher = getattr(self.obj, "teacher", None)
            try:
                self._teacher_digest = weights_digest(teacher.backbone) if teacher is not None and hasattr(
                    teacher, "backbone") else None
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
        loop = time.time() - self._t0 if getattr(self, "_t0", None) else 0.0
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
        """Load the checkpoint to resume from (see :meth:`train`); False when the run has none yet."""
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
        ptr = self.ckpt_dir / "latest"
        if not ptr.exists():
            say(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            return False
        newest = self.ckpt_dir / ptr.read_text().strip()
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
        if meta.get("run_id") and self.run_id and meta["run_id"] != self.run_id and getattr(self, "_marker_is_new", False):
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


# -- helpers --------------------------------------------------------------------------------
def raise_if_interrupted(trainer: Trainer, result: dict) -> None:
    """After :meth:`Trainer.train`: an interrupted run raises :class:`TrainingInterrupted` (exit 130 on
    SIGINT, 143 on SIGTERM) carrying the resume command, so no caller mistakes it for a finished run."""
    if not result["interrupted"]:
        return
    sig = result.get("stop_signal") or signal.SIGINT
    raise TrainingInterrupted(
        f"training interrupted by {signal.Signals(sig).name} at step {trainer.step}; resume with: "
        f"stepdistill {trainer.command} --config {trainer.out / 'config.yaml'} --resume", exit_code=128 + int(sig))


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
    old = _flatten(upgrade_keys(cls, old_config))
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


def load_ema_weights(output_dir: str | Path, modules: dict[str, nn.Module], checkpoint: str | Path | None = None,
                     weights: str = "ema") -> Path:
    """Load the EMA weights of the named players (``{"generator": module}``) from a run's checkpoint
    (the latest by default) into ``modules``, for ``stepdistill export``. ``weights="raw"`` loads the
    players' own (un-averaged) weights instead, to measure what the EMA buys. Returns the checkpoint path."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt_dir = Path(output_dir) / "checkpoints"
    if checkpoint:
        path = Path(checkpoint)
    else:
        if not (ckpt_dir / "latest").exists():
            raise CheckpointError(f"no checkpoint in {ckpt_dir}; train first or pass --checkpoint")
        path = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    verify_checkpoint(path)  # a tampered or truncated checkpoint never reaches an export
    tensors = load_file(path / "models.safetensors")
    for name, m in modules.items():
        pre = f"ema.{name}." if weights == "ema" else f"player.{name}."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    return path


def peak_memory(device) -> dict:
    """Peak memory so far: CUDA allocator peak on GPU, process peak RSS (ru_maxrss) on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_rss"}


def _ema_copy(m: nn.Module) -> nn.Module:
    import copy

    e = copy.deepcopy(m).eval()
    e.requires_grad_(False)
    return e


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _wants_fsdp(acc, tcfg) -> bool:
    """``train.fsdp=true`` or an ``accelerate launch --use_fsdp`` launch, with more than one process."""
    want = bool(getattr(tcfg, "fsdp", False)) or str(getattr(acc, "distributed_type", "")).endswith("FSDP")
    if want and acc.num_processes == 1 and acc.is_main_process:
        print("train.fsdp: one process, nothing to shard; training unsharded")
    return want and acc.num_processes > 1


def _sync_grads(acc, params: list[torch.Tensor]) -> None:
    """Average gradients over processes (one flat all-reduce; no DDP wrapper needed)."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= acc.num_processes
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def _mean_across(acc, v: float) -> float:
    if acc.num_processes == 1:
        return v
    t = torch.tensor([v], dtype=torch.float64, device=acc.device)
    return float(acc.reduce(t, reduction="mean"))


def _install_sigterm(trainer: Trainer):
    """SIGTERM / SIGINT set a flag; the loop stops at the next update boundary and checkpoints."""
    def handler(signum, frame):
        if trainer._stop and not trainer._saving:  # second signal: give up at once (nothing half-saved)
            raise KeyboardInterrupt
        trainer._stop = True
        trainer.stop_signal = trainer.stop_signal or signum
    try:
        old = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, handler)
        return old
    except ValueError:  # not in the main thread
        return None


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
