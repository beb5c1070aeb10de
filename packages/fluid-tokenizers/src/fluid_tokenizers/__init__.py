"""Image tokenizers for Fluid: images <-> continuous SD-VAE tokens or discrete VQ ids.

`SDVAETokenizer` (the sd-vae-ft-ema layout, 2x2-grouped latents: 256 tokens x 16 channels at
256 px) and `VQTokenizer` (the aMUSEd layout: 256 ids from 8192 codes), both loading and saving
local diffusers directories; small-world configs and training routines for the shapes world.

Submodules load on first use, and diffusers only when a tokenizer is built or loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from .__about__ import __version__

# name -> submodule: loaded on first access (PEP 562), so importing the package is cheap.
_LAZY = {
    "layouts": (
        "amused_vq_config",
        "downsample_factor",
        "sd_vae_ft_ema_config",
        "shapes_vae_config",
        "shapes_vq_config",
        "token_pixels",
    ),
    "sd_vae": (
        "LatentMoments",
        "SDVAETokenizer",
        "calibrate_scaling_factor",
    ),
    "spec": (
        "TokenizerSpec",
        "group_patches",
        "ungroup_patches",
    ),
    "training": (
        "TrainHistory",
        "train_vae",
        "train_vq",
    ),
    "vq": ("VQTokenizer",),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *_LAZY_NAMES]
