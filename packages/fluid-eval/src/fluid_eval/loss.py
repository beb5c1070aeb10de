"""Validation loss: the training objective, averaged over a held-out set.

The objective of these models is stochastic (a random mask ratio and order per image, random
diffusion timesteps per token), so the average is taken under a fixed seed inside a forked RNG:
two calls on the same model and data agree, and the caller's random stream is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LossValue = Tensor | float | tuple[Tensor | float, Tensor | float]


@dataclass(frozen=True, slots=True)
class ValidationLoss:
    mean: float  # weighted mean of the batch losses
    std_error: float  # standard error of that mean across batches (nan with one batch)
    num_batches: int
    total_weight: float  # sum of batch weights (e.g. images or masked tokens)


def _scalar(value: Tensor | float, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar; got a tensor of shape {list(value.shape)}")
        return float(value.detach().float().cpu())
    return float(value)


@torch.no_grad()
def validation_loss(
    loss_fn: Callable[[Any], LossValue],
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    seed: int | None = 0,
) -> ValidationLoss:
    """Mean of ``loss_fn(batch)`` over ``batches`` (at most ``max_batches``), without gradients.

    ``loss_fn`` returns the batch's mean loss (weight 1 per batch), or ``(mean_loss, weight)``
    to weight batches by their size. ``seed`` fixes torch's random stream for the whole pass
    (``None``: use the current stream). A non-finite loss raises, naming the batch.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None; got {max_batches}")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    losses: list[float] = []
    weights: list[float] = []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            out = loss_fn(batch)
            loss, weight = out if isinstance(out, tuple) else (out, 1.0)
            value, w = (
                _scalar(loss, f"loss of batch {index}"),
                _scalar(weight, f"weight of batch {index}"),
            )
            if not math.isfinite(value):
                raise ValueError(f"validation batch {index} gave a non-finite loss ({value})")
            if not w > 0:
                raise ValueError(f"validation batch {index} has weight {w}; weights must be > 0")
            losses.append(value)
            weights.append(w)
    if not losses:
        raise ValueError("no validation batches: the held-out set is empty")
    total = sum(weights)
    mean = sum(v * w for v, w in zip(losses, weights, strict=True)) / total
    n = len(losses)
    if n > 1:
        # Weighted variance of batch losses, scaled to the effective number of batches.
        var = sum(w * (v - mean) ** 2 for v, w in zip(losses, weights, strict=True)) / total
        n_eff = total**2 / sum(w * w for w in weights)
        std_error = math.sqrt(var * n_eff / (n_eff - 1) / n_eff) if n_eff > 1 else float("nan")
    else:
        std_error = float("nan")
    return ValidationLoss(mean=mean, std_error=std_error, num_batches=n, total_weight=total)
