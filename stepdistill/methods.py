"""The method registry: what ``method:`` in a distill config names.

A method is one record, made in the method's own module (its one home)::

    Method(name, build, ema_modules, export, pipeline="StepDistillPipeline", curve=False, description="",
           checks=None, sections={}, card=("", ""), describe_run=None, normalise=None)

* ``build(cfg, teacher=None, meta=None, data=None, text_bank=None) -> (objective, data, meta)``: the
  :class:`~stepdistill.trainers.core.Trainer`'s objective (:class:`~stepdistill.trainers.objective.Objective`);
* ``ema_modules(objective) -> {player name: network}``: the EMA networks a checkpoint restores for export;
* ``export(ema_modules, objective, cfg, meta, out) -> out``: writes the diffusers folder (through the one
  exporter, :func:`stepdistill.trainers.export.export_student`);
* ``pipeline``: the pipeline class named in ``model_index.json``; ``curve``: ``stepdistill curve`` can score
  its checkpoints (one student network): True, or ``curve(cfg) -> bool`` when it depends on the run (KD makes a
  one-step student only from a distilled ``dmd.teacher``);
* ``sections``: the config sections the method brings, ``{name: dataclass}``: a ``dmd`` entry extends the shared
  section (:class:`~stepdistill.config.SharedDistillConfig`, e.g. DMD's critic and GAN options), others add a
  section (``phased``, ``msd``, ...). :func:`stepdistill.config.distill_config_class` builds the method's config;
* ``checks(cfg, check)``: value checks of the method's sections, called by ``config.validate``
  (``check(condition, key, message)`` raises a ConfigError naming the key);
* ``card``: (title, paragraph) for the model card; ``describe_run(config dict) -> str``: what this run used, in
  words (the card's "This run" section); ``normalise(cfg)``: makes the method's two spellings of a setting one.

``stepdistill distill`` / ``export`` / ``curve`` look the method up here and never branch on its name.
The built-in methods are named by ``module:attribute`` and imported on first use (this module sits at the
bottom of the package and imports none of them); :func:`register` adds your own, e.g. from a test file::

    from stepdistill.methods import Method, register
    register(Method("toy", build=..., ema_modules=..., export=..., sections={"toy": ToyConfig}))
    # stepdistill distill method=toy toy.some_key=3 ...
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable
    ema_modules: Callable
    export: Callable
    pipeline: str = "StepDistillPipeline"
    curve: bool | Callable = False
    description: str = ""
    checks: Callable | None = None
    sections: dict = field(default_factory=dict)
    card: tuple = ()
    describe_run: Callable | None = None
    normalise: Callable | None = None
    passes: Callable | None = None  # (cfg) -> forward passes of one sample per generator step (curve budgets)

    def scores_curve(self, cfg) -> bool:
        """Whether ``stepdistill curve`` can score this run's checkpoints (``curve``)."""
        return bool(self.curve(cfg)) if callable(self.curve) else bool(self.curve)


BUILTIN = {
    "dmd": "stepdistill.trainers.dmd_method:DMD_METHOD",
    "dmd2": "stepdistill.trainers.dmd_method:DMD2_METHOD",
    "phased_dmd": "stepdistill.trainers.phased_dmd:METHOD",
    "msd": "stepdistill.trainers.multi_student:METHOD",
    "pso": "stepdistill.trainers.pso:PSO_METHOD",
    "pso_naive": "stepdistill.trainers.pso:PSO_NAIVE_METHOD",
    "rcm": "stepdistill.trainers.rcm:METHOD",
    "sid": "stepdistill.trainers.score_implicit:SID_METHOD",
    "uni_instruct": "stepdistill.trainers.score_implicit:UNI_INSTRUCT_METHOD",
    "boot": "stepdistill.trainers.boot:METHOD",
    "kd": "stepdistill.trainers.kd:METHOD",
    "self_forcing": "stepdistill.trainers.causal:METHOD",
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


def method_sections(name: str) -> dict:
    """The config sections of method ``name`` (:class:`Method`); {} for an unknown name (validation names it)."""
    if name not in _REGISTERED and name not in BUILTIN:
        return {}
    return dict(get_method(name).sections)
