from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from fluid_backbone import TransformerConfig

TextFactory = Callable[..., tuple[Tensor, Tensor]]


@pytest.fixture
def config() -> TransformerConfig:
    return TransformerConfig(width=32, depth=2, num_heads=4, grid=(1, 8))


@pytest.fixture
def make_text() -> TextFactory:
    """Random text states [B, L, D] and a padding mask [B, L] with the given real lengths."""

    def make(
        lengths: list[int], length: int, width: int, *, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        text = torch.randn(len(lengths), length, width, generator=gen)
        mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # [B, L]
        return text, mask

    return make
