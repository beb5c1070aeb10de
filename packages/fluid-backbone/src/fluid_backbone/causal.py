"""The causal (GPT-like) trunk of the raster-order variants, with a KV cache for generation.

Training is teacher-forced: the trunk shifts its input right by one behind a learned start
token, so ``h[:, i]`` sees tokens 0..i-1 and predicts token i. Generation runs one position per
:meth:`CausalTransformer.step`; the text keys/values are computed once in
:meth:`CausalTransformer.init_cache`, and the self-attention keys/values live in preallocated
[B, H, N, hd] buffers. The position being written is a tensor and attention always spans the
whole buffer under a "filled so far" mask, so every step after the first has identical shapes
and compiles to a single graph under XLA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import TextKV, TransformerConfig, Trunk


@dataclass(kw_only=True, slots=True)
class KVCache:
    """Decoding state of a :class:`CausalTransformer` for one batch of prompts."""

    text_kv: TextKV  # cross-attention K/V of every layer, computed once
    keys: list[Tensor]  # one per layer, [B, H, N, hd], self-attention keys written step by step
    values: list[Tensor]  # one per layer, [B, H, N, hd]
    position: Tensor  # [1] int64, the slot the next step writes (a tensor: the graph never changes)
    length: int = 0  # positions written so far, kept on the host for validation only

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class CausalTransformer(Trunk):
    """Causal transformer over [B, N, D] embedded tokens with a learned start token."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config, self_attention="causal")
        self.start_token = nn.Parameter(torch.zeros(1, 1, config.width))  # [1, 1, D]
        self._init_parameters(self.start_token)

    def forward(
        self,
        x: Tensor,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        text_kv: TextKV | None = None,
    ) -> Tensor:
        """Teacher-forced pass: x [B, N, D] embedded targets -> h [B, N, D], h[:, i] predicts x_i.

        The input sequence is [start, x_0 .. x_{N-2}]; the last token is never an input.
        N may be shorter than ``config.num_tokens`` (a prefix). Text as in
        :meth:`MaskedTransformer.forward`: ``text`` + ``text_mask``, or ``text_kv``.
        """
        batch, n = self._check_tokens(x, exact_length=False)
        text_kv = self._resolve_text_kv(batch, text, text_mask, text_kv)
        start = self.start_token.to(x.dtype).expand(batch, 1, -1)  # [B, 1, D]
        h = torch.cat([start, x[:, : n - 1]], dim=1)  # [B, N, D]
        h = h + self.pos_embed[:, :n]  # [B, N, D]
        return self._run_blocks(h, text_kv)

    @torch.no_grad()
    def init_cache(self, batch: int, text: Tensor, text_mask: Tensor) -> KVCache:
        """Start decoding ``batch`` sequences: text [B or 1, L, D], text_mask [B or 1, L] bool.

        The text K/V of every layer is computed here, once (a batch-1 text is broadcast to
        ``batch`` rows without copying); the self-attention buffers are zero [B, H, N, hd].
        For CFG, pass the concatenated [cond; uncond] text and twice the batch.
        """
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int; got {batch!r}")
        if text.ndim != 3 or text.shape[0] not in (1, batch):
            raise ValueError(
                f"text must be [{batch} or 1, L, D] for batch {batch}; got {list(text.shape)}"
            )
        text_kv = self.text_kv(text, text_mask).expand(batch)
        cfg = self.config
        ref = text_kv.keys[0]  # its dtype follows any autocast region the caller decodes under
        shape = (batch, cfg.num_heads, cfg.num_tokens, cfg.head_dim)  # [B, H, N, hd]
        return KVCache(
            text_kv=text_kv,
            keys=[torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.blocks],
            values=[torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.blocks],
            position=torch.zeros(1, dtype=torch.long, device=ref.device),
        )

    @torch.no_grad()
    def step(self, x_prev: Tensor | None, cache: KVCache) -> Tensor:
        """Process the next position: x_prev [B, 1, D] embedded previous token -> h [B, 1, D].

        Decoding is inference only: it runs without autograd and writes the cache in place.

        Pass ``x_prev=None`` at the first step (the input is the start token). After k steps,
        the returned h equals ``forward(x)[:, k - 1 : k]`` and predicts token k - 1.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from init_cache; got {type(cache).__name__}")
        cfg = self.config
        batch, n = cache.batch_size, cache.capacity
        if len(cache.keys) != cfg.depth or n != cfg.num_tokens:
            raise ValueError(
                f"cache has {len(cache.keys)} layers of {n} positions; this model has "
                f"{cfg.depth} layers of {cfg.num_tokens} (use this model's init_cache)"
            )
        if cache.length >= n:
            raise ValueError(f"cache is full: all {n} positions have been generated")
        if x_prev is None:
            if cache.length != 0:
                raise ValueError(
                    f"x_prev is None only at the first step; step {cache.length} needs the "
                    f"embedded previous token [B, 1, {cfg.width}]"
                )
            h = self.start_token.expand(batch, 1, -1)  # [B, 1, D]
        else:
            if cache.length == 0:
                raise ValueError("the first step takes x_prev=None (its input is the start token)")
            if tuple(x_prev.shape) != (batch, 1, cfg.width):
                raise ValueError(
                    f"x_prev must be [{batch}, 1, {cfg.width}]; got {list(x_prev.shape)}"
                )
            h = x_prev
        position = cache.position  # [1] int64
        h = h + self.pos_embed.index_select(1, position)  # [B, 1, D]
        slots = torch.arange(n, device=position.device)  # [N]
        visible = (slots <= position).view(1, 1, 1, n)  # [1, 1, 1, N] the filled slots
        kv = cache.text_kv
        for i, block in enumerate(self.blocks):
            h = block.step(
                h,
                cache.keys[i],
                cache.values[i],
                position,
                visible,
                kv.keys[i],
                kv.values[i],
                kv.attn_mask,
                kv.has_text,
            )  # [B, 1, D]
        cache.position = position + 1
        cache.length += 1
        return self.norm(h)  # [B, 1, D]
