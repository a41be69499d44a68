"""Settings that change during one run: the ``schedule:`` section of a distill config.

A recipe is rarely one set of numbers. DMD2's one-step students start with an ODE regression, train the
fake score and the generator at a high learning rate, then anneal it; our shipped student also lowered the
regression weight and raised the pixel discriminator's weight as it went (BENCHMARKS.md). A schedule writes
such a chain as one file::

    schedule:
      - {at: 800, set: {dmd.optim.lr: 2.0e-5, dmd.critic_optim.lr: 2.0e-5}}
      - {at: 1000, ramp: 200, set: {dmd.regression_weight: 0.05, dmd.pixel_gan_g_weight: 0.3}}

``at: N`` means from generator step N on (0-based: after N completed steps; a checkpoint written at step N
resumes with these values). ``ramp: R`` moves numbers linearly from the value in force at step N to the new
value at step N + R. The values are a pure function of the step, so a resumed run applies exactly what an
uninterrupted one did, and the checkpoint records the values in force (``meta.json``: ``schedule``).

Only the keys in :data:`SCHEDULABLE` can be scheduled: loss weights, learning rates, noise-level range,
guidance, critic ratio, the f-divergence of the DM term, EMA decay and the batch size, all read live by the
trainer and the DMD objective.
Settings that shape networks or data (``dmd.gan``, ``dmd.regression_pairs``, ...) are fixed for the run.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: dotted config keys a schedule may change, and the methods whose objective reads them live ("*": the trainer
#: core reads them, so every method)
SCHEDULABLE: dict[str, tuple[str, ...]] = {
    **{f"dmd.{k}": ("dmd", "dmd2", "msd") for k in (  # MSD: every part's DMD2 objective reads the same dmd section
        "dm_weight", "gan_g_weight", "gan_d_weight", "regression_weight", "pixel_gan_g_weight", "pixel_gan_d_weight",
        "pixel_gan_r1", "pixel_gan_lr", "t_min", "t_max", "critic_updates", "real_guidance_scale",
        "ca_weight", "dm_term_weight")},
    # f-distill's weights (trainers/fdistill.py): read live by the DM term; a run whose schedule names a divergence
    # other than reverse_kl trains with the f-distill objective, which is DMD2 bit for bit while reverse_kl is in force
    "dmd.divergence": ("dmd", "dmd2"),
    "dmd.optim.lr": ("*",), "dmd.critic_optim.lr": ("*",), "train.ema_decay": ("*",),
    "train.batch_size": ("*",),  # each update draws its global batch at the size in force (trainers/objective.Ctx)
}


@dataclass
class ScheduleEntry:
    """From generator step ``at`` on, the dotted keys of ``set`` take their values (linearly over ``ramp`` steps
    for numbers when ``ramp`` > 0)."""
    at: int = 0
    set: dict[str, Any] = field(default_factory=dict)
    ramp: int = 0


def flatten_set(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"dmd": {"t_min": 2}}`` and ``{"dmd.t_min": 2}`` -> ``{"dmd.t_min": 2}``."""
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_set(v, key + "."))
        else:
            out[key] = v
    return out


def get_dotted(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_dotted(cfg, key: str, value) -> None:
    *head, leaf = key.split(".")
    obj = cfg
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def field_type(cfg, key: str):
    """The declared type of a dotted key, or None when the key does not exist."""
    import typing

    obj = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            return None
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            return None
        if i == len(parts) - 1:
            return hints[part]
        obj = getattr(obj, part)
    return None


def values_at(base: dict[str, Any], entries: list[ScheduleEntry], step: int) -> dict[str, Any]:
    """The values of the scheduled keys in force at generator step ``step``; ``base`` holds their values before
    any entry (the config's own)."""
    cur = dict(base)
    for e in sorted(entries, key=lambda e: e.at):  # stable: entries at one step apply in file order
        if e.at > step:
            break
        for k, new in flatten_set(e.set).items():
            start = cur[k]
            if e.ramp > 0 and step < e.at + e.ramp and isinstance(new, float) and not isinstance(new, bool):
                cur[k] = start + (new - start) * ((step - e.at) / e.ramp)
            else:
                cur[k] = new
    return cur


class Schedule:
    """Applies a config's ``schedule`` to the live config objects (which the objective and the players read)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.entries: list[ScheduleEntry] = list(getattr(cfg, "schedule", []) or [])
        self.keys = sorted({k for e in self.entries for k in flatten_set(e.set)})
        self.base = {k: get_dotted(cfg, k) for k in self.keys}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def values(self, step: int) -> dict[str, Any]:
        """The values in force at ``step`` (nothing is set)."""
        return values_at(self.base, self.entries, step)

    def apply(self, step: int) -> dict[str, Any]:
        """Set the values in force at ``step``; returns them."""
        vals = self.values(step)
        for k, v in vals.items():
            set_dotted(self.cfg, k, v)
        return vals

    def restore(self) -> None:
        """Back to the config's own values (what was loaded), e.g. after training."""
        for k, v in self.base.items():
            set_dotted(self.cfg, k, v)


def check_schedule(cfg, coerce, validate, error) -> None:
    """Config checks of ``schedule`` (called by :func:`stepdistill.config.validate`): every key exists and may be
    scheduled for this method, every value has the key's type and passes the config's own checks at the step it
    takes effect. ``coerce(value, type, key)`` and ``validate(cfg)`` are the config module's; ``error(msg)``
    raises."""
    entries = getattr(cfg, "schedule", []) or []
    method = getattr(cfg, "method", "")
    trial = copy.deepcopy(cfg)
    trial.schedule = []
    for i, e in sorted(enumerate(entries), key=lambda ie: ie[1].at):
        where = f"schedule[{i}]"
        if e.at < 0:
            error(f"{where}.at: must be >= 0 (a generator step), got {e.at}")
        if e.ramp < 0:
            error(f"{where}.ramp: must be >= 0, got {e.ramp}")
        if not isinstance(e.set, dict) or not e.set:
            error(f"{where}.set: needs a mapping of config keys to values, e.g. {{dmd.regression_weight: 0.05}}")
        coerced = {}
        for key, value in flatten_set(e.set).items():
            name = f"{where}.set.{key}"
            tp = field_type(cfg, key)
            if tp is None:
                error(f"{name}: unknown config key {key}")
            if key not in SCHEDULABLE:
                error(f"{name}: {key} cannot change during a run; schedulable keys: {', '.join(SCHEDULABLE)}")
            if "*" not in SCHEDULABLE[key] and method not in SCHEDULABLE[key]:
                error(f"{name}: {key} can be scheduled with method {' | '.join(SCHEDULABLE[key])} only, not {method}")
            v = coerce(value, tp, name)
            if e.ramp and tp is int:
                error(f"{name}: {key} is an integer and cannot ramp; use ramp: 0 (a switch)")
            if e.ramp and tp is str:
                error(f"{name}: {key} is a name and cannot ramp; use ramp: 0 (a switch)")
            if key in ("dmd.pixel_gan_g_weight", "dmd.pixel_gan_lr") and get_dotted(cfg, key) == 0:
                error(f"{name}: the pixel discriminator is built only when {key} > 0 at the start; give it a base "
                      f"value > 0 (its weight can start small) and schedule the change")
            coerced[key] = v
            set_dotted(trial, key, v)
        e.set = coerced  # flat dotted keys, values of the keys' types
        try:
            validate(trial)
        except Exception as ex:  # the config's own message, placed at the entry that caused it
            error(f"{where} (from step {e.at}): {ex}")
