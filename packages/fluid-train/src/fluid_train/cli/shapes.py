"""``fluid shapes make | prompts | render``: the shapes world's files (implemented in fluid_eval)."""

from __future__ import annotations

from typing import Any

from fluid_eval.cli import add_shapes_commands


def register(subparsers: Any) -> None:
    add_shapes_commands(subparsers)
