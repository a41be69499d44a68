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
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import to_dict
from ..utils import atomic_write_text, plot_losses, save_grid, sha256_file


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the message names the loss and the step."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


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
        self.fsdp = _wants_fsdp(self.acc, self.tcfg)
        self._ema_templates = {}
        if self.fsdp:  # shard players, EMA copies (and the teacher) before the optimizers see the parameters
            from .fsdp import device_mesh, shard_objective

            self.ema = {n: _ema_copy(p.module) for n, p in self.obj.players.items() if p.ema}
            self._ema_templates = shard_objective(self.obj, self.ema, device_mesh(dev, world),
                                                  shard_teacher=getattr(self.tcfg, "fsdp_shard_teacher", False))
        # foreach: one fused multi-tensor update instead of a Python loop over parameters (same numbers);
        # FSDP keeps the per-tensor path (DTensor shards)
        self.opts = {n: torch.optim.AdamW([q for q in p.module.parameters() if q.requires_grad], lr=p.lr,
                                          betas=p.betas, weight_decay=p.weight_decay, foreach=not self.fsdp)
                     for n, p in self.obj.players.items()}
        if not self.fsdp:
            self.ema = {n: _ema_copy(p.module) for n, p in self.obj.players.items() if p.ema}
        self.step, self.update = 0, 0   # next step / update index to run
        self._stop = False
        self.timer: StepTimer | None = None  # set to profile the loop's sections (eval/train_profile.py)

    def _timed(self, name: str):
        return self.timer.section(name) if self.timer is not None else contextlib.nullcontext()

    # -- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        acc, tc = self.acc, self.tcfg
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", _yaml(to_dict(self.cfg)))
        if resume:
            self.load_latest()
        elif acc.is_main_process and (self.out / "log.jsonl").exists():
            (self.out / "log.jsonl").unlink()
        acc.wait_for_everyone()
        old_handler = _install_sigterm(self)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"{type(self.obj).__name__}",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        t0, history = time.time(), []
        try:
            while self.step < tc.max_steps:
                logs = self._run_step()
                if logs is None:  # interrupted at an update boundary
                    break
                history.append(logs)
                self.step += 1
                self.update = 0
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
        except KeyboardInterrupt:
            self._stop = True
        finally:
            bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler[0])
                signal.signal(signal.SIGINT, old_handler[1])
        if self._stop:
            self.save_checkpoint()  # at an update boundary: resume continues exactly here
            if acc.is_main_process:
                print(f"interrupted: saved checkpoint at step {self.step} update {self.update}; rerun with --resume")
        return {"steps": self.step, "seconds": time.time() - t0, "interrupted": self._stop,
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
            ctx = Ctx(torch.Generator().manual_seed(update_seed(self.tcfg.seed, self.step, self.update)),
                      acc.process_index, acc.num_processes, self.tcfg.batch_size, acc.device, self.step, self.data)
            if self._grad_player != name:  # switch requires_grad only when the updating player changes
                for n, p in self.obj.players.items():
                    p.module.requires_grad_(n == name)
                self._grad_player = name
            with acc.autocast(), self._timed("loss"):
                loss, parts = self.obj.loss(name, ctx)
            parts = {k: _mean_across(acc, float(v)) for k, v in parts.items()}
            bad = [k for k, v in parts.items() if not math.isfinite(v)]
            nonfinite = bool(bad) or not bool(torch.isfinite(loss.detach()).all())
            if self.fsdp:  # saving last_good gathers shards: every process must take the same branch
                from .fsdp import any_across

                nonfinite = any_across(nonfinite, acc.device)
            if nonfinite:
                which = bad[0] if bad else f"{name}_total"
                self.save_checkpoint(tag="last_good")
                raise NonFiniteLossError(
                    f"loss '{which}' is not finite ({parts.get(which, float('nan'))}) at step {self.step} "
                    f"(update {self.update}, player {name}); last good weights saved to {self.ckpt_dir / 'last_good'}")
            self.opts[name].zero_grad(set_to_none=True)
            with self._timed("backward"):
                loss.backward()
            params = [q for q in player.module.parameters() if q.requires_grad]
            if not self.fsdp:  # FSDP reduce-scatters (averages) the gradients in backward itself
                _sync_grads(acc, params)
            if player.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, player.grad_clip)
                parts[f"{name}_grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            for g in self.opts[name].param_groups:
                g["lr"] = player.lr * min(1.0, (self.step + 1) / player.warmup_steps) if player.warmup_steps else player.lr
            with self._timed("optimizer"):
                self.opts[name].step()
            self.opts[name].zero_grad(set_to_none=True)
            for k, v in parts.items():
                logs[k] = v  # last value of each key within the step
            self.update += 1
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
        """Atomic: write into a temp folder, hash every file, then rename into place."""
        self.acc.wait_for_everyone() if tag is None else None
        gathered = self._gathered_state() if self.fsdp else None  # collective: every process takes part
        if not self.acc.is_main_process:
            return None
        name = tag or f"step_{self.step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp_{name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors, optim = gathered if gathered is not None else (self.state_tensors(),
                                                                 {n: o.state_dict() for n, o in self.opts.items()})
        save_file(tensors, tmp / "models.safetensors")
        torch.save(optim, tmp / "optim.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        meta = {"step": self.step, "update": self.update, "seed": self.tcfg.seed,
                "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
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

    def load_checkpoint(self, path: str | Path) -> None:
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
        tensors = load_file(path / "models.safetensors")
        load_sd, load_opt = (lambda m, sd: m.load_state_dict(sd)), (lambda o, sd: o.load_state_dict(sd))
        if self.fsdp:  # full tensors -> this process's shards
            from .fsdp import load_full_optim_state, load_full_state_dict

            load_sd, load_opt = load_full_state_dict, load_full_optim_state
        for n, p in self.obj.players.items():
            load_sd(p.module, {k[len(f"player.{n}."):]: v for k, v in tensors.items() if k.startswith(f"player.{n}.")})
        for n, m in self.ema.items():
            load_sd(m, {k[len(f"ema.{n}."):]: v for k, v in tensors.items() if k.startswith(f"ema.{n}.")})
        opt_states = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        for n, o in self.opts.items():
            load_opt(o, opt_states[n])
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        self.step, self.update = int(meta["step"]), int(meta["update"])

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

    def load_latest(self) -> bool:
        ptr = self.ckpt_dir / "latest"
        if not ptr.exists():
            if self.acc.is_main_process:
                print(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            return False
        self.load_checkpoint(self.ckpt_dir / ptr.read_text().strip())
        return True


# -- helpers --------------------------------------------------------------------------------
def load_ema_weights(output_dir: str | Path, modules: dict[str, nn.Module], checkpoint: str | Path | None = None) -> Path:
    """Load the EMA weights of the named players (``{"generator": module}``) from a run's checkpoint
    (the latest by default) into ``modules``, for ``stepdistill export``. Returns the checkpoint path."""
    ckpt_dir = Path(output_dir) / "checkpoints"
    if checkpoint:
        path = Path(checkpoint)
    else:
        if not (ckpt_dir / "latest").exists():
            raise CheckpointError(f"no checkpoint in {ckpt_dir}; train first or pass --checkpoint")
        path = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    tensors = load_file(path / "models.safetensors")
    for name, m in modules.items():
        pre = f"ema.{name}."
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
        if trainer._stop:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        trainer._stop = True
    try:
        old = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, handler)
        return old
    except ValueError:  # not in the main thread
        return None


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
