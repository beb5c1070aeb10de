"""Generation: the reveal schedule, CFG, seeds, caches and MaskGIT ordering."""

from __future__ import annotations

import math

import pytest
import torch

from fluid_train.masking import cfg_scale, reveal_schedule


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def model(variant, tiny_model):
    """The tiny model (perturbed weights) of each of the four variants."""
    return tiny_model(*variant)


@pytest.mark.parametrize(("n", "k"), [(256, 64), (64, 64), (64, 16), (16, 4), (5, 5), (1, 1)])
def test_reveal_schedule_follows_the_cosine_and_reveals_every_token_once(n, k):
    schedule = reveal_schedule(n, k)
    before = [n, *schedule[:-1]]
    revealed = [b - a for b, a in zip(before, schedule, strict=True)]
    assert len(schedule) == k and schedule[-1] == 0
    assert min(revealed) >= 1 and sum(revealed) == n
    for step, (masked, prev) in enumerate(zip(schedule[:-1], before[:-1], strict=True)):
        cosine = math.floor(n * math.cos(math.pi / 2 * (step + 1) / k))
        assert masked == max(1, min(prev - 1, cosine))
    if (n, k) == (256, 64):  # the paper's setting: 255 masked after step 0, then the cosine
        assert schedule[:3] == [255, 254, 253] and schedule[31] == math.floor(
            256 * math.cos(math.pi / 4)
        )


def test_reveal_schedule_rejects_more_steps_than_tokens():
    with pytest.raises(ValueError, match="num_steps must be at most the number of tokens"):
        reveal_schedule(16, 17)


def test_cfg_scale_schedules():
    assert cfg_scale(3.0, "constant", num_tokens=256, masked_after=200) == 3.0
    assert cfg_scale(3.0, "linear", num_tokens=256, masked_after=256) == 1.0
    assert cfg_scale(3.0, "linear", num_tokens=256, masked_after=0) == 3.0
    assert cfg_scale(3.0, "linear", num_tokens=256, masked_after=192) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale(3.0, "cosine", num_tokens=4, masked_after=0)


def test_generation_returns_tokens_of_the_right_shape(model, tiny_text):
    hidden, mask = tiny_text(3)
    out = model.generate(hidden, mask, generator=_seeded(0))
    if model.config.tokens == "discrete":
        assert out.shape == (3, 16) and out.dtype == torch.int64
        assert 0 <= out.min() and out.max() < model.config.vocab_size
    else:
        assert out.shape == (3, 16, 4) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and (out.abs().sum(-1) > 0).all()  # every token written


class _Recorder:
    """Spies on trunk calls (mask per step) and head.sample calls (rows, cfg)."""

    def __init__(self, model):
        self.masks, self.samples = [], []
        if model.config.order == "random":
            model.trunk.register_forward_pre_hook(
                lambda m, args: self.masks.append(args[1].clone())
            )
        sample = model.head.sample

        def spy(z, temperature=1.0, cfg=1.0, **kwargs):
            self.samples.append((z.shape[0], cfg))
            return sample(z, temperature, cfg, **kwargs)

        model.head.sample = spy


@pytest.mark.parametrize("tokens", ["discrete", "continuous"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_random_order_reveals_each_token_once_and_only_revealed_rows_hit_the_head(
    tokens, cfg, tiny_model, tiny_text
):
    model = tiny_model(tokens, "random")
    rec = _Recorder(model)
    batch, n, k = 2, 16, 5
    out = model.generate(
        *tiny_text(batch), num_steps=k, cfg=cfg, cfg_schedule="linear", generator=_seeded(0)
    )
    schedule = reveal_schedule(n, k)
    before = [n, *schedule[:-1]]
    assert len(rec.masks) == k
    guided = cfg != 1.0
    for step, mask in enumerate(rec.masks):
        cond = mask[:batch]  # [B, N] mask the trunk saw at this step
        if guided:
            assert torch.equal(mask[batch:], cond)  # the uncond half sees the same tokens
        assert (cond.sum(dim=1) == before[step]).all()
        if step:
            assert not (cond & ~rec.masks[step - 1][:batch]).any()  # revealed tokens stay revealed
        rows, scale = rec.samples[step]
        revealed = before[step] - schedule[step]
        assert rows == batch * revealed * (2 if guided else 1)
        assert scale == pytest.approx(1 + (cfg - 1) * (n - schedule[step]) / n if guided else 1.0)
    assert sum(r for r, _ in rec.samples) == batch * n * (2 if guided else 1)
    assert out.shape[:2] == (batch, n)


def test_cfg_one_equals_conditional_only_sampling(model, tiny_text):
    """With scale 1 the null text has no effect; with scale 3 it does."""
    hidden, mask = tiny_text(2)

    def run(cfg):
        return model.generate(hidden, mask, cfg=cfg, cfg_schedule="constant", generator=_seeded(1))

    a1, a3 = run(1.0), run(3.0)
    with torch.no_grad():
        model.text_aligner.null_token.add_(5.0 * torch.randn_like(model.text_aligner.null_token))
    b1, b3 = run(1.0), run(3.0)
    assert torch.equal(a1, b1)
    assert not torch.equal(a3, b3)


def test_same_seed_same_tokens(model, tiny_text):
    hidden, mask = tiny_text(2)
    a = model.generate(hidden, mask, generator=_seeded(7))
    b = model.generate(hidden, mask, generator=_seeded(7))
    c = model.generate(hidden, mask, generator=_seeded(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_caches_change_nothing(model, tiny_text):
    """Random order: text K/V reused vs recomputed per step. Raster: KV cache vs full forwards."""
    hidden, mask = tiny_text(2)
    cached = model.generate(hidden, mask, cfg=2.5, generator=_seeded(3), cache="on")
    full = model.generate(hidden, mask, cfg=2.5, generator=_seeded(3), cache="off")
    if model.config.tokens == "discrete":
        assert torch.equal(cached, full)
    else:
        # Float rounding differs between the cached and full attention paths; the first
        # respaced DiffLoss step amplifies it (about 300x), hence the tolerance.
        torch.testing.assert_close(cached, full, rtol=1e-3, atol=1e-3)


class _CallCounter:
    def __init__(self, obj, name):
        self.count, original = 0, getattr(obj, name)

        def wrapped(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        setattr(obj, name, wrapped)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_text_states_and_kv_are_computed_once_per_batch(model, cache, tiny_text):
    text_kv = _CallCounter(model.trunk, "text_kv")
    aligner = _CallCounter(model.text_aligner, "forward")
    null = _CallCounter(model.text_aligner, "null_text")
    model.generate(*tiny_text(2), num_steps=4, cfg=3.0, cache=cache)
    steps = 4 if model.config.order == "random" else model.config.num_tokens
    expected = 1 if cache == "on" else steps  # "off" recomputes them at every step
    assert aligner.count == expected and null.count == expected
    assert text_kv.count == expected


def test_maskgit_confidence_ordering(tiny_model, tiny_text):
    model = tiny_model("discrete", "random")
    rec = _Recorder(model)
    confidences = []
    sample_with_logprob = model.head.sample_with_logprob

    def spy(h, *args, **kwargs):
        out = sample_with_logprob(h, *args, **kwargs)
        confidences.append(out.logprob[: h.shape[0] // 2])  # cond half: [B * still masked]
        return out

    model.head.sample_with_logprob = spy
    options = {"num_steps": 4, "cfg": 2.0, "order_policy": "confidence"}
    out = model.generate(*tiny_text(2), choice_temperature=0.0, generator=_seeded(0), **options)
    assert out.shape == (2, 16) and out.max() < model.config.vocab_size
    schedule = reveal_schedule(16, 4)
    masks = [m[:2] for m in rec.masks] + [torch.zeros(2, 16, dtype=torch.bool)]
    for step in range(4):
        before, after = masks[step], masks[step + 1]
        assert (before.sum(dim=1) == [16, *schedule][step]).all()
        assert not (after & ~before).any()  # revealed tokens are never re-masked
        # Without the Gumbel term, each step reveals the most confident of the masked tokens.
        revealed, kept = before & ~after, after
        # Only the masked rows went through the head, in ascending position order.
        assert confidences[step].numel() == before.sum()
        conf = torch.full((2, 16), float("-inf"))
        conf[before] = confidences[step]
        for b in range(2):
            if kept[b].any():
                assert conf[b][revealed[b]].min() >= conf[b][kept[b]].max()
    again = model.generate(*tiny_text(2), choice_temperature=0.0, generator=_seeded(0), **options)
    assert torch.equal(out, again)
    noisy = model.generate(*tiny_text(2), choice_temperature=4.5, generator=_seeded(0), **options)
    assert noisy.shape == out.shape


def test_top_k_one_is_greedy(tiny_model, tiny_text):
    model = tiny_model("discrete", "raster")
    a = model.generate(*tiny_text(2), top_k=1, generator=_seeded(0))
    b = model.generate(*tiny_text(2), top_k=1, generator=_seeded(1))
    assert torch.equal(a, b)


def test_generation_rejects_bad_options(tiny_model, tiny_text):
    continuous = tiny_model("continuous", "random")
    hidden, mask = tiny_text(2)
    with pytest.raises(ValueError, match="order_policy='confidence'"):
        continuous.generate(hidden, mask, order_policy="confidence")
    with pytest.raises(ValueError, match="top_k applies to discrete"):
        continuous.generate(hidden, mask, top_k=5)
    with pytest.raises(ValueError, match="num_steps must be at most"):
        continuous.generate(hidden, mask, num_steps=17)
    with pytest.raises(ValueError, match=r"text_hidden must be \[B, L, 16\]"):
        continuous.generate(hidden[..., :8], mask)
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        continuous.generate(hidden, mask, cfg=0.5)
    with pytest.raises(ValueError, match="cache must be"):
        continuous.generate(hidden, mask, cache="maybe")


def test_one_options_object_reaches_every_layer(tiny_model, tiny_text, tiny_pipeline):
    """A GenerationConfig passed down gives what its fields given by keyword give; the model's
    own config.generation is the default; unknown names are refused, named."""
    from fluid_train.config import GenerationConfig
    from fluid_train.generation import resolve_options

    model = tiny_model("continuous", "random")
    hidden, mask = tiny_text(2)
    options = GenerationConfig(num_steps=2, cfg=1.5, temperature=0.7)
    by_object = model.generate(hidden, mask, options, generator=torch.Generator().manual_seed(3))
    by_keywords = model.generate(
        hidden, mask, num_steps=2, cfg=1.5, temperature=0.7,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert torch.equal(by_object, by_keywords)
    assert resolve_options(model) is model.config.generation
    assert resolve_options(model, options, cfg=2.0).cfg == 2.0 and options.cfg == 1.5
    with pytest.raises(TypeError, match="unknown generation option.*'cfg_scale'"):
        resolve_options(model, cfg_scale=2.0)
    # Overrides are type-checked as config files and flags are (a bool is not a number).
    with pytest.raises(ValueError, match="cfg must be a number; got True"):
        resolve_options(model, cfg=True)
    assert resolve_options(model, num_steps=3).num_steps == 3
    pipe = tiny_pipeline("continuous", "random")
    images = pipe(["a red circle"], options, seed=0)
    again = pipe(["a red circle"], seed=0, num_steps=2, cfg=1.5, temperature=0.7)
    assert images[0].tobytes() == again[0].tobytes()
    assert pipe.sampler(options, seed=0).options == options
