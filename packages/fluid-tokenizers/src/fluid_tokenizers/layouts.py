"""The tokenizers' architectures as plain diffusers config dicts, and the geometry they imply.

Importable without torch or diffusers: a model config reads how many pixels one token covers
from here (``token_pixels``), and ``SDVAETokenizer``/``VQTokenizer`` build their models from
these dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "amused_vq_config",
    "downsample_factor",
    "sd_vae_ft_ema_config",
    "shapes_vae_config",
    "shapes_vq_config",
    "token_pixels",
]

# The public stabilityai/sd-vae-ft-ema config.json (diffusers 0.4.2 era). The file itself has no
# scaling_factor key; diffusers' default 0.18215 (the SD v1 value) applies, written out here.
# 83.65M parameters (encoder 34.16M, decoder 49.49M).
_SD_VAE_FT_EMA: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The shapes world (64 px, flat colours): f=4 so 64 px -> latent 4x16x16 -> 8x8 = 64 tokens x 16.
# Narrow and attention-free so that `train_vae` fits in the demo's CPU budget.
_SHAPES_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "mid_block_add_attention": False,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 1.0,  # set by calibrate_scaling_factor after training
    "up_block_types": ["UpDecoderBlock2D"] * 3,
}


# The public amused/amused-256 `vqvae/config.json`: a VQ-GAN converted from open-MUSE, f=16,
# 64-dim latents quantized against 8192 codes (vq_embed_dim None -> latent_channels = 64).
# 146.24M parameters (encoder 58.69M, decoder 87.02M, codebook 0.52M).
_AMUSED_VQ: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "vq_embed_dim": None,
}

# The shapes world: 64 px, f=8 -> 8x8 = 64 ids from a 512-code, 8-dim codebook. Low-dimensional
# codes keep most of the codebook in use when it is trained from scratch on a small set.
_SHAPES_VQ: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 1,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 8,
    "norm_type": "group",
    "num_vq_embeddings": 512,
    "out_channels": 3,
    "sample_size": 64,
    "scaling_factor": 1.0,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "vq_embed_dim": 8,
}



def _copy(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in config.items()}


def sd_vae_ft_ema_config() -> dict[str, Any]:
    """The public sd-vae-ft-ema AutoencoderKL layout (f=8, 4 latent channels, 83.65M params)."""
    return _copy(_SD_VAE_FT_EMA)


def shapes_vae_config() -> dict[str, Any]:
    """The shapes-world AutoencoderKL layout: 64 px, f=4, 4 latent channels (0.23M params)."""
    return _copy(_SHAPES_VAE)


def amused_vq_config() -> dict[str, Any]:
    """The public aMUSEd-256 VQModel layout (f=16, 64-dim latents, 8192 codes, 146.24M params)."""
    return _copy(_AMUSED_VQ)


def shapes_vq_config() -> dict[str, Any]:
    """The shapes-world VQModel layout: 64 px, f=8, 512 codes of 8 dims."""
    return _copy(_SHAPES_VQ)


def downsample_factor(config: Mapping[str, Any]) -> int:
    """Pixels per latent side of a diffusers VAE/VQ config: each down block after the first halves."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def token_pixels(config: Mapping[str, Any], patch_size: int = 1) -> int:
    """Pixels per token side: the downsampling factor times the latent patch grouped into a token
    (``token_pixels(shapes_vae_config(), 2)`` = 8: a 64 px image is 8x8 tokens)."""
    return downsample_factor(config) * patch_size
