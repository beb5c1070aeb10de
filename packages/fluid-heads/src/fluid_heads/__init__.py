"""Token heads for Fluid: the tied softmax head and the per-token diffusion (DiffLoss) head.

A head owns both sides of a token: the input embedding (``embed``) and the output side
(``loss`` and ``sample``), so a trunk is agnostic of discrete vs continuous tokens.
"""

from __future__ import annotations

import importlib
from typing import Any

from .__about__ import __version__

# name -> submodule: loaded on first access (PEP 562); ``<package>.config`` needs no torch.
_LAZY = {
    "config": ("DiffLossConfig",),
    "diffloss": ("DiffLossHead", "DiffLossMLP"),
    "diffusion": ("GaussianDiffusion", "create_diffusion"),
    "softmax": ("SoftmaxHead", "TokenSample"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}
_SUBMODULES = ('diffusion',)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *_LAZY_NAMES, *_SUBMODULES]
