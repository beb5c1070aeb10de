"""The size and layout of a trunk: a plain dataclass, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PosInit", "TransformerConfig"]

PosInit = Literal["normal", "sincos"]


@dataclass(kw_only=True, slots=True)
class TransformerConfig:
    """Size of a trunk and the grid of its image tokens.

    ``grid`` is the token grid (rows, columns) in raster order: N = rows x columns learned
    positions (a 1-D sequence of N tokens is ``(1, N)``). ``pos_init`` sets where the learned
    positions start: ``"normal"`` (MAR's truncated normal, std 0.02) or ``"sincos"`` (MAE's
    fixed 2-D sine-cosine table over the grid, at unit scale). At std 0.02 the positions are
    ~30x smaller than the token embeddings, and a short run never learns where a token is; the
    sin-cos start gives attention a notion of neighbourhood from the first step.
    """

    width: int
    depth: int
    num_heads: int
    grid: tuple[int, int]
    mlp_ratio: float = 4.0
    qk_norm: bool = False  # LayerNorm over each head's queries and keys (self and cross)
    dropout: float = 0.0  # attention probabilities, output projections and MLP
    norm_eps: float = 1e-6
    pos_init: PosInit = "normal"

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int; got {value!r}")
        grid = tuple(self.grid) if isinstance(self.grid, (list, tuple)) else self.grid
        if not (
            isinstance(grid, tuple)
            and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
        ):
            raise ValueError(
                f"TransformerConfig.grid must be (rows, columns) of positive ints; got {self.grid!r}"
            )
        self.grid = grid  # a JSON list becomes the tuple
        if self.width % self.num_heads:
            raise ValueError(
                f"TransformerConfig.width ({self.width}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(
                f"TransformerConfig.mlp_ratio must give an MLP width >= 1; got {self.mlp_ratio!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"TransformerConfig.norm_eps must be > 0; got {self.norm_eps!r}")
        if self.pos_init not in ("normal", "sincos"):
            raise ValueError(
                f"TransformerConfig.pos_init must be 'normal' or 'sincos'; got {self.pos_init!r}"
            )
        if self.pos_init == "sincos" and self.width % 4:
            raise ValueError(
                f"TransformerConfig.pos_init='sincos' needs a width divisible by 4; "
                f"got {self.width}"
            )

    @property
    def num_tokens(self) -> int:
        """N, the image tokens (learned positions): rows x columns of ``grid``."""
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)
