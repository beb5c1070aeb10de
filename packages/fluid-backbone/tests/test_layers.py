"""Config, parameter counts, initialisation and the behaviour both trunks share."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fluid_backbone import (
    CausalTransformer,
    MaskedTransformer,
    TextKV,
    TransformerConfig,
)

TRUNKS = [MaskedTransformer, CausalTransformer]


def run(model, x, text=None, text_mask=None, **kw):
    """Call either trunk with an arbitrary fixed mask for the masked one."""
    if isinstance(model, MaskedTransformer):
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, ::3] = True
        return model(x, mask, text, text_mask, **kw)
    return model(x, text, text_mask, **kw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=30, depth=1, num_heads=4, grid=(2, 2)), "divisible by num_heads"),
        (dict(width=32, depth=0, num_heads=4, grid=(2, 2)), "depth must be a positive int"),
        (dict(width=32, depth=1, num_heads=4, grid=(2, 2.0)), "grid must be \\(rows, columns\\) of positive ints"),
        (dict(width=32, depth=1, num_heads=4, grid=(2, 2), dropout=1.0), "dropout"),
        (dict(width=32, depth=1, num_heads=4, grid=(2, 2), mlp_ratio=0.0), "mlp_ratio"),
        (dict(width=32, depth=1, num_heads=4, grid=(2, 2), norm_eps=0.0), "norm_eps"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)


def test_paper_scale_trunk_builds_on_meta():
    # fluid-166m's trunk: 12 blocks of width 768 over 256 tokens, counted without allocating.
    config = TransformerConfig(width=768, depth=12, num_heads=12, grid=(16, 16))
    with torch.device("meta"):
        model = MaskedTransformer(config)
    count = sum(p.numel() for p in model.parameters())
    assert 16 * 768**2 * 12 < count < 16 * 768**2 * 12 * 1.01  # ~16 D^2 per block dominates


@pytest.mark.parametrize("trunk", TRUNKS)
def test_initialisation_follows_mar(trunk):
    torch.manual_seed(0)
    config = TransformerConfig(width=64, depth=2, num_heads=4, grid=(8, 8), qk_norm=True)
    model = trunk(config)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert module.weight.abs().max() <= bound
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.1)
            assert torch.count_nonzero(module.bias) == 0
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.count_nonzero(module.bias) == 0
            assert module.eps == 1e-6
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    token = model.mask_token if trunk is MaskedTransformer else model.start_token
    assert 0.01 < token.std() < 0.03


@pytest.mark.parametrize("trunk", TRUNKS)
def test_padding_text_has_no_effect(trunk, config, make_text):
    torch.manual_seed(0)
    model = trunk(config).eval()
    x = torch.randn(3, config.num_tokens, config.width)
    text, mask = make_text([5, 2, 3], 5, config.width)
    ref = run(model, x, text, mask)
    # Other values at the padded positions, and three more padded positions.
    noisy = torch.where(mask[..., None], text, 100.0 * torch.randn_like(text))
    longer = torch.cat([noisy, torch.randn(3, 3, config.width)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(run(model, x, longer, longer_mask), ref, rtol=0, atol=1e-6)
    # The real text tokens do matter.
    edited = text.clone()
    edited[1, 0] += 1.0
    out = run(model, x, edited, mask)
    assert (out[1] - ref[1]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("trunk", TRUNKS)
def test_row_without_text_gets_no_cross_attention(trunk, config, make_text):
    torch.manual_seed(0)
    model = trunk(config).eval()
    x = torch.randn(2, config.num_tokens, config.width)
    text, mask = make_text([3, 0], 4, config.width)
    out = run(model, x, text, mask)
    assert torch.isfinite(out).all()
    # The empty row's output matches a forward whose cross-attention is switched off.
    for block in model.blocks:
        block.cross_attn.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    torch.testing.assert_close(out[1], run(model, x, text, mask)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("trunk", TRUNKS)
def test_text_kv_reuse_and_cfg_concatenation(trunk, config, make_text):
    torch.manual_seed(0)
    model = trunk(config).eval()
    x = torch.randn(2, config.num_tokens, config.width)
    text, mask = make_text([4, 2], 4, config.width)
    null, null_mask = make_text([1, 1], 4, config.width, seed=1)
    kv = model.text_kv(text, mask)
    assert kv.num_layers == config.depth and kv.batch_size == 2 and kv.length == 4
    assert kv.keys[0].shape == (2, config.num_heads, 4, config.head_dim)
    assert torch.equal(run(model, x, text, mask), run(model, x, text_kv=kv))
    # CFG: [cond; uncond] from two TextKVs equals the text_kv of the concatenated text.
    both = TextKV.cat([kv, model.text_kv(null, null_mask)])
    direct = model.text_kv(torch.cat([text, null]), torch.cat([mask, null_mask]))
    x2 = torch.cat([x, x])
    out = run(model, x2, text_kv=both)
    torch.testing.assert_close(out, run(model, x2, text_kv=direct), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:2], run(model, x, text, mask), rtol=0, atol=1e-6)
    # A batch-1 text broadcast to 3 rows equals the repeated text.
    one = model.text_kv(text[:1], mask[:1]).expand(3)
    x3 = torch.randn(3, config.num_tokens, config.width)
    torch.testing.assert_close(
        run(model, x3, text_kv=one),
        run(model, x3, text[:1].expand(3, -1, -1), mask[:1].expand(3, -1)),
        rtol=0,
        atol=1e-6,
    )


def test_text_kv_rejects_mismatches(config, make_text):
    model = MaskedTransformer(config)
    text, mask = make_text([2, 1], 3, config.width)
    with pytest.raises(ValueError, match="text must be"):
        model.text_kv(text[..., :5], mask)
    with pytest.raises(ValueError, match="text_mask must be a bool"):
        model.text_kv(text, mask.long())
    with pytest.raises(ValueError, match="text_mask must be a bool"):
        model.text_kv(text, mask[:, :2])
    kv = model.text_kv(text, mask)
    with pytest.raises(ValueError, match="TextKV.cat"):
        TextKV.cat([kv, model.text_kv(*make_text([1, 1], 4, config.width))])
    with pytest.raises(ValueError, match="can only expand batch 1"):
        kv.expand(4)
    x = torch.randn(3, config.num_tokens, config.width)
    mask3 = torch.zeros(3, config.num_tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="text_kv has batch 2"):
        model(x, mask3, text_kv=kv)
    with pytest.raises(ValueError, match="pass text and text_mask"):
        model(x, mask3)
    deeper = TransformerConfig(width=32, depth=3, num_heads=4, grid=(1, 8))
    with pytest.raises(ValueError, match="text_kv must hold 3 layers"):
        MaskedTransformer(deeper)(x[:2], mask3[:2], text_kv=kv)


@pytest.mark.parametrize("trunk", TRUNKS)
def test_qk_norm_runs_and_changes_the_output(trunk, make_text):
    base = dict(width=32, depth=2, num_heads=4, grid=(1, 8))
    torch.manual_seed(0)
    plain = trunk(TransformerConfig(**base)).eval()
    torch.manual_seed(0)
    normed = trunk(TransformerConfig(**base, qk_norm=True)).eval()
    shared = plain.state_dict()
    extra = {k for k in normed.state_dict() if k not in shared}
    assert extra and all("q_norm" in k or "k_norm" in k for k in extra)
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in shared.items())
    x = 3.0 * torch.randn(2, 8, 32)
    text, mask = make_text([3, 2], 3, 32)
    out = run(normed, x, text, mask)
    assert torch.isfinite(out).all()
    assert (out - run(plain, x, text, mask)).abs().max() > 1e-3


@pytest.mark.parametrize("trunk", TRUNKS)
def test_dropout_is_off_by_default_and_configurable(trunk, make_text):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    text, mask = make_text([3, 2], 3, 32)
    plain = trunk(TransformerConfig(width=32, depth=1, num_heads=4, grid=(1, 8))).train()
    assert torch.equal(run(plain, x, text, mask), run(plain, x, text, mask))
    dropped = trunk(TransformerConfig(width=32, depth=1, num_heads=4, grid=(1, 8), dropout=0.5))
    assert not torch.equal(run(dropped.train(), x, text, mask), run(dropped, x, text, mask))
    assert torch.equal(run(dropped.eval(), x, text, mask), run(dropped, x, text, mask))


# --------------------------------------------------------------------------- positions


def test_sincos_table_encodes_column_then_row():
    from fluid_backbone import sincos_2d

    table = sincos_2d(3, 5, 16)  # [15, 16], row-major positions
    assert table.shape == (15, 16)
    grid = table.reshape(3, 5, 16)
    # the first half depends on the column only, the second on the row only
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])
    assert torch.allclose(grid[:, 0, 8:], grid[:, 4, 8:])
    assert not torch.allclose(grid[0, 0, :8], grid[0, 1, :8])
    # nearer positions are more alike: the table carries a notion of neighbourhood
    centre = grid[1, 2]
    assert centre @ grid[1, 3] > centre @ grid[1, 4] > centre @ grid[1, 0] - 1e-6
    # ... and only the offset counts: two columns left or right are equally alike
    torch.testing.assert_close(centre @ grid[1, 4], centre @ grid[1, 0])
    assert centre @ grid[0, 2] > centre @ grid[0, 4]
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


@pytest.mark.parametrize("trunk_cls", TRUNKS)
def test_sincos_pos_init_starts_from_the_table(trunk_cls):
    from fluid_backbone import sincos_2d

    config = TransformerConfig(
        width=16, depth=1, num_heads=2, grid=(3, 4), pos_init="sincos"
    )
    model = trunk_cls(config)
    assert torch.allclose(model.pos_embed[0], sincos_2d(3, 4, 16))
    assert model.pos_embed.requires_grad  # a starting point, still learned
    square = trunk_cls(
        TransformerConfig(width=16, depth=1, num_heads=2, grid=(3, 3), pos_init="sincos")
    )
    assert torch.allclose(square.pos_embed[0], sincos_2d(3, 3, 16))
    default = trunk_cls(TransformerConfig(width=16, depth=1, num_heads=2, grid=(3, 3)))
    assert default.pos_embed.std() < 0.05  # MAR's truncated normal, std 0.02
    assert default.pos_embed.std() > 0.01  # initialised, not left at zero


def test_pos_init_and_grid_are_validated():
    base = {"width": 16, "depth": 1, "num_heads": 2}
    with pytest.raises(ValueError, match="pos_init"):
        TransformerConfig(**base, grid=(3, 4), pos_init="rope")
    for bad in ((3,), (3, 0), (3, 4, 1), "3x4"):
        with pytest.raises(ValueError, match="grid"):
            TransformerConfig(**base, grid=bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        TransformerConfig(width=18, depth=1, num_heads=2, grid=(3, 3), pos_init="sincos")
    config = TransformerConfig(**base, grid=[3, 4])
    assert config.grid == (3, 4)  # JSON lists become tuples
    assert config.num_tokens == 12  # derived from the grid, stored nowhere else
