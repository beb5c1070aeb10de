"""The heads' settings: plain dataclasses, importable without torch.

The token and condition widths are not settings of a head: they belong to the model the head
sits in (its tokenizer and its trunk) and are passed when the head is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DiffLossConfig"]


@dataclass(kw_only=True, slots=True)
class DiffLossConfig:
    """The DiffLoss head (MAR numerics, DESIGN.md §4); ``DiffLossHead.from_config`` builds one."""

    depth: int = 3  # residual adaLN blocks = 2 * depth linear layers (the paper: 6)
    width: int | None = None  # MLP width; None = the condition (trunk) width, as the paper
    train_steps: int = 1000
    sample_steps: int = 100  # respaced ancestral steps (IDDPM rule)
    diffusion_batch_mul: int = 4  # each token's (target, z) repeated with independent t
    # Sampling clamp of the predicted x0: None = the head's running max |target| seen in
    # training; float("inf") = no clamp.
    x0_bound: float | None = None
    # Auxiliary loss: a linear readout of z regressed onto the token (MSE), added with this
    # weight. 0 = the paper's objective (and no readout is built).
    regression_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depth", "train_steps", "sample_steps", "diffusion_batch_mul"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiffLossConfig.{name} must be a positive int; got {value!r}")
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise ValueError(f"DiffLossConfig.width must be a positive int or None; got {self.width!r}")
        if self.x0_bound is not None and not self.x0_bound > 0:
            raise ValueError(
                f"DiffLossConfig.x0_bound must be > 0, float('inf') or None; got {self.x0_bound!r}"
            )
        if not (math.isfinite(self.regression_weight) and self.regression_weight >= 0):
            raise ValueError(
                f"DiffLossConfig.regression_weight must be a finite number >= 0; "
                f"got {self.regression_weight!r}"
            )
        self.regression_weight = float(self.regression_weight)
        if self.sample_steps > self.train_steps:
            raise ValueError(
                f"DiffLossConfig.sample_steps ({self.sample_steps}) must be <= "
                f"train_steps ({self.train_steps})"
            )
