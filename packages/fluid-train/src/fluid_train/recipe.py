"""The training recipe: one typed config for a run, the optimizer with its parameter groups and
the learning-rate schedule (DESIGN.md §6).

Defaults are the paper's: AdamW β=(0.9, 0.95), weight decay 0.02 (none on biases, norms, 1-D
parameters or the DiffLoss MLP, as the MAR code), a 65K-step linear warmup to a constant 1e-4
(absolute, not scaled by the batch), EMA 0.9999 every step, batch 2048, 1M steps, bf16 autocast
on accelerators. Gradient clipping is at a global norm of 3.0, the MAR code's ``grad_clip``; the
paper says it clips but not at what.

The configs themselves (``TrainConfig`` and its children) are in ``fluid_train.config``. Every
field can be set from a JSON or TOML file (``TrainConfig.from_file``) whose nesting follows the
dataclasses (``[optim] lr = 3e-4``), and then from command-line flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# The recipe's configs live in the torch-free ``fluid_train.config``; importable from here too.
from .config import (
    DataConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    load_config_file,
    merge,
)

__all__ = [
    "DataConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_optimizer",
    "load_config_file",
    "merge",
    "learning_rate",
    "param_groups",
    "prime_optimizer",
]

# ---------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and everything the recipe exempts from decay.

    Exempt: biases, norm weights and every other parameter with fewer than 2 dimensions (this
    covers the 1-D parts of embeddings), and whatever a submodule lists in its
    ``no_weight_decay()`` (the DiffLoss head lists its whole MLP, as MAR). Each group carries
    ``names`` (wrapper prefixes such as FSDPv2's ``_orig_module.`` removed) for inspection.
    """
    exempt: set[str] = set()
    for module_name, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            prefix = clean_name(module_name)
            exempt |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)
        if param.ndim < 2 or name.endswith(".bias") or name in exempt:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def clean_name(name: str) -> str:
    """Parameter name without wrapper segments (FSDPv2 ``_orig_module``, checkpoint wrappers)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


_WRAPPER_SEGMENTS = frozenset(
    {"_orig_module", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
)


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, *, lr: Tensor, capturable: bool
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` whose learning rate is the shared 0-d tensor ``lr``.

    A tensor learning rate lets the schedule run inside the compiled step (no host scalar that
    would change the graph). ``capturable`` keeps Adam's step counts on the device (required on
    xla/cuda for a sync-free step; not supported on CPU).
    """
    groups = param_groups(model, config.weight_decay)
    for group in groups:
        group["lr"] = lr  # one tensor shared by all groups: the schedule writes it once
    return torch.optim.AdamW(
        groups,
        lr=config.lr,  # only the default; every group holds the tensor
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        capturable=capturable,
        foreach=False,
    )


@torch.no_grad()
def prime_optimizer(
    optimizer: torch.optim.Optimizer, *, zeros_like: Callable[[Tensor], Tensor] = torch.zeros_like
) -> None:
    """Create AdamW's state (zero moments, step 0) before the first step, leaving the weights
    bit-for-bit unchanged.

    Without it the first step also allocates the state and traces a different graph from every
    later step: one more full-step compilation on xla. It runs one AdamW update with zero
    gradients, weight decay off and lr 1 (a no-op on the weights: the moments stay zero), then
    resets the step counts. ``zeros_like`` makes the gradients (on xla: sharded like their
    parameter, so the moments are too). Also what resuming needs before an in-place load.
    """
    saved_decay = [group["weight_decay"] for group in optimizer.param_groups]
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    saved_grads = []
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
        if isinstance(group["lr"], Tensor):
            group["lr"] = torch.ones_like(group["lr"])
        else:
            group["lr"] = 1.0
        for param in group["params"]:
            saved_grads.append(param.grad)
            param.grad = zeros_like(param)
    try:
        optimizer.step()
    finally:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for group, decay, lr in zip(optimizer.param_groups, saved_decay, saved_lr, strict=True):
            group["weight_decay"] = decay
            group["lr"] = lr
        for param, grad in zip(params, saved_grads, strict=True):
            param.grad = grad
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, Tensor):
            step.zero_()


def learning_rate(step: Tensor, *, lr: float, schedule: ScheduleConfig, total_steps: int) -> Tensor:
    """Learning rate for the update made at 0-based ``step`` (a 0-d tensor) -> 0-d float tensor.

    Warmup: lr·(step+1)/warmup for step < warmup (never 0, so the first update moves the
    weights); then constant, or cosine/linear decay to ``min_lr_ratio·lr`` at ``total_steps``.
    Pure tensor arithmetic on ``step``'s device, so it is part of the compiled step.
    """
    s = step.to(torch.float32) + 1.0
    warmup = float(max(schedule.warmup_steps, 1))
    factor = torch.clamp(s / warmup, max=1.0)
    if schedule.decay != "constant":
        span = float(max(total_steps - schedule.warmup_steps, 1))
        progress = torch.clamp((s - schedule.warmup_steps) / span, min=0.0, max=1.0)
        if schedule.decay == "cosine":
            shape = 0.5 * (1.0 + torch.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        floor = schedule.min_lr_ratio
        factor = factor * (floor + (1.0 - floor) * shape)
    return lr * factor
