"""Gradio demo: teacher vs. distilled student, side by side (offline, listens on 127.0.0.1).

    python app.py [--teacher PATH] [--student PATH] [--host 127.0.0.1] [--port N]

Same as ``stepdistill demo``. Defaults: the shipped ``builtin:animal_mnist`` teacher and
``builtin:animal_mnist_dmd2`` student. Needs the ``demo`` extra (``pip install -e ".[demo]"``).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from stepdistill.frontends.demo_ui import add_demo_args

    ap = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    add_demo_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from stepdistill.frontends.demo_ui import cmd_demo

    cmd_demo(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
