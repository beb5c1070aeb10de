"""``fluid eval geneval | fid | scaling``: scoring generations (implemented in fluid_eval)."""

from __future__ import annotations

from typing import Any

from fluid_eval.cli import add_eval_commands


def register(subparsers: Any) -> None:
    add_eval_commands(subparsers)
