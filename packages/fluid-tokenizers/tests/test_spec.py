"""TokenizerSpec and the MAR 2x2 patch grouping."""

from __future__ import annotations

import pytest
import torch

from fluid_tokenizers import TokenizerSpec, group_patches, ungroup_patches


def test_grouping_order_is_c_p_q() -> None:
    # latent[b, c, y, x] = 1000 c + 10 y + x, so every value names its own position.
    c, y, x = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(6), indexing="ij")
    latents = (1000 * c + 10 * y + x).float().unsqueeze(0)  # [1, 4, 4, 6]
    tokens = group_patches(latents, 2)  # [1, 2*3, 4*2*2]
    assert tokens.shape == (1, 6, 16)
    # Token 4 is grid row 1, col 1: pixel rows 2-3, cols 2-3; channels run (c, p, q).
    expected = [
        1000 * ch + 10 * (2 + p) + (2 + q) for ch in range(4) for p in range(2) for q in range(2)
    ]
    assert tokens[0, 4].tolist() == expected
    # Raster order over the grid: token k sits at grid (k // 3, k % 3).
    assert tokens[0, :, 0].tolist() == [10 * 2 * (k // 3) + 2 * (k % 3) for k in range(6)]


def test_ungroup_inverts_group_exactly() -> None:
    latents = torch.randn(3, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    tokens = group_patches(latents, 2)
    assert torch.equal(ungroup_patches(tokens, (4, 5), 2), latents)
    assert torch.equal(group_patches(ungroup_patches(tokens, (4, 5), 2), 2), tokens)


def test_grouping_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="do not split into 2x2"):
        group_patches(torch.zeros(1, 4, 5, 4), 2)
    with pytest.raises(ValueError, match=r"latents must be \[B, C, H, W\]"):
        group_patches(torch.zeros(4, 4, 4), 2)
    with pytest.raises(ValueError, match=r"tokens must be \[B, 16, C\*2\*2\]"):
        ungroup_patches(torch.zeros(1, 15, 16), (4, 4), 2)


def test_spec_counts_tokens_and_checks_kind() -> None:
    spec = TokenizerSpec(
        kind="continuous", image_size=256, grid=(16, 16), token_dim=16, vocab_size=None
    )
    assert spec.num_tokens == 256
    with pytest.raises(ValueError, match="discrete spec needs vocab_size"):
        TokenizerSpec(
            kind="discrete", image_size=256, grid=(16, 16), token_dim=None, vocab_size=None
        )
    with pytest.raises(ValueError, match="kind must be"):
        TokenizerSpec(kind="pixels", image_size=8, grid=(1, 1), token_dim=1, vocab_size=None)  # type: ignore[arg-type]
