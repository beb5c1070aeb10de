"""Sampling image tokens from a FluidModel: random order (MAR/MaskGIT) and raster (KV cache).

Random order (DESIGN.md §4): K steps; after step k, ``reveal_schedule`` says how many tokens
stay masked; a random permutation per image says which. Each step runs the trunk over all N
positions and sends only the rows revealed at that step through the head. Raster: one token
per step through the causal trunk's KV cache.

The text work is done once per prompt batch: the aligned text (and, with CFG, the null text)
and every layer's cross-attention keys/values are computed before the first step and reused
(``cache="off"`` recomputes them at every step — and, for raster, replaces the KV cache by full
forwards — only to measure what the caches save and to test that they change nothing).

Classifier-free guidance stacks [cond; uncond] along the batch: the trunk sees 2B rows, the
heads take the stacked rows and return the guided sample twice (MAR's convention).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from fluid_heads import TokenSample
from fluid_text import TextStates

from . import generation_xla
from .generation_xla import is_xla, progress_steps
from .masking import cfg_scale, gumbel_noise, random_order, reveal_schedule

if TYPE_CHECKING:
    from fluid_backbone.causal import KVCache
    from fluid_backbone.layers import TextKV

    from .model import FluidModel, GenerationConfig

CacheMode = Literal["on", "off"]


def resolve_options(
    model: FluidModel, options: GenerationConfig | None = None, **overrides: Any
) -> GenerationConfig:
    """``options`` (default: the model's ``config.generation``) with the non-None ``overrides``
    applied: the one options object every layer passes on (validated; unknown names raise)."""
    from .config import GenerationConfig, replace_given

    base = model.config.generation if options is None else options
    if not isinstance(base, GenerationConfig):
        raise TypeError(f"options must be a GenerationConfig; got {type(base).__name__}")
    return replace_given(base, overrides, what="generation option")


def _prepare_text(model: FluidModel, hidden: Tensor, mask: Tensor, *, guided: bool) -> TextStates:
    """Aligned text [B, L, D] (cond), or [2B, L, D] = [cond; null] when guided."""
    cond = model.align_text(hidden, mask)
    if not guided:
        return cond
    null = model.text_aligner.null_text(cond.batch_size, cond.length)
    return TextStates(
        hidden=torch.cat([cond.hidden, null.hidden.to(cond.hidden.dtype)], dim=0),  # [2B, L, D]
        mask=torch.cat([cond.mask, null.mask], dim=0),  # [2B, L]
    )


def _sample_head(
    model: FluidModel, start: _Start, z: Tensor, scale: float, *, with_logprob: bool = False
) -> Any:
    """Head sampling of M rows: z [2M, D] ([cond; uncond]) when guided, else [M, D] -> M tokens
    (the start's options and generator).

    ``with_logprob`` (discrete only) returns the head's TokenSample (ids [M], logprob [M]).
    """
    guided, options, generator = start.guided, start.options, start.generator
    m = z.shape[0] // 2 if guided else z.shape[0]
    if guided and scale == 1.0:  # guidance 1 is the conditional model alone
        z, guided = z[:m], False
    kwargs: dict[str, Any] = {"temperature": options.temperature, "cfg": scale if guided else 1.0}
    if model.config.tokens == "discrete":
        kwargs["top_k"] = options.top_k
    if with_logprob:
        sample = model.head.sample_with_logprob(z, generator=generator, **kwargs)
        return TokenSample(ids=sample.ids[:m], logprob=sample.logprob[:m])
    out = model.head.sample(z, generator=generator, **kwargs)  # [M(*2), C] or [M(*2)]
    return out[:m]


def _placeholder(model: FluidModel, batch: int, device: torch.device) -> Tensor:
    """Tokens not generated yet: their content is never seen (masked, or in the causal future)."""
    cfg = model.config
    if cfg.tokens == "discrete":
        return torch.zeros(batch, cfg.num_tokens, dtype=torch.long, device=device)  # [B, N]
    dtype = model.trunk.pos_embed.dtype
    return torch.zeros(
        batch, cfg.num_tokens, cfg.token_dim, dtype=dtype, device=device
    )  # [B, N, C]


def _stack(x: Tensor, guided: bool) -> Tensor:
    return torch.cat([x, x], dim=0) if guided else x


def _check_text(model: FluidModel, hidden: Tensor, mask: Tensor) -> None:
    dt = model.config.text_dim
    if hidden.ndim != 3 or hidden.shape[-1] != dt or hidden.shape[0] < 1:
        raise ValueError(
            f"text_hidden must be [B, L, {dt}] (the T5 width); got {list(hidden.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"text_mask must be a bool [B, L] = {list(hidden.shape[:2])} tensor; "
            f"got {mask.dtype} {list(mask.shape)}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Start:
    """What every generation loop starts from (either order, eager or XLA)."""

    tokens: Tensor  # [B, N] or [B, N, C]: the placeholder the loop fills
    # The text work done once (cache="on"): every layer's cross-attention K/V (random order)
    # or the KV cache holding them (raster). None with cache="off".
    text_kv: TextKV | None
    kv_cache: KVCache | None
    # The captions' states as given: what cache="off" recomputes the text work from each step.
    text_hidden: Tensor  # [B, L, D_t]
    text_mask: Tensor  # [B, L] bool
    cache: CacheMode
    options: GenerationConfig
    generator: torch.Generator | None
    progress: bool  # show a bar

    @property
    def batch(self) -> int:  # B
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:  # N
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def guided(self) -> bool:  # CFG: the trunk sees B' = 2B rows, [cond; uncond]
        return self.options.cfg != 1.0


def _start(
    model: FluidModel,
    text_hidden: Tensor,
    text_mask: Tensor,
    options: GenerationConfig,
    generator: torch.Generator | None = None,
    *,
    cache: CacheMode = "on",
    progress: bool = False,
) -> _Start:
    """The placeholder tokens and (cache="on") the text work, done once."""
    text_kv = kv_cache = None
    if cache == "on":
        text = _prepare_text(model, text_hidden, text_mask, guided=options.cfg != 1.0)  # [B', L, D]
        if model.config.order == "random":
            text_kv = model.trunk.text_kv(text.hidden, text.mask)
        else:
            kv_cache = model.trunk.init_cache(text.batch_size, text.hidden, text.mask)
    return _Start(
        tokens=_placeholder(model, text_hidden.shape[0], text_hidden.device),
        text_kv=text_kv,
        kv_cache=kv_cache,
        text_hidden=text_hidden,
        text_mask=text_mask,
        cache=cache,
        options=options,
        generator=generator,
        progress=progress,
    )


@torch.no_grad()
def generate(
    model: FluidModel,
    text_hidden: Tensor,
    text_mask: Tensor,
    options: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    cache: CacheMode = "on",
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """Sample image tokens for a batch of captions' T5 states.

    text_hidden [B, L, D_t], text_mask [B, L] bool -> tokens [B, N] int64 or [B, N, C] float.
    ``options`` (a ``GenerationConfig``; default the model's ``config.generation``) with any
    of its fields overridden by keyword (``num_steps=16, cfg=4.0``). ``generator`` (on the
    model's device; a CPU one on XLA) makes the result reproducible; ``progress`` shows a bar.
    """
    _check_text(model, text_hidden, text_mask)
    if cache not in ("on", "off"):
        raise ValueError(f"cache must be 'on' or 'off'; got {cache!r}")
    options = resolve_options(model, options, **overrides)
    config = model.config
    if options.order_policy == "confidence" and config.variant != "random-discrete":
        raise ValueError(
            f"order_policy='confidence' (MaskGIT) needs the random-discrete variant; this model is {config.variant}"
        )
    if options.top_k is not None and config.tokens == "continuous":
        raise ValueError("top_k applies to discrete tokens only; this model has continuous tokens")
    was_training = model.training
    model.eval()
    try:
        if is_xla(text_hidden.device):  # fixed-shape loops, a few graphs (generation_xla.py)
            if cache != "on":
                raise ValueError("cache='off' is an eager measurement mode; on XLA use 'on'")
            start = generation_xla.xla_start(
                model, text_hidden, text_mask, options, generator, progress=progress
            )
            random = generation_xla.generate_random_order
            raster = generation_xla.generate_raster
        else:
            start = _start(
                model, text_hidden, text_mask, options, generator, cache=cache, progress=progress
            )
            random, raster = _generate_random_order, _generate_raster
        run = random if config.order == "random" else raster
        return run(model, start)
    finally:
        model.train(was_training)


def _generate_random_order(model: FluidModel, start: _Start) -> Tensor:
    bsz, n, device, guided, tokens = (
        start.batch, start.num_tokens, start.device, start.guided, start.tokens
    )  # fmt: skip
    options, generator = start.options, start.generator
    schedule = reveal_schedule(n, options.num_steps)  # masked count after each step
    order = random_order(bsz, n, device=device, generator=generator)  # [B, N]
    mask = torch.ones(bsz, n, dtype=torch.bool, device=device)  # [B, N] True = still masked
    masked = n
    for step in progress_steps(len(schedule), start.progress):
        masked_after = schedule[step]
        x = _stack(model.head.embed(tokens), guided)  # [B', N, D]
        if start.cache == "on":
            h = model.trunk(x, _stack(mask, guided), text_kv=start.text_kv)  # [B', N, D]
        else:
            text = _prepare_text(model, start.text_hidden, start.text_mask, guided=guided)
            h = model.trunk(x, _stack(mask, guided), text.hidden, text.mask)  # [B', N, D]
        scale = cfg_scale(
            options.cfg, options.cfg_schedule, num_tokens=n, masked_after=masked_after
        )

        if options.order_policy == "confidence":
            counts = (masked, masked_after)
            tokens, mask = _confidence_step(model, start, h, tokens, mask, counts, step, scale)
        else:
            reveal = order[:, masked_after:masked]  # [B, k] positions revealed now
            tokens, mask = _reveal_step(model, start, h, tokens, mask, reveal, scale)
        masked = masked_after
    return tokens


def _reveal_step(
    model: FluidModel, start: _Start, h: Tensor, tokens: Tensor, mask: Tensor, reveal: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Sample the tokens at positions ``reveal`` [B, k]: only their rows of h go through the head."""
    bsz, k = reveal.shape
    index = _stack(reveal, start.guided)[..., None].expand(-1, -1, h.shape[-1])
    rows = h.gather(1, index)  # [B', k, D]
    sampled = _sample_head(model, start, rows.flatten(0, 1), scale)  # [B*k] or [B*k, C]
    sampled = sampled.reshape(bsz, k, *tokens.shape[2:]).to(tokens.dtype)  # [B, k(, C)]
    index = reveal if tokens.ndim == 2 else reveal[..., None].expand(-1, -1, tokens.shape[-1])
    return tokens.scatter(1, index, sampled), mask.scatter(1, reveal, False)


def _confidence_step(
    model: FluidModel, start: _Start, h: Tensor, tokens: Tensor, mask: Tensor,
    counts: tuple[int, int], step: int, scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """MaskGIT: sample every masked token, keep the ``masked_after`` least confident masked.

    Confidence = log p(sampled id) + τ · (1 − (k+1)/K) · Gumbel noise, with p the guided model
    distribution. ``counts`` = (masked before, masked after) this step; only the rows still
    masked go through the head.
    """
    masked, masked_after = counts
    bsz, options, generator = tokens.shape[0], start.options, start.generator
    # Positions still masked, ascending ([B, m]): a stable sort puts the masked ones first.
    pending = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :masked]
    index = _stack(pending, start.guided)[..., None].expand(-1, -1, h.shape[-1])
    rows = h.gather(1, index)  # [B', m, D]
    sample = _sample_head(
        model, start, rows.flatten(0, 1), scale, with_logprob=True
    )  # ids [B*m], logprob [B*m]
    anneal = options.choice_temperature * (1.0 - (step + 1) / options.num_steps)
    noise = gumbel_noise((bsz, masked), device=tokens.device, generator=generator)  # [B, m]
    confidence = sample.logprob.view(bsz, masked) + anneal * noise  # [B, m]
    # The masked_after least confident stay masked; the rest are revealed.
    revealed = confidence.argsort(dim=1)[:, masked_after:]  # [B, k] indices into pending
    positions = pending.gather(1, revealed)  # [B, k]
    ids = sample.ids.view(bsz, masked).gather(1, revealed)  # [B, k]
    return tokens.scatter(1, positions, ids), mask.scatter(1, positions, False)


def _generate_raster(model: FluidModel, start: _Start) -> Tensor:
    n, guided, tokens, options = start.num_tokens, start.guided, start.tokens, start.options
    x_prev = None
    for i in progress_steps(n, start.progress):
        if start.cache == "on":
            h = model.trunk.step(x_prev, start.kv_cache)[:, 0]  # [B', D]
        else:
            text = _prepare_text(model, start.text_hidden, start.text_mask, guided=guided)
            x = _stack(model.head.embed(tokens[:, : i + 1]), guided)  # [B', i+1, D]; token i unseen
            h = model.trunk(x, text.hidden, text.mask)[:, i]  # [B', D]
        scale = cfg_scale(options.cfg, options.cfg_schedule, num_tokens=n, masked_after=n - i - 1)
        token = _sample_head(model, start, h, scale).to(tokens.dtype)  # [B] or [B, C]
        tokens[:, i] = token
        x_prev = _stack(model.head.embed(token[:, None]), guided)  # [B', 1, D]
    return tokens
