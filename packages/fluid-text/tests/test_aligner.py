from __future__ import annotations

import pytest
import torch

import fluid_text
from fluid_text import AlignerConfig, TextAligner


def make_aligner(**overrides) -> TextAligner:
    torch.manual_seed(0)
    config = AlignerConfig(**{"text_dim": 24, "width": 32, "num_heads": 4, **overrides})
    return TextAligner(config)


def padded_batch(lengths: list[int], pad_to: int, dim: int = 24, fill: float = float("nan")):
    """Text states with real tokens first and `fill` (garbage) in the padded positions."""
    torch.manual_seed(1)
    hidden = torch.full((len(lengths), pad_to, dim), fill)
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.bool)
    for row, length in enumerate(lengths):
        hidden[row, :length] = torch.randn(
            length, dim, generator=torch.Generator().manual_seed(row)
        )
        mask[row, :length] = True
    return hidden, mask


def test_default_has_six_trainable_blocks_and_builds_on_meta():
    aligner = make_aligner()
    assert aligner.config.depth == 6 and len(aligner.blocks) == 6
    assert all(p.requires_grad for p in aligner.parameters())
    # fluid-166m's aligner, counted without allocating: the input projection 4096 -> 768 and
    # six blocks of ~12 W^2 dominate.
    with torch.device("meta"):
        built = TextAligner(AlignerConfig(text_dim=4096, width=768, num_heads=12))
    count = sum(p.numel() for p in built.parameters())
    assert 4096 * 768 + 6 * 12 * 768**2 < count < 1.01 * (4096 * 768 + 6 * 12 * 768**2)


def test_shapes_and_padded_outputs_are_zero():
    aligner = make_aligner()
    hidden, mask = padded_batch([3, 7, 1], pad_to=9)
    out = aligner(hidden, mask)
    assert isinstance(out, fluid_text.TextStates)
    assert out.hidden.shape == (3, 9, 32) and out.hidden.dtype == torch.float32
    assert torch.equal(out.mask, mask)
    assert torch.isfinite(out.hidden).all()
    assert (out.hidden[~mask] == 0).all() and (out.hidden[mask].abs().sum(-1) > 0).all()


def test_real_states_do_not_depend_on_padding_length_or_content():
    aligner = make_aligner()
    short = aligner(*padded_batch([5, 16, 2], pad_to=16, fill=float("nan")))
    long = aligner(*padded_batch([5, 16, 2], pad_to=40, fill=1e4))
    assert torch.equal(long.mask[:, :16], short.mask)
    torch.testing.assert_close(long.hidden[:, :16], short.hidden, atol=1e-6, rtol=0)
    # The mask really matters: without it the padding changes the real states.
    hidden, mask = padded_batch([5, 16, 2], pad_to=40, fill=1.0)
    unmasked = aligner(hidden, torch.ones_like(mask))
    assert not torch.allclose(unmasked.hidden[0, :5], short.hidden[0, :5], atol=1e-3)


def test_all_padding_rows_give_no_nan_and_leave_other_rows_alone():
    aligner = make_aligner()
    hidden, mask = padded_batch([4, 0], pad_to=6)
    out = aligner(hidden, mask)
    assert torch.isfinite(out.hidden).all()
    assert (out.hidden[1] == 0).all()
    alone = aligner(hidden[:1], mask[:1])
    torch.testing.assert_close(out.hidden[:1], alone.hidden, atol=1e-6, rtol=0)


def test_null_text_replaces_exactly_the_dropped_rows():
    aligner = make_aligner()
    hidden, mask = padded_batch([3, 5, 8, 2], pad_to=8, fill=0.0)
    drop = torch.tensor([False, True, False, True])
    kept = aligner(hidden, mask)
    out = aligner(hidden, mask, drop=drop)
    null = aligner.null_text(4, 8)
    assert null.hidden.shape == (4, 8, 32)
    assert torch.equal(null.mask, torch.tensor([[True] + [False] * 7] * 4))
    assert torch.equal(null.hidden[:, 0], aligner.null_token.detach().expand(4, 32))
    assert (null.hidden[:, 1:] == 0).all()
    assert torch.equal(out.hidden[drop], null.hidden[drop])
    assert torch.equal(out.mask[drop], null.mask[drop])
    assert torch.equal(out.hidden[~drop], kept.hidden[~drop])
    assert torch.equal(out.mask[~drop], kept.mask[~drop])
    # Nothing dropped: identical to no drop at all.
    assert torch.equal(
        aligner(hidden, mask, drop=torch.zeros(4, dtype=torch.bool)).hidden, kept.hidden
    )


def test_gradients_reach_the_null_token_only_through_dropped_rows():
    aligner = make_aligner(depth=2)
    hidden, mask = padded_batch([3, 5], pad_to=5, fill=0.0)
    aligner(hidden, mask, drop=torch.tensor([False, False])).hidden.sum().backward()
    assert aligner.null_token.grad is None or (aligner.null_token.grad == 0).all()
    assert all(p.grad is not None for n, p in aligner.named_parameters() if n != "null_token")
    aligner.zero_grad()
    aligner(hidden, mask, drop=torch.tensor([True, False])).hidden.sum().backward()
    assert torch.equal(aligner.null_token.grad, torch.ones(1, 32))


def test_low_precision_input_is_cast_to_the_aligner_dtype():
    aligner = make_aligner(depth=1)
    hidden, mask = padded_batch([3, 4], pad_to=4, fill=0.0)
    out = aligner(hidden.to(torch.bfloat16), mask)
    assert out.hidden.dtype == torch.float32
    torch.testing.assert_close(out.hidden, aligner(hidden, mask).hidden, atol=0.05, rtol=0.05)


def test_bad_input_is_named():
    aligner = make_aligner(depth=1)
    hidden, mask = padded_batch([3, 4], pad_to=4, fill=0.0)
    with pytest.raises(ValueError, match=r"hidden must be a float \[B, L, 24\]"):
        aligner(hidden[..., :8], mask)
    with pytest.raises(ValueError, match=r"mask must be a bool \[B, L\] = \[2, 4\]"):
        aligner(hidden, mask.long())
    with pytest.raises(ValueError, match=r"drop must be a bool \[B\] = \[2\]"):
        aligner(hidden, mask, drop=torch.tensor([True]))
    with pytest.raises(ValueError, match="length must be a positive int"):
        aligner.null_text(2, 0)
    with pytest.raises(ValueError, match="width 30 must be divisible by num_heads 4"):
        AlignerConfig(text_dim=8, width=30, num_heads=4)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        AlignerConfig(text_dim=8, width=32, num_heads=4, depth=0)
    assert isinstance(
        TextAligner(AlignerConfig(text_dim=8, width=32, num_heads=4, depth=1)), TextAligner
    )
