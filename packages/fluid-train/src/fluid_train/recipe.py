"""The training recipe: one typed config for a run, the optimizer with its parameter groups and
the learning-rate schedule (DESIGN.md §6).

Defaults are the paper's: AdamW β=(0.9, 0.95), weight decay 0.02 (none on biases, norms, 1-D
parameters or the DiffLoss MLP, as the MAR code), a 65K-step linear warmup to a constant 1e-4
(absolute, not scaled by the batch), EMA 0.9999 every step, batch 2048, 1M steps, bf16 autocast
on accelerators. Gradient clipping is at a global norm of 3.0, the MAR code's ``grad_clip``; the
paper says it clips but not at what.

Every field can be set from a JSON or TOML file (``TrainConfig.from_file``) whose nesting
follows the dataclasses (``[optim] lr = 3e-4``), and then from command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_optimizer",
    "learning_rate",
    "param_groups",
    "prime_optimizer",
]

Backend = Literal["auto", "eager", "xla", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW and gradient clipping."""

    lr: float = 1e-4  # peak learning rate, absolute (not batch-scaled)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.02
    grad_clip: float | None = 3.0  # max global grad norm (MAR's value); None = no clipping

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON/TOML give lists
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a finite number > 0; got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1); got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or None; got {self.grad_clip}")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Linear warmup from lr/warmup to lr, then ``decay`` (the paper: constant)."""

    warmup_steps: int = 65_000
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0; got {self.warmup_steps}")
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(
                f"schedule.decay must be 'constant', 'cosine' or 'linear'; got {self.decay!r}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training data comes from and how it is read (see fluid_train.data)."""

    shards: list[str] = field(default_factory=list)  # paths, globs, {a..b} patterns, URLs
    kind: Literal["auto", "images", "encoded"] = "auto"  # raw img2dataset or `fluid preprocess`
    shuffle_buffer: int = 1000  # samples; 0 = read in shard order
    num_workers: int = 0  # decoding processes (0 = in the training process)
    text_length: int | None = None  # T5 padding length for image shards (None: encoder max)
    # Encoded shards up to this many MiB per host (their bytes in the tar) are kept in memory,
    # decoded, after their first epoch (0: every epoch reads the shards again).
    memory_mb: float = 0

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if self.shuffle_buffer < 0 or self.num_workers < 0 or self.memory_mb < 0:
            raise ValueError(
                "data.shuffle_buffer, data.num_workers and data.memory_mb must be >= 0; "
                f"got {self.shuffle_buffer}, {self.num_workers} and {self.memory_mb}"
            )


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Device layout on the xla (SPMD) and fsdp (FSDP2) backends (see fluid_train.parallelize)."""

    # xla: slices on the `data` axis (None = slice count); fsdp: HSDP replicate groups, the
    # first axis of a (replicate, shard) mesh (None = the node count; 1 = plain FSDP).
    dcn_data_parallelism: int | None = None
    activation_checkpointing: Literal["none", "block"] = "none"
    compile: bool = False  # fsdp: torch.compile each transformer block
    dist_timeout_s: float = 600.0  # fsdp: process-group timeout (a rank waiting on a lost peer)

    def __post_init__(self) -> None:
        if self.dcn_data_parallelism is not None and self.dcn_data_parallelism < 1:
            raise ValueError(
                f"parallel.dcn_data_parallelism must be >= 1; got {self.dcn_data_parallelism}"
            )
        if not self.dist_timeout_s > 0:
            raise ValueError(f"parallel.dist_timeout_s must be > 0; got {self.dist_timeout_s}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one training run needs. ``fluid_train.trainer.train(config)`` runs it."""

    out: str  # run directory: metrics.jsonl, checkpoints/, pipeline/
    preset: str = "debug"
    model: dict[str, Any] = field(default_factory=dict)  # overrides for get_preset(preset, ...)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str | None = None  # saved tokenizer dir: needed for image shards and export
    text_encoder: str | None = None  # saved T5 dir: needed for image shards and export
    steps: int = 1_000_000
    batch_size: int = 2048  # global batch (all devices, all hosts) of one forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step (a step sees grad_accum x batch_size)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema_decay: float = 0.9999
    precision: Precision = "auto"  # auto: bf16 autocast on accelerators, fp32 on CPU
    backend: Backend = "auto"  # auto: xla on a TPU host, fsdp under torchrun (>1 rank), else eager
    device: str | None = None  # eager: "cpu", "cuda", "cuda:1"; None = cuda if available
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    resume: bool = False
    export: bool = True  # write RUN/pipeline/ from the EMA weights at the end
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {self.precision!r}")
        if self.backend not in ("auto", "eager", "xla", "fsdp"):
            raise ValueError(
                f"backend must be 'auto', 'eager', 'xla' or 'fsdp'; got {self.backend!r}"
            )

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from nested plain values; unknown keys are an error naming the key."""
        return _build(cls, values, prefix="")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a ``.json`` or ``.toml`` file; ``overrides`` (nested dicts merge) win."""
        values = merge(load_config_file(path), overrides)
        return cls.from_dict(values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            return tomllib.load(f)
    if path.suffix == ".json":
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object; got {type(values)}")
        return values
    raise ValueError(f"config file {path} must end in .json or .toml")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``overrides`` win; nested dicts merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, values: dict[str, Any], *, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix or '<root>'} must be a table; got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"expected some of {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, prefix=f"{prefix}{name}.")
        elif _is_float(hint) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # TOML/JSON write 1 for 1.0
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"config section {prefix or '<root>'}: {error}") from error


def _is_float(hint: Any) -> bool:
    if hint is float:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return float in typing.get_args(hint)
    return False


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
