"""Mask-ratio sampling for training and the cosine reveal schedule for generation.

Both follow MaskGIT/MAR (DESIGN.md §4). Training masks are built with fixed shapes — a sort of
uniform noise and a compare against a per-image count — so a training step never depends on
the data for its shapes and compiles once under XLA. Generation schedules are host-side
integers: every image of a batch reveals the same number of tokens at a step, which is what
lets generation gather the revealed rows into a regular ``[B, k]`` block.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

CfgSchedule = Literal["linear", "constant"]


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def sample_mask_ratio(
    batch: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-image mask ratios cos(π/2 · r), r ~ U[0, 1) -> [B] float in (0, 1]."""
    _check_positive_int("batch", batch)
    r = torch.rand(batch, device=device, generator=generator)  # [B]
    return torch.cos(0.5 * math.pi * r)


def random_order(
    batch: int,
    num_tokens: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A uniformly random permutation of the N positions per image -> [B, N] int64."""
    _check_positive_int("batch", batch)
    _check_positive_int("num_tokens", num_tokens)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)  # [B, N]
    return noise.argsort(dim=1)


def mask_by_order(order: Tensor, num_masked: Tensor | int) -> Tensor:
    """Mask the first ``num_masked`` positions of each image's order -> [B, N] bool (True = masked).

    ``order`` [B, N] is a permutation per row; ``num_masked`` is an int or a [B] tensor.
    Built with a scatter of a rank comparison, so shapes never depend on the counts.
    """
    if order.ndim != 2:
        raise ValueError(f"order must be [B, N] int64; got {list(order.shape)}")
    batch, n = order.shape
    ranks = torch.arange(n, device=order.device).expand(batch, n)  # [B, N]
    if isinstance(num_masked, Tensor):
        if tuple(num_masked.shape) != (batch,):
            raise ValueError(
                f"num_masked must be an int or a [{batch}] tensor; got {list(num_masked.shape)}"
            )
        masked_rank = ranks < num_masked[:, None]  # [B, N], by rank in the order
    else:
        masked_rank = ranks < int(num_masked)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=order.device)
    return mask.scatter(1, order, masked_rank)  # [B, N], by position


def training_mask(
    batch: int,
    num_tokens: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The random-order training mask -> [B, N] bool, True = masked (to be predicted).

    Per image: ratio = cos(π/2 · r) with r ~ U[0, 1) (MaskGIT), ``ceil(N · ratio)`` tokens
    masked (MAR rounds up; at least one, at most N), chosen by a random permutation.
    """
    ratio = sample_mask_ratio(batch, device=device, generator=generator)  # [B]
    count = torch.ceil(num_tokens * ratio).clamp(1, num_tokens).long()  # [B]
    order = random_order(batch, num_tokens, device=device, generator=generator)  # [B, N]
    return mask_by_order(order, count)


def reveal_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """How many tokens stay masked after each of ``num_steps`` steps (MAR's cosine schedule).

    After step k (0-based), ``floor(N · cos(π/2 · (k+1)/K))`` stay masked, clamped to at least
    1 and at most (masked before the step) − 1, so every step reveals at least one token; the
    last step reveals everything left. Needs 1 <= K <= N.
    """
    _check_positive_int("num_tokens", num_tokens)
    _check_positive_int("num_steps", num_steps)
    if num_steps > num_tokens:
        raise ValueError(
            f"num_steps must be at most the number of tokens ({num_tokens}) so that every step "
            f"reveals a token; got {num_steps}"
        )
    masked, schedule = num_tokens, []
    for k in range(num_steps):
        if k == num_steps - 1:
            masked = 0
        else:
            target = math.floor(num_tokens * math.cos(0.5 * math.pi * (k + 1) / num_steps))
            masked = max(1, min(masked - 1, target))
        schedule.append(masked)
    return schedule


def cfg_scale(cfg: float, schedule: CfgSchedule, *, num_tokens: int, masked_after: int) -> float:
    """Guidance scale at a step: ``linear`` ramps 1 -> s as tokens are revealed, ``constant`` = s.

    linear: 1 + (s − 1) · (N − masked_after) / N, where ``masked_after`` counts the tokens
    still masked after this step (MAR's schedule).
    """
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (num_tokens - masked_after) / num_tokens
    if schedule == "constant":
        return float(cfg)
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant'; got {schedule!r}")


def gumbel_noise(shape: tuple[int, ...], *, device, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise −log(−log u), u ~ U(0, 1), clamped away from 0 and 1."""
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))
