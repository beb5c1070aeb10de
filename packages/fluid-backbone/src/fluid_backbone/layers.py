"""Pieces shared by the two trunks: the config, the transformer block and the text keys/values.

One block is pre-norm self-attention -> pre-norm cross-attention to the text -> pre-norm MLP,
each with a residual. Attention runs through ``F.scaled_dot_product_attention``. Every linear
layer has a bias (as in nanoGPT with ``bias=True`` and in MAR's timm blocks, ``qkv_bias=True``),
and weights are initialised as in MAR: xavier-uniform linears, zero biases, unit LayerNorms.

The cross-attention keys and values depend only on the text, so a trunk computes them for every
layer once (:class:`TextKV`) and reuses them across generation steps. All shapes are fixed by the
inputs' shapes: masks enter attention as tensors, never through boolean indexing, so a training
or decoding step compiles to one graph under XLA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import TransformerConfig

SelfAttentionKind = Literal["bidirectional", "causal"]


def sincos_2d(rows: int, columns: int, dim: int) -> Tensor:
    """MAE's 2-D sine-cosine position table [rows * columns, dim] (row-major positions): half
    the channels encode the column, half the row, each as sin and cos at dim/4 frequencies
    from 1 down to 1/10000."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4; got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(columns, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for coord in (x, y):
        angles = coord.reshape(-1, 1) * omega[None]  # [R*C, dim/4]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()  # [R*C, dim]


@dataclass(kw_only=True, slots=True)
class TextKV:
    """Cross-attention keys and values of every layer, computed once from the text.

    A row whose text has no real token gets no cross-attention at all (its cross-attention
    output is zero) instead of attending to padding or producing NaN.
    """

    keys: tuple[Tensor, ...]  # one per layer, [B, H, L, hd]
    values: tuple[Tensor, ...]  # one per layer, [B, H, L, hd]
    attn_mask: Tensor  # [B, 1, 1, L] bool, True = attend (all True on rows without text)
    has_text: Tensor  # [B, 1, 1] bool, False on rows whose text mask is all False

    @property
    def batch_size(self) -> int:
        return self.attn_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attn_mask.shape[-1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @classmethod
    def cat(cls, parts: Sequence[TextKV]) -> TextKV:
        """Concatenate along the batch, e.g. ``TextKV.cat([cond, uncond])`` for CFG."""
        if not parts:
            raise ValueError("TextKV.cat needs at least one TextKV; got none")
        first = parts[0]
        for i, part in enumerate(parts):
            if part.num_layers != first.num_layers or part.length != first.length:
                raise ValueError(
                    f"TextKV.cat: part {i} has {part.num_layers} layers and text length "
                    f"{part.length}; part 0 has {first.num_layers} layers and length {first.length}"
                )
        return cls(
            keys=tuple(torch.cat(ks, dim=0) for ks in zip(*(p.keys for p in parts), strict=True)),
            values=tuple(
                torch.cat(vs, dim=0) for vs in zip(*(p.values for p in parts), strict=True)
            ),
            attn_mask=torch.cat([p.attn_mask for p in parts], dim=0),
            has_text=torch.cat([p.has_text for p in parts], dim=0),
        )

    def expand(self, batch: int) -> TextKV:
        """Broadcast a batch-1 TextKV to ``batch`` rows without copying (one prompt, many samples)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"TextKV.expand: can only expand batch 1 to {batch}; got batch {self.batch_size}"
            )
        return TextKV(
            keys=tuple(k.expand(batch, -1, -1, -1) for k in self.keys),
            values=tuple(v.expand(batch, -1, -1, -1) for v in self.values),
            attn_mask=self.attn_mask.expand(batch, -1, -1, -1),
            has_text=self.has_text.expand(batch, -1, -1),
        )


def _head_norm(config: TransformerConfig) -> nn.Module:
    return nn.LayerNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention over the image tokens, bidirectional or causal."""

    def __init__(self, config: TransformerConfig, *, kind: SelfAttentionKind) -> None:
        super().__init__()
        if kind not in ("bidirectional", "causal"):
            raise ValueError(
                f"self-attention kind must be 'bidirectional' or 'causal'; got {kind!r}"
            )
        self.num_heads = config.num_heads
        self.is_causal = kind == "causal"
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.q_norm = _head_norm(config)
        self.k_norm = _head_norm(config)
        self.proj = nn.Linear(config.width, config.width)
        self.proj_drop = nn.Dropout(config.dropout)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        return self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]  # each [B, H, N, hd]

    def _out(self, attn: Tensor) -> Tensor:
        return self.proj_drop(self.proj(rearrange(attn, "b h n d -> b n (h d)")))  # [B, N, D]

    def forward(self, x: Tensor) -> Tensor:  # x [B, N, D]
        q, k, v = self._qkv(x)
        attn = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.is_causal
        )  # [B, H, N, hd]
        return self._out(attn)

    def step(
        self, x: Tensor, cache_k: Tensor, cache_v: Tensor, position: Tensor, visible: Tensor
    ) -> Tensor:
        """One decoding position: x [B, 1, D]; writes its K/V into the [B, H, N, hd] caches in place.

        ``position`` is a [1] int64 tensor and ``visible`` a [1, 1, 1, N] bool mask of the filled
        slots, so every step has the same shapes and the same graph.
        """
        q, k, v = self._qkv(x)  # each [B, H, 1, hd]
        cache_k.index_copy_(2, position, k.to(cache_k.dtype))
        cache_v.index_copy_(2, position, v.to(cache_v.dtype))
        attn = F.scaled_dot_product_attention(
            q, cache_k, cache_v, attn_mask=visible
        )  # [B, H, 1, hd]
        return self._out(attn)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the text states (keys/values) under the padding mask."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.q = nn.Linear(config.width, config.width)
        self.kv = nn.Linear(config.width, 2 * config.width)
        self.q_norm = _head_norm(config)
        self.k_norm = _head_norm(config)
        self.proj = nn.Linear(config.width, config.width)
        self.proj_drop = nn.Dropout(config.dropout)

    def text_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:  # text [B, L, D]
        kv = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        return self.k_norm(kv[0]), kv[1]  # each [B, H, L, hd]

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, has_text: Tensor
    ) -> Tensor:
        q = self.q_norm(
            rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        )  # [B, H, N, hd]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, N, hd]
        out = self.proj_drop(self.proj(rearrange(attn, "b h n d -> b n (h d)")))  # [B, N, D]
        return out * has_text  # rows without any real text token get no cross-attention


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm self-attention -> cross-attention to text -> MLP, each with a residual.

    ``forward`` takes plain tensors only, so the block can be wrapped from outside
    (activation checkpointing, FSDPv2) without knowing about :class:`TextKV`.
    """

    def __init__(self, config: TransformerConfig, *, self_attention: SelfAttentionKind) -> None:
        super().__init__()
        eps = config.norm_eps
        self.norm1 = nn.LayerNorm(config.width, eps=eps)
        self.attn = SelfAttention(config, kind=self_attention)
        self.norm2 = nn.LayerNorm(config.width, eps=eps)
        self.cross_attn = CrossAttention(config)
        self.norm3 = nn.LayerNorm(config.width, eps=eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, text_k: Tensor, text_v: Tensor, text_attn_mask: Tensor, has_text: Tensor
    ) -> Tensor:  # x [B, N, D] -> [B, N, D]
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), text_k, text_v, text_attn_mask, has_text)
        return x + self.mlp(self.norm3(x))

    def step(
        self,
        x: Tensor,
        cache_k: Tensor,
        cache_v: Tensor,
        position: Tensor,
        visible: Tensor,
        text_k: Tensor,
        text_v: Tensor,
        text_attn_mask: Tensor,
        has_text: Tensor,
    ) -> Tensor:  # x [B, 1, D] -> [B, 1, D]
        x = x + self.attn.step(self.norm1(x), cache_k, cache_v, position, visible)
        x = x + self.cross_attn(self.norm2(x), text_k, text_v, text_attn_mask, has_text)
        return x + self.mlp(self.norm3(x))


def init_weights(module: nn.Module) -> None:
    """MAR's initialisation: xavier-uniform linears with zero bias, LayerNorm weight 1 bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Trunk(nn.Module):
    """What both trunks share: the blocks, learned positions, final norm and the text K/V."""

    def __init__(self, config: TransformerConfig, *, self_attention: SelfAttentionKind) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig; got {type(config).__name__}")
        self.config = config
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.width))  # [1, N, D]
        self.blocks = nn.ModuleList(
            Block(config, self_attention=self_attention) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)

    def _init_parameters(self, token: nn.Parameter) -> None:
        if self.config.pos_init == "sincos":
            rows, columns = self.config.grid
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(rows, columns, self.config.width)[None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as MAR (default bounds +-2)
        nn.init.normal_(token, std=0.02)  # mask or start token, as MAR's mask token
        self.apply(init_weights)

    def text_kv(self, text: Tensor, text_mask: Tensor) -> TextKV:
        """Every layer's cross-attention K/V from text [B, L, D] and its mask [B, L] (True = real)."""
        d = self.config.width
        if text.ndim != 3 or text.shape[-1] != d or text.shape[1] < 1:
            raise ValueError(f"text must be [B, L, {d}] with L >= 1; got {list(text.shape)}")
        if text_mask.dtype != torch.bool or tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"text_mask must be a bool [B, L] = {list(text.shape[:2])} tensor (True = real "
                f"token); got {text_mask.dtype} {list(text_mask.shape)}"
            )
        has_text = text_mask.any(dim=-1)  # [B]
        attn_mask = (text_mask | ~has_text[:, None])[:, None, None, :]  # [B, 1, 1, L]
        keys, values = zip(*(block.cross_attn.text_kv(text) for block in self.blocks), strict=True)
        return TextKV(
            keys=keys, values=values, attn_mask=attn_mask, has_text=has_text[:, None, None]
        )

    def _resolve_text_kv(
        self, batch: int, text: Tensor | None, text_mask: Tensor | None, text_kv: TextKV | None
    ) -> TextKV:
        if text_kv is None:
            if text is None or text_mask is None:
                raise ValueError("pass text and text_mask, or a precomputed text_kv")
            text_kv = self.text_kv(text, text_mask)
        elif not isinstance(text_kv, TextKV):
            raise TypeError(f"text_kv must be a TextKV; got {type(text_kv).__name__}")
        cfg = self.config
        k = text_kv.keys[0] if text_kv.keys else None
        if (
            text_kv.num_layers != cfg.depth
            or k is None
            or k.shape[1] != cfg.num_heads
            or k.shape[-1] != cfg.head_dim
        ):
            got = "no layers" if k is None else f"{text_kv.num_layers} layers of {list(k.shape)}"
            raise ValueError(
                f"text_kv must hold {cfg.depth} layers of [B, {cfg.num_heads}, L, {cfg.head_dim}] "
                f"(from this model's text_kv); got {got}"
            )
        if text_kv.batch_size != batch:
            raise ValueError(
                f"text_kv has batch {text_kv.batch_size}; the image tokens have batch {batch}"
            )
        return text_kv

    def _check_tokens(self, x: Tensor, *, exact_length: bool) -> tuple[int, int]:
        """Validate image tokens x [B, N, D]; N must equal num_tokens or (causal) not exceed it."""
        d, n = self.config.width, self.config.num_tokens
        ok = x.ndim == 3 and x.shape[-1] == d
        ok = ok and (x.shape[1] == n if exact_length else 1 <= x.shape[1] <= n)
        if not ok:
            want = f"[B, {n}, {d}]" if exact_length else f"[B, N, {d}] with 1 <= N <= {n}"
            raise ValueError(f"x must be {want}; got {list(x.shape)}")
        return x.shape[0], x.shape[1]

    def _run_blocks(self, h: Tensor, text_kv: TextKV) -> Tensor:  # h [B, N, D]
        for block, k, v in zip(self.blocks, text_kv.keys, text_kv.values, strict=True):
            h = block(h, k, v, text_kv.attn_mask, text_kv.has_text)
        return self.norm(h)  # [B, N, D]
