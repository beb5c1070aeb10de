"""The ``fluid`` command line: a thin layer that parses, builds from config and calls the library.

Each command group lives in its own module exposing ``register(subparsers)``; every command's
work is reachable from Python through the module it calls.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Command groups in the order ``fluid --help`` lists them.
_COMMAND_MODULES = (
    "info",
    "shapes",
    "train",
    "checkpoints",
    "generate",
    "evaluate",
    "demo",
    "study",
)


def build_parser() -> argparse.ArgumentParser:
    from fluid_train.__about__ import __version__

    parser = argparse.ArgumentParser(
        prog="fluid",
        description="Fluid: autoregressive text-to-image models with continuous tokens.",
    )
    parser.add_argument("--version", action="version", version=f"fluid {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"fluid_train.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every sub-command sets ``func`` (via ``set_defaults``) returning an exit code or None.
    result = args.func(args)
    # Under torchrun the command returned, whatever its status (done, preempted, bad input), so
    # this rank's collectives are done: destroy the group, or its exit may abort and lose the
    # status. An exception propagates with the group left alone: a peer may be inside a
    # collective, and destroying could wait on it (torchrun stops the other ranks).
    from ..process_group import leave

    leave()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
