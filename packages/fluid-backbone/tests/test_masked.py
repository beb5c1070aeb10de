"""The bidirectional trunk: visible tokens matter everywhere, masked content nowhere."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fluid_backbone import MaskedTransformer


@pytest.fixture
def setup(config, make_text):
    torch.manual_seed(0)
    model = MaskedTransformer(config).eval()
    x = torch.randn(2, config.num_tokens, config.width)
    mask = torch.zeros(2, config.num_tokens, dtype=torch.bool)
    mask[0, [1, 4, 5]] = True
    mask[1, [0, 7]] = True
    text, text_mask = make_text([3, 2], 4, config.width)
    return model, x, mask, text, text_mask


def test_output_shape_and_every_position_depends_on_every_visible_token(setup):
    model, x, mask, text, text_mask = setup
    ref = model(x, mask, text, text_mask)
    assert ref.shape == x.shape
    for b in range(x.shape[0]):
        for j in torch.nonzero(~mask[b]).flatten().tolist():
            edited = x.clone()
            edited[b, j] += 0.5 * torch.randn(x.shape[-1])
            out = model(edited, mask, text, text_mask)
            # Bidirectional: every output position of that image moves, the other image not.
            assert (out[b] - ref[b]).abs().amax(-1).min() > 1e-5, (b, j)
            assert torch.equal(out[1 - b], ref[1 - b])


def test_content_at_masked_positions_is_ignored(setup):
    model, x, mask, text, text_mask = setup
    ref = model(x, mask, text, text_mask)
    scrambled = torch.where(mask[..., None], 1e3 * torch.randn_like(x), x)
    assert torch.equal(model(scrambled, mask, text, text_mask), ref)
    # Masking one more position does change the output.
    more = mask.clone()
    more[0, 0] = True
    assert (model(x, more, text, text_mask)[0] - ref[0]).abs().max() > 1e-4


def test_masked_positions_are_the_mask_token(setup):
    model, x, mask, text, text_mask = setup
    with torch.no_grad():
        model.mask_token.copy_(torch.randn_like(model.mask_token))
    as_tokens = torch.where(mask[..., None], model.mask_token, x)
    nothing_masked = torch.zeros_like(mask)
    torch.testing.assert_close(
        model(x, mask, text, text_mask),
        model(as_tokens, nothing_masked, text, text_mask),
        rtol=0,
        atol=0,
    )


def test_gradients_reach_mask_token_positions_and_blocks(setup):
    model, x, mask, text, text_mask = setup
    model.train()
    model(x, mask, text, text_mask).square().mean().backward()
    assert model.mask_token.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())
    # With nothing masked the mask token takes no part, so it gets exactly zero gradient.
    model.zero_grad()
    model(x, torch.zeros_like(mask), text, text_mask).square().mean().backward()
    assert torch.count_nonzero(model.mask_token.grad) == 0


def test_graph_does_not_depend_on_the_mask(setup):
    model, x, mask, text, text_mask = setup
    kv = model.text_kv(text, text_mask)

    def trace(m):
        return make_fx(lambda x, m: model(x, m, text_kv=kv))(x, m).code

    other = torch.rand(mask.shape) < 0.7
    code = trace(mask)
    assert code == trace(other)
    assert "_local_scalar_dense" not in code and "nonzero" not in code


def test_rejects_bad_inputs(setup, config):
    model, x, mask, text, text_mask = setup
    with pytest.raises(ValueError, match=r"x must be \[B, 8, 32\]"):
        model(x[:, :5], mask[:, :5], text, text_mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(x, mask.float(), text, text_mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        model(x, mask[:1], text, text_mask)
    with pytest.raises(TypeError, match="text_kv must be a TextKV"):
        model(x, mask, text_kv=(text, text_mask))
