"""Image tokenizers for Fluid: images <-> continuous SD-VAE tokens or discrete VQ ids.

`SDVAETokenizer` (the sd-vae-ft-ema layout, 2x2-grouped latents: 256 tokens x 16 channels at
256 px) and `VQTokenizer` (the aMUSEd layout: 256 ids from 8192 codes), both loading and saving
local diffusers directories; small-world configs and training routines for the shapes world.
"""

from __future__ import annotations

from .__about__ import __version__
from .sd_vae import (
    LatentMoments,
    SDVAETokenizer,
    calibrate_scaling_factor,
    sd_vae_ft_ema_config,
    shapes_vae_config,
)
from .spec import TokenizerSpec, group_patches, ungroup_patches
from .training import TrainHistory, train_vae, train_vq
from .vq import VQTokenizer, amused_vq_config, shapes_vq_config

__all__ = [
    "LatentMoments",
    "SDVAETokenizer",
    "TokenizerSpec",
    "TrainHistory",
    "VQTokenizer",
    "__version__",
    "amused_vq_config",
    "calibrate_scaling_factor",
    "group_patches",
    "sd_vae_ft_ema_config",
    "shapes_vae_config",
    "shapes_vq_config",
    "train_vae",
    "train_vq",
    "ungroup_patches",
]
