"""The causal trunk: no peeking ahead, and KV-cached decoding equals the full forward."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fluid_backbone import CausalTransformer, KVCache, TransformerConfig


def decode(model, x, text, text_mask, *, batch=None):
    """Teacher-forced step-by-step decoding: feed x_{k-1} at step k; returns [B, N, D]."""
    cache = model.init_cache(batch or x.shape[0], text, text_mask)
    outs = [model.step(None, cache)]
    for k in range(1, x.shape[1]):
        outs.append(model.step(x[:, k - 1 : k], cache))
    return torch.cat(outs, dim=1), cache


@pytest.fixture
def setup(config, make_text):
    torch.manual_seed(0)
    model = CausalTransformer(config).eval()
    x = torch.randn(3, config.num_tokens, config.width)
    text, text_mask = make_text([4, 1, 2], 4, config.width)
    return model, x, text, text_mask


def test_position_i_ignores_tokens_from_i_on(setup):
    model, x, text, text_mask = setup
    ref = model(x, text, text_mask)
    assert ref.shape == x.shape
    n = x.shape[1]
    for j in range(n):
        edited = x.clone()
        edited[:, j] += torch.randn(x.shape[-1])
        out = model(edited, text, text_mask)
        # h[:, i] sees x_0 .. x_{i-1}: editing x_j leaves h[:, :j+1] exactly as it was ...
        torch.testing.assert_close(out[:, : j + 1], ref[:, : j + 1], rtol=0, atol=1e-6)
        # ... and moves every later position.
        if j < n - 1:
            assert (out[:, j + 1 :] - ref[:, j + 1 :]).abs().amax(-1).min() > 1e-5


def test_first_position_sees_only_the_start_token_and_text(setup, make_text):
    model, x, text, text_mask = setup
    ref = model(x, text, text_mask)[:, 0]
    torch.testing.assert_close(
        model(torch.randn_like(x), text, text_mask)[:, 0], ref, rtol=0, atol=1e-6
    )
    other_text, other_mask = make_text([4, 1, 2], 4, x.shape[-1], seed=5)
    assert (model(x, other_text, other_mask)[:, 0] - ref).abs().amax(-1).min() > 1e-5


def test_prefix_forward_equals_the_full_forward(setup):
    model, x, text, text_mask = setup
    full = model(x, text, text_mask)
    torch.testing.assert_close(model(x[:, :5], text, text_mask), full[:, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cached_decoding_equals_the_full_forward(qk_norm, make_text):
    torch.manual_seed(0)
    config = TransformerConfig(width=48, depth=3, num_heads=4, grid=(1, 10), qk_norm=qk_norm)
    model = CausalTransformer(config).eval()
    x = torch.randn(3, config.num_tokens, config.width)
    text, text_mask = make_text([5, 2, 3], 6, config.width)
    full = model(x, text, text_mask)
    stepped, cache = decode(model, x, text, text_mask)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)
    assert cache.length == config.num_tokens
    assert cache.position.tolist() == [config.num_tokens]
    # The cache holds every position's self-attention keys, none left unwritten.
    assert all(k.abs().amax(dim=(0, 1, 3)).min() > 0 for k in cache.keys)


def test_decoding_a_cfg_batch_and_a_broadcast_prompt(setup):
    model, x, text, text_mask = setup
    # One prompt, three samples: a batch-1 text is broadcast to the batch.
    stepped, _ = decode(model, x, text[:1], text_mask[:1], batch=3)
    full = model(x, text[:1].expand(3, -1, -1), text_mask[:1].expand(3, -1))
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)
    # CFG: cond and uncond rows decode together and match their separate forwards.
    null = torch.zeros_like(text_mask)
    null[:, 0] = True
    both_text, both_mask = torch.cat([text, text]), torch.cat([text_mask, null])
    stepped, _ = decode(model, torch.cat([x, x]), both_text, both_mask)
    torch.testing.assert_close(stepped[:3], model(x, text, text_mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(stepped[3:], model(x, text, null), rtol=0, atol=1e-5)


def test_step_graph_is_the_same_at_every_position(setup):
    model, x, text, text_mask = setup
    cache = model.init_cache(3, text, text_mask)
    model.step(None, cache)
    codes = set()
    for k in range(1, 4):

        def one_step(x_prev, position, *buffers, k=k):
            depth = len(buffers) // 2
            state = KVCache(
                text_kv=cache.text_kv,
                keys=list(buffers[:depth]),
                values=list(buffers[depth:]),
                position=position,
                length=k,
            )
            return model.step(x_prev, state)

        args = (x[:, k - 1 : k], cache.position + (k - 1), *cache.keys, *cache.values)
        codes.add(make_fx(one_step)(*args).code)
    assert len(codes) == 1
    (code,) = codes
    assert "_local_scalar_dense" not in code and "nonzero" not in code


def test_gradients_reach_the_start_token(setup):
    model, x, text, text_mask = setup
    model.train()
    model(x, text, text_mask)[:, 0].square().sum().backward()
    # Position 0 depends only on the start token among the inputs.
    assert model.start_token.grad.abs().sum() > 0
    assert torch.count_nonzero(model.pos_embed.grad[:, 1:]) == 0
    assert model.pos_embed.grad[:, 0].abs().sum() > 0


def test_step_rejects_misuse(setup, config):
    model, x, text, text_mask = setup
    cache = model.init_cache(3, text, text_mask)
    with pytest.raises(ValueError, match="first step takes x_prev=None"):
        model.step(x[:, :1], cache)
    model.step(None, cache)
    with pytest.raises(ValueError, match="x_prev is None only at the first step"):
        model.step(None, cache)
    with pytest.raises(ValueError, match=r"x_prev must be \[3, 1, 32\]"):
        model.step(x[:, :2], cache)
    for k in range(1, config.num_tokens):
        model.step(x[:, k - 1 : k], cache)
    with pytest.raises(ValueError, match="cache is full"):
        model.step(x[:, :1], cache)
    other = CausalTransformer(TransformerConfig(width=32, depth=3, num_heads=4, grid=(1, 8)))
    with pytest.raises(ValueError, match="use this model's init_cache"):
        other.step(None, model.init_cache(3, text, text_mask))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model.step(None, {})
    with pytest.raises(ValueError, match="batch must be a positive int"):
        model.init_cache(0, text, text_mask)
    with pytest.raises(ValueError, match=r"text must be \[2 or 1, L, D\]"):
        model.init_cache(2, text, text_mask)
    with pytest.raises(ValueError, match=r"x must be \[B, N, 32\] with 1 <= N <= 8"):
        model(torch.randn(3, 9, 32), text, text_mask)
