from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fluid_heads import SoftmaxHead, TokenSample


def _head(vocab: int = 7, width: int = 5, seed: int = 0) -> SoftmaxHead:
    torch.manual_seed(seed)
    head = SoftmaxHead(vocab, width)
    with torch.no_grad():  # larger than the 0.02 init so that logits are far from uniform
        head.embedding.weight.normal_(0, 1.0)
        head.output_bias.normal_(0, 0.5)
    return head


def test_one_tied_weight_tensor():
    head = SoftmaxHead(11, 6)
    params = dict(head.named_parameters())
    assert set(params) == {"embedding.weight", "output_bias"}
    # one row per code, no mask id: the masked trunk has its own mask token
    assert params["embedding.weight"].shape == (11, 6)
    assert params["output_bias"].shape == (11,)
    # the output projection is the input embedding itself, not a copy
    h = torch.randn(3, 6, requires_grad=False)
    logits = head.logits(h)
    (grad,) = torch.autograd.grad(logits.sum(), head.embedding.weight)
    assert torch.count_nonzero(grad.abs().sum(1)) == 11
    with torch.no_grad():
        head.embedding.weight[4].add_(1.0)
    torch.testing.assert_close(head.logits(h)[:, 4], logits[:, 4].detach() + h.sum(1))


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        head = SoftmaxHead(8192, 32)
    assert sum(p.numel() for p in head.parameters()) == 8192 * 32 + 8192  # tied matrix + bias
    head.to_empty(device="cpu")
    head.reset_parameters()
    assert head.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(head.output_bias) == 0


def test_embed_and_logits_formula():
    head = _head()
    ids = torch.tensor([[0, 6, 3]])
    torch.testing.assert_close(head.embed(ids), head.embedding.weight[ids])
    h = torch.randn(4, 5)
    expected = h @ head.embedding.weight.T + head.output_bias
    torch.testing.assert_close(head.logits(h), expected)
    assert head.logits(torch.randn(2, 3, 5)).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="ids must be an int64"):
        head.embed(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"h must be \[\.\.\., 5\]"):
        head.logits(torch.randn(4, 6))


def test_only_the_output_bias_escapes_weight_decay():
    assert SoftmaxHead(9, 4).no_weight_decay() == {"output_bias"}


def test_loss_is_masked_cross_entropy():
    head = _head()
    h = torch.randn(2, 6, 5, requires_grad=True)
    target = torch.randint(0, 7, (2, 6))
    mask = torch.rand(2, 6) < 0.5
    mask[0, 0] = True
    loss = head.loss(target, h, mask)
    expected = F.cross_entropy(head.logits(h[mask]), target[mask])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        head.loss(target, h), F.cross_entropy(head.logits(h).flatten(0, 1), target.flatten())
    )
    (grad,) = torch.autograd.grad(loss, h)
    assert torch.count_nonzero(grad[~mask]) == 0
    assert torch.all(grad[mask].abs().sum(-1) > 0)
    assert head.loss(target, h, torch.zeros(2, 6)).item() == 0.0


def test_loss_rejects_bad_inputs():
    head = _head()
    with pytest.raises(ValueError, match="target must be integer"):
        head.loss(torch.zeros(4), torch.randn(4, 5))
    with pytest.raises(ValueError, match="h must be"):
        head.loss(torch.zeros(4, dtype=torch.int64), torch.randn(3, 5))
    with pytest.raises(ValueError, match="mask must be"):
        head.loss(torch.zeros(4, dtype=torch.int64), torch.randn(4, 5), torch.ones(3))


def test_loss_compiles_as_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    head = _head()
    counter = CompileCounter()
    compiled = torch.compile(head.loss, backend=counter, fullgraph=True)
    for _ in range(3):
        target = torch.randint(0, 7, (10,))
        loss = compiled(target, torch.randn(10, 5), torch.rand(10) < 0.5)
        assert torch.isfinite(loss)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_sampling_follows_the_tempered_softmax():
    head = _head()
    h = torch.randn(1, 5).expand(20000, 5)  # one distribution, many draws
    logits = head.logits(h[:1])[0]
    for temperature in (1.0, 0.7):
        ids = head.sample(h, temperature, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(ids, minlength=7).float() / ids.numel()
        torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.015, rtol=0)
    greedy = head.sample(h[:3], temperature=0.0)
    assert torch.equal(greedy, logits.argmax().repeat(3))


def test_top_k_restricts_and_renormalises():
    head = _head()
    h = torch.randn(1, 5).expand(20000, 5)
    logits = head.logits(h[:1])[0]
    top2 = logits.topk(2).indices
    ids = head.sample(h, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(ids.unique().tolist()) == set(top2.tolist())
    share = (ids == top2[0]).float().mean().item()
    assert share == pytest.approx(logits[top2].softmax(-1)[0].item(), abs=0.015)
    assert torch.equal(head.sample(h[:4], temperature=5.0, top_k=1), logits.argmax().repeat(4))


def test_cfg_on_logits_and_equal_halves():
    head = _head()
    h_c, h_u = torch.randn(3, 5), torch.randn(3, 5)
    scale = 3.0
    guided = head.logits(h_u) + scale * (head.logits(h_c) - head.logits(h_u))
    out = head.sample_with_logprob(torch.cat([h_c, h_u]), temperature=0.0, cfg=scale)
    assert isinstance(out, TokenSample)
    assert torch.equal(out.ids, torch.cat([guided.argmax(-1)] * 2))
    expected_lp = guided.log_softmax(-1).gather(1, guided.argmax(-1, keepdim=True))[:, 0]
    torch.testing.assert_close(out.logprob, torch.cat([expected_lp] * 2))
    drawn = head.sample(
        torch.cat([h_c, h_u]), cfg=scale, generator=torch.Generator().manual_seed(0)
    )
    assert drawn.shape == (6,) and torch.equal(drawn[:3], drawn[3:])
    with pytest.raises(ValueError, match="even number of rows"):
        head.sample(torch.randn(3, 5), cfg=2.0)


def test_logprob_and_determinism():
    head = _head()
    h = torch.randn(8, 5)
    a = head.sample_with_logprob(h, generator=torch.Generator().manual_seed(5))
    b = head.sample_with_logprob(h, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids, b.ids) and a.ids.dtype == torch.int64
    expected = head.logits(h).log_softmax(-1).gather(1, a.ids[:, None])[:, 0]
    torch.testing.assert_close(a.logprob, expected)
    assert torch.all(a.ids < head.vocab_size)  # never the mask id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 8}, "top_k"),
    ],
)
def test_sample_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _head().sample(torch.randn(2, 5), **kwargs)
