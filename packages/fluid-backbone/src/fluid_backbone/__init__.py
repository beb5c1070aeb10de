"""Transformer trunks for Fluid: a bidirectional masked trunk and a causal, KV-cached trunk.

Both take embedded image tokens [B, N, D] and text states [B, L, D] with a padding mask
[B, L] (True = real token), and return final-normed hidden states [B, N, D].
"""

from __future__ import annotations

import importlib
from typing import Any

from .__about__ import __version__

# name -> submodule: loaded on first access (PEP 562); ``<package>.config`` needs no torch.
_LAZY = {
    "config": ("PosInit", "TransformerConfig"),
    "causal": ("CausalTransformer", "KVCache"),
    "layers": ("Block", "TextKV", "sincos_2d"),
    "masked": ("MaskedTransformer",),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}
_SUBMODULES = ()


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
