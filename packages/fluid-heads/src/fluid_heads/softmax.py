"""The softmax head for discrete tokens: input embedding tied to the output projection.

One ``nn.Embedding(vocab_size, width)`` serves both sides: it embeds the codebook ids and,
transposed, gives the logits ``h @ E^T + b``. There is no mask id: the masked (random-order)
trunk puts its own learned mask token at hidden positions, whatever id they hold.

Size (V = vocab_size, W = width): V·W embedding + V output bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SoftmaxHead", "TokenSample"]


@dataclass(frozen=True, slots=True)
class TokenSample:
    """Sampled ids ``[M]`` int64 and their log-probability ``[M]`` float32 under the
    (guided) model distribution at temperature 1 without top-k truncation -- the confidence
    MaskGIT's ordering ranks tokens by."""

    ids: Tensor
    logprob: Tensor


class SoftmaxHead(nn.Module):
    """Tied softmax head: ``embed``, ``logits``, ``loss``, ``sample``.

    Args:
        vocab_size: codebook size V (8192 for the paper's VQ).
        width: trunk width W.
    """

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("width", width)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.vocab_size = vocab_size
        self.width = width
        self.embedding = nn.Embedding(vocab_size, width)  # [V, W], tied with the logits
        self.output_bias = nn.Parameter(torch.empty(vocab_size))  # [V]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding N(0, 0.02²) (BERT / MaskGIT), zero bias; call after ``to_empty``."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.zeros_(self.output_bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this head) to exclude from weight decay: the output
        bias. The tied embedding matrix is decayed like any embedding."""
        return {"output_bias"}

    # ------------------------------------------------------------------ verbs

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids ``[B, N]`` in ``[0, vocab_size]`` (mask id included) -> ``[B, N, W]``."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an int64 tensor of token ids; got dtype {ids.dtype}")
        return self.embedding(ids)

    def logits(self, h: Tensor) -> Tensor:
        """Trunk outputs ``[..., W]`` -> logits ``[..., V]`` over the codebook (no mask id)."""
        if h.shape[-1] != self.width:
            raise ValueError(f"h must be [..., {self.width}]; got {list(h.shape)}")
        weight = self.embedding.weight  # [V, W], the tied matrix
        return F.linear(h.to(weight.dtype), weight, self.output_bias)

    def loss(self, target: Tensor, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mask-weighted mean cross-entropy.

        Args:
            target: ids ``[M]`` in ``[0, vocab_size)`` (any leading shape is flattened).
            h: trunk outputs ``[M, W]`` with the same leading shape.
            mask: ``[M]`` bool/float weights (True/1 = the token counts), or None for all.
        """
        if target.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"target must be integer token ids; got dtype {target.dtype}")
        if h.shape[:-1] != target.shape or h.shape[-1] != self.width:
            raise ValueError(
                f"h must be [{', '.join(map(str, target.shape))}, {self.width}] to match target "
                f"{list(target.shape)}; got {list(h.shape)}"
            )
        if mask is not None and mask.shape != target.shape:
            raise ValueError(
                f"mask must be {list(target.shape)} to match target; got {list(mask.shape)}"
            )
        logits = self.logits(h.reshape(-1, self.width)).float()  # [M, V]
        per_token = F.cross_entropy(logits, target.reshape(-1).long(), reduction="none")  # [M]
        if mask is None:
            return per_token.mean()
        weights = mask.reshape(-1).float()  # [M]
        return (per_token * weights).sum() / weights.sum().clamp_min(1e-6)

    @torch.no_grad()
    def sample(
        self,
        h: Tensor,
        temperature: float = 1.0,
        cfg: float | Tensor = 1.0,
        *,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample one id per row: ``h [M, W]`` -> ``[M]`` int64 (see ``sample_with_logprob``)."""
        return self.sample_with_logprob(h, temperature, cfg, top_k=top_k, generator=generator).ids

    @torch.no_grad()
    def sample_with_logprob(
        self,
        h: Tensor,
        temperature: float = 1.0,
        cfg: float | Tensor = 1.0,
        *,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSample:
        """Sample ids with temperature, optional top-k and classifier-free guidance.

        For ``cfg != 1`` the caller stacks ``h = [h_cond; h_uncond]`` and gets ``[ids; ids]``:
        the guided logits are ``l_u + cfg·(l_c − l_u)``. ``temperature = 0`` is greedy.
        A tensor ``cfg`` (0-d, on h's device) is always the guided path and is never read on
        the host, so a lazy-tensor device sees the scale as data, never as a constant.
        Sampling is Gumbel-max (fixed shapes on any device); ``generator`` must live on h's
        device.
        """
        if h.ndim != 2 or h.shape[1] != self.width:
            raise ValueError(f"h must be [M, {self.width}]; got {list(h.shape)}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0; got {temperature}")
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= self.vocab_size):
            raise ValueError(
                f"top_k must be None or an int in [1, {self.vocab_size}]; got {top_k!r}"
            )
        logits = self.logits(h).float()  # [M, V]
        guided = isinstance(cfg, Tensor) or cfg != 1.0
        if guided:
            if h.shape[0] % 2:
                raise ValueError(
                    f"with cfg != 1, h must stack [h_cond; h_uncond] (an even number of rows); "
                    f"got {h.shape[0]}"
                )
            cond, uncond = logits.chunk(2)  # [R, V] each
            logits = uncond + cfg * (cond - uncond)
        logprobs = logits.log_softmax(dim=-1)  # [R, V]

        scores = logits
        if top_k is not None and top_k < self.vocab_size:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [R, 1]
            scores = logits.masked_fill(logits < kth, -math.inf)
        if temperature > 0:
            u = torch.rand(scores.shape, generator=generator, device=scores.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
            scores = scores / temperature + gumbel
        ids = scores.argmax(dim=-1)  # [R]
        logprob = logprobs.gather(1, ids[:, None]).squeeze(1)  # [R]
        if guided:
            ids, logprob = torch.cat([ids, ids]), torch.cat([logprob, logprob])
        return TokenSample(ids=ids, logprob=logprob)
