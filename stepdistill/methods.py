"""The method registry: what ``method:`` in a distill config names.

A method is an objective builder plus how to export what it trained::

    Method(name, build, ema_modules, export, pipeline="StepDistillPipeline", curve=False)

* ``build(cfg, teacher=None, meta=None, data=None, text_bank=None) -> (objective, data, meta)``: the
  :class:`~stepdistill.trainers.core.Trainer`'s objective (players, updates, losses, sample grids);
* ``ema_modules(objective) -> {player name: network}``: the EMA networks a checkpoint restores for export;
* ``export(ema_modules, objective, cfg, meta, out) -> out``: writes the diffusers folder;
* ``pipeline``: the pipeline class named in ``model_index.json``; ``curve``: ``stepdistill curve`` can score
  its checkpoints (one student network);
* ``checks(cfg, check)``: value checks of the method's own config sections, called by ``config.validate``
  (``check(condition, key, message)`` raises a ConfigError naming the key). ``None``: the DMD options only
  the DMD objective implements (``dmd.divergence``, ``dmd.decoupled``) are refused. The built-in methods'
  checks live in ``config.py`` (:data:`BUILTIN_CHECKS`), so validating a config imports no trainer.

``stepdistill distill`` / ``export`` / ``curve`` look the method up here and never branch on its name.
The built-in methods are named by ``module:attribute`` and imported on first use (this module sits at the
bottom of the package and imports none of them); :func:`register` adds your own, e.g. from a test file::

    from stepdistill.methods import Method, register
    register(Method("toy", build=..., ema_modules=..., export=...))
    # stepdistill distill method=toy ...
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable
    ema_modules: Callable
    export: Callable
    pipeline: str = "StepDistillPipeline"
    curve: bool = False
    description: str = ""
    checks: Callable | None = None


BUILTIN = {
    "dmd": "stepdistill.trainers.dmd_method:DMD_METHOD",
    "dmd2": "stepdistill.trainers.dmd_method:DMD2_METHOD",
    "phased_dmd": "stepdistill.trainers.phased_dmd:METHOD",
    "msd": "stepdistill.trainers.multi_student:METHOD",
    "pso": "stepdistill.trainers.pso:PSO_METHOD",
    "pso_naive": "stepdistill.trainers.pso:PSO_NAIVE_METHOD",
    "rcm": "stepdistill.trainers.rcm:METHOD",
}
BUILTIN_CHECKS = {
    "dmd": "stepdistill.config:check_dmd",
    "dmd2": "stepdistill.config:check_dmd",
    "phased_dmd": "stepdistill.config:check_phased",
    "msd": "stepdistill.config:check_msd",
    "pso": "stepdistill.config:check_pso",
    "pso_naive": "stepdistill.config:check_pso",
    "rcm": "stepdistill.config:check_rcm",
}
_REGISTERED: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` under ``method.name`` (a built-in name or an existing one needs ``replace=True``)."""
    if not replace and (method.name in _REGISTERED or method.name in BUILTIN):
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
    _REGISTERED[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def method_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def get_method(name: str) -> Method:
    """The registered method ``name`` (a :class:`ConfigError` naming the known ones otherwise)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise ConfigError(f"method: unknown method {name!r}; known: {' | '.join(method_names())}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def method_checks(name: str) -> Callable | None:
    """The config checks of method ``name`` (see :class:`Method`), without importing its trainer."""
    if name in _REGISTERED:
        return _REGISTERED[name].checks
    if name in BUILTIN_CHECKS:
        module, attr = BUILTIN_CHECKS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    return None
