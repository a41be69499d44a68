"""The one training loop every method shares.

A method is an :class:`~stepdistill.trainers.objective.Objective`: it names its trainable *players* (teacher, generator,
critic, ...), says which players update in each step (``updates(step)``, e.g. five critic
updates then one generator update for DMD2's two time-scale rule) and computes one loss per
update. The loop below owns everything else: optimizers per player, gradient sync across
processes, clipping, warm-up, EMA, logging, sample grids, loss plots and failure handling;
checkpoints, resume and the run folder are :mod:`stepdistill.trainers.checkpoint`'s. ``train.fsdp=true`` shards the players and their EMA over the processes (FSDP2,
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
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import to_dict
from ..errors import NonFiniteLossError, TrainingInterrupted
from ..meter import process_peak
from ..recipe import Schedule
from ..utils import atomic_write_text, plot_losses, save_grid
from .checkpoint import CheckpointIO, latest_checkpoint
from .objective import Ctx, Objective, _param_groups, update_seed


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


class Trainer(CheckpointIO):
    """Runs an :class:`Objective` for ``train.max_steps`` steps under accelerate."""

    def __init__(self, objective: Objective, cfg, accelerator=None, data=None):
        from accelerate import Accelerator

        self.obj, self.cfg, self.tcfg = objective, cfg, cfg.train
        # the config as loaded: what config.yaml and checkpoints record, whatever a schedule has set meanwhile
        self.base_config = json.loads(json.dumps(to_dict(cfg)))
        self.schedule = Schedule(cfg)  # settings that change at given steps (stepdistill/recipe.py)
        self.setup_seconds = 0.0  # building the objective (teacher ODE pairs, ...): set by the caller, recorded
        self._wall_before = 0.0   # wall seconds of earlier processes of this run (from the resumed checkpoint)
        self.run_id: str | None = None  # the run folder's identity (outputs.mark_run_dir), recorded in checkpoints
        self._marker_is_new = False  # the run folder got its marker in this process (trainers/checkpoint.py)
        self._t0: float | None = None  # when this process's loop started
        if self.tcfg.threads > 0:
            torch.set_num_threads(self.tcfg.threads)
        self.acc = accelerator or Accelerator(cpu=self.tcfg.cpu, mixed_precision=self.tcfg.mixed_precision)
        self.data = data
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        world = self.acc.num_processes
        if self.tcfg.batch_size % world:
            raise ValueError(f"train.batch_size={self.tcfg.batch_size} must be divisible by {world} processes")
        dev = self.acc.device
        if self.tcfg.attention != "sdpa":  # train.attention: every player and the teacher (stepdistill/attention.py)
            from ..attention import set_attention

            for m in [p.module for p in self.obj.players.values()] + (
                    [self.obj.teacher.backbone] if self.obj.teacher is not None else []):
                set_attention(m, self.tcfg.attention)
        for p in self.obj.players.values():
            p.module.to(dev)
            if self.tcfg.gradient_checkpointing:  # LoRA-aware (stepdistill/lora.py)
                from ..lora import enable_gradient_checkpointing

                enable_gradient_checkpointing(p.module)
        self.obj.to(dev)
        self.teacher_digest()  # hashed before FSDP shards the teacher: every process holds the same digest
        self.fsdp = _wants_fsdp(self.acc, self.tcfg)
        self._ema_templates = {}
        if self.fsdp:  # shard players, EMA copies (and the teacher) before the optimizers see the parameters
            from .fsdp import device_mesh, shard_objective

            self.ema = {n: _ema_copy(p.module) for n, p in self.obj.players.items() if p.ema}
            self._ema_templates = shard_objective(self.obj, self.ema, device_mesh(dev, world),
                                                  shard_teacher=self.tcfg.fsdp_shard_teacher)
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
        self.timer: StepTimer | None = None  # set to profile the loop's sections (profiling/train_profile.py)
        self.tracker = None  # train.report_to: TensorBoard / wandb (trainers/tracking.py), main process, in train()

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
            if acc.is_main_process:  # one writer per run folder (trainers/checkpoint.py, stepdistill/outputs.py)
                self.open_run_folder(stack, resume, overwrite, fork)
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
            if tc.report_to != "none":
                from .tracking import open_tracker

                self.tracker = open_tracker(tc.report_to, self.out, self.out.name, self.base_config)
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
                    if tc.batch_size % acc.num_processes:
                        raise ValueError(f"schedule: train.batch_size={tc.batch_size} from step {self.step} must be "
                                         f"divisible by {acc.num_processes} processes")
                logs = self._run_step()
                if logs is None:  # interrupted at an update boundary
                    break
                history.append(logs)
                self.step += 1
                self.update = 0
                self._consistent = True  # the step is complete, EMA included
                s = self.step
                if tc.guard_every and s % tc.guard_every == 0:  # trainers/guards.py
                    from .guards import run_guards

                    logs.update(run_guards(self))
                if acc.is_main_process and (s % tc.log_every == 0 or s == tc.max_steps):
                    row = {"step": s, **{k: round(v, 6) for k, v in logs.items()},
                           "sec_per_step": round((time.time() - t0) / max(len(history), 1), 4)}
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if self.tracker is not None:
                        self.tracker.scalars({k: v for k, v in row.items() if k != "step"}, s)
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
            if self.tracker is not None:
                self.tracker.finish()
                self.tracker = None
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
                last = latest_checkpoint(self.out)
                msg = (f"interrupted mid-update at step {self.step}: nothing saved; resume continues from "
                       + (f"checkpoint {last.name}" if last else "step 0 (no checkpoint yet)"))
            if acc.is_main_process:
                print(f"{msg}. Resume with:\n  {resume}", file=sys.stderr)
        return {"steps": self.step, "seconds": time.time() - t0, "interrupted": self._stop,
                "stop_signal": int(self.stop_signal) if self.stop_signal else None,
                "sec_per_step": (time.time() - t0) / max(len(history), 1), **process_peak(self.acc.device),
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
                   or (k.endswith("_nonfinite_frac") and v > self.tcfg.nonfinite_tolerance)]
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
            logs[f"{name}_lr"] = lr  # the learning rate this update used (warm-up and schedule applied)
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
        if self.tracker is not None:
            self.tracker.images("samples", x, self.step)
        if (self.out / "log.jsonl").exists():
            plot_losses(self.out / "log.jsonl", self.out / "loss.png")
        return path

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
    want = bool(tcfg.fsdp) or str(getattr(acc, "distributed_type", "")).endswith("FSDP")
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
