"""The project's exception family: every error stepdistill raises on purpose derives from
:class:`StepDistillError`, so the CLI can print one line that names the problem and the fix
(exit 2) and keep tracebacks for real bugs (``--debug`` shows them for these too).

Each class also keeps its historical builtin base (``ValueError`` / ``RuntimeError``), so callers
that caught those keep working.
"""
from __future__ import annotations


class StepDistillError(Exception):
    """Base of every deliberate stepdistill error; the message says what is wrong and how to fix it."""


class ConfigError(StepDistillError, ValueError):
    """A config key, CLI flag or argument is unknown or its value is invalid; the message names it."""


class DataError(StepDistillError, ValueError):
    """Unusable input data, with a message that names the file or folder."""


class ModelLoadError(StepDistillError, ValueError):
    """The path / hub id does not hold a supported model; the message says why."""


class CheckpointError(StepDistillError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another run."""


class NonFiniteLossError(StepDistillError, RuntimeError):
    """A loss (or too many gradient elements) became NaN / inf; the message names it and the step."""


class OutputExistsError(StepDistillError, FileExistsError):
    """An output folder already holds files; pass ``--overwrite`` to replace them."""


class TrainingInterrupted(StepDistillError, RuntimeError):
    """A run stopped on SIGINT / SIGTERM; ``exit_code`` is 130 / 143 and the message holds the resume command."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
