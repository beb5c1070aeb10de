"""Text aligner: trainable bidirectional blocks that adapt frozen T5 states to the model width.

Fluid feeds T5 states through a linear projection to the image model's width and 6 trainable
transformer blocks before the backbone cross-attends to them. The aligner also owns the learned
null text that replaces a caption for classifier-free guidance (dropped with probability 0.1
during training, used as the unconditional branch when sampling).

Per block (pre-norm): x += Attn(LN(x)) with the padding mask on the keys; x += MLP(LN(x)).
No position embeddings: T5 states already carry position (relative attention bias).
Everything is fixed-shape (no boolean indexing, no ``.item()``), so it traces once under XLA.

    parameters = text_dim*W + W                       input projection
               + depth * (12 W^2 + 13 W) at ratio 4   blocks (qkv, proj, MLP, 2 LayerNorms)
               + 2W + W                               final LayerNorm, null token
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AlignerConfig
from .states import TextStates


class _SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        # x [B, L, W]; attn_mask [B, 1, 1, L] bool, True = key may be attended to
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, W/H]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, W/H]
        out = out.transpose(1, 2).reshape(batch, length, width)  # [B, L, W]
        return self.proj(out)


class _Block(nn.Module):
    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = _SelfAttention(config.width, config.num_heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.mlp_hidden, config.width),
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)  # [B, L, W]
        return x + self.mlp(self.norm2(x))


class TextAligner(nn.Module):
    """``[B, L, text_dim]`` text states + mask -> aligned ``TextStates(hidden [B, L, width])``.

    Padded positions have no influence on real ones (they are zeroed on input and masked as
    attention keys) and come out as zeros.
    """

    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        if not isinstance(config, AlignerConfig):
            raise TypeError(f"config must be an AlignerConfig; got {type(config).__name__}")
        self.config = config
        self.proj = nn.Linear(config.text_dim, config.width)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        # The unconditional text: one learned token at position 0, the rest padding.
        self.null_token = nn.Parameter(torch.empty(1, config.width))  # [1, W]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_token, std=0.02)

    def forward(self, hidden: Tensor, mask: Tensor, *, drop: Tensor | None = None) -> TextStates:
        """Align text states; rows with ``drop[b]`` True become the null text.

        Args:
            hidden: ``[B, L, text_dim]`` text states (any float dtype; cast to the aligner's).
            mask: ``[B, L]`` bool, True = real token.
            drop: optional ``[B]`` bool; dropped rows are replaced by ``null_text`` (hidden and
                mask), with fixed shapes (``torch.where``), for classifier-free guidance.
        """
        self._check_inputs(hidden, mask, drop)
        batch, length, _ = hidden.shape
        real = mask[..., None]  # [B, L, 1]
        # Zero padded inputs first: 0 * NaN in the attention product would still leak NaN.
        x = torch.where(real, hidden, 0.0).to(self.proj.weight.dtype)
        x = self.proj(x)  # [B, L, W]
        # A row without real tokens would softmax over nothing (NaN); let it attend everywhere
        # instead. Its outputs are zeroed below, and rows never attend across the batch.
        keys = mask | ~mask.any(dim=1, keepdim=True)  # [B, L]
        attn_mask = keys[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, attn_mask)
        x = torch.where(real, self.norm(x), 0.0)  # [B, L, W]
        if drop is None:
            return TextStates(hidden=x, mask=mask)
        null = self.null_text(batch, length)
        dropped = drop.to(mask.device)
        x = torch.where(dropped[:, None, None], null.hidden, x)  # [B, L, W]
        mask = torch.where(dropped[:, None], null.mask, mask)  # [B, L]
        return TextStates(hidden=x, mask=mask)

    def null_text(self, batch: int, length: int) -> TextStates:
        """The unconditional text: ``null_token`` at position 0, mask ``[True, False, ...]``."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch must be a non-negative int; got {batch!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"length must be a positive int (the null token needs one); got {length!r}"
            )
        first = torch.arange(length, device=self.null_token.device) == 0  # [L]
        hidden = torch.where(first[:, None], self.null_token, 0.0)  # [L, W]
        hidden = hidden[None].expand(batch, length, self.config.width).contiguous()  # [B, L, W]
        mask = first[None].expand(batch, length).contiguous()  # [B, L]
        return TextStates(hidden=hidden, mask=mask)

    def _check_inputs(self, hidden: Tensor, mask: Tensor, drop: Tensor | None) -> None:
        # Static checks only (shapes, dtypes): safe inside a traced step.
        text_dim = self.config.text_dim
        if hidden.ndim != 3 or hidden.shape[-1] != text_dim or not hidden.is_floating_point():
            raise ValueError(
                f"hidden must be a float [B, L, {text_dim}] tensor; "
                f"got {hidden.dtype} {list(hidden.shape)}"
            )
        if mask.dtype != torch.bool or mask.shape != hidden.shape[:2]:
            raise ValueError(
                f"mask must be a bool [B, L] = {list(hidden.shape[:2])} tensor; "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        if drop is not None and (drop.dtype != torch.bool or drop.shape != hidden.shape[:1]):
            raise ValueError(
                f"drop must be a bool [B] = [{hidden.shape[0]}] tensor; "
                f"got {drop.dtype} {list(drop.shape)}"
            )

    def extra_repr(self) -> str:
        c = self.config
        return f"text_dim={c.text_dim}, width={c.width}, depth={c.depth}, num_heads={c.num_heads}"
