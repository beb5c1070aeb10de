"""Shared fixtures: synthetic flat-shape images and tiny tokenizer configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

# Saturated colours in [-1, 1] on a light grey background, as in the shapes world.
_PALETTE = torch.tensor(
    [[1.0, -1.0, -1.0], [-1.0, 0.6, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]
)
_BACKGROUND = 0.7


def _make_shapes(count: int, size: int = 64, *, seed: int = 0) -> Tensor:
    """[count, 3, size, size] in [-1, 1]: 1-3 filled circles or squares on a plain background."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")  # [S, S]
    images = torch.full((count, 3, size, size), _BACKGROUND)
    for image in images:
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            colour = _PALETTE[torch.randint(len(_PALETTE), (1,), generator=generator)].view(3, 1, 1)
            radius = size * (0.1 + 0.12 * float(torch.rand(1, generator=generator)))
            cx, cy = (radius + torch.rand(2, generator=generator) * (size - 2 * radius)).tolist()
            if float(torch.rand(1, generator=generator)) < 0.5:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            else:
                inside = ((xx - cx).abs() <= radius) & ((yy - cy).abs() <= radius)
            image.copy_(torch.where(inside, colour, image))
    return images


@pytest.fixture(scope="session")
def make_shapes():
    """The synthetic-image factory: make_shapes(count, size=64, *, seed=0)."""
    return _make_shapes


@pytest.fixture
def tiny_vae_config() -> dict[str, Any]:
    """f=4 AutoencoderKL small enough for millisecond steps."""
    return {
        "block_out_channels": [8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": True,
        "sample_size": 32,
    }


@pytest.fixture
def tiny_vq_config() -> dict[str, Any]:
    """f=4 VQModel with a 64-code, 4-dim codebook."""
    return {
        "block_out_channels": [8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 8,
        "vq_embed_dim": 4,
        "num_vq_embeddings": 64,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "lookup_from_codebook": True,
        "sample_size": 32,
    }
