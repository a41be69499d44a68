"""Sub-commands added by later modules (distill, export, eval, bench, report, demo)."""
from __future__ import annotations


def add_commands(sub) -> None:
    return None
