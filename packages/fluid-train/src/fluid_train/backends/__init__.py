"""Where a training step runs: ``eager`` (PyTorch on CPU or one CUDA device), ``xla``
(torch_xla SPMD on TPU or any PJRT device) or ``fsdp`` (torch.distributed FSDP2 under torchrun:
NCCL on GPUs, gloo on CPUs). The trainer owns the loop and the step function;
a backend owns devices, placement, compilation, host<->device traffic and checkpoint formats.

``torch_xla`` is imported only when the xla backend is built, so this package imports on any
machine.
"""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..data import HostBatch, TrainLoader
    from ..ema import EMA
    from ..encoders import FrozenEncoders
    from ..recipe import TrainConfig

__all__ = ["Backend", "CheckpointState", "resolve_backend", "build_backend", "xla_available"]

Encode = Callable[["HostBatch"], dict[str, Tensor]]


@dataclass(slots=True)
class CheckpointState:
    """What a checkpoint holds: device state (sharded on xla) and small host state."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    host: dict[str, Any]  # step, data position, skip counts, ... (plain values)


class Backend(ABC):
    """Interface the trainer drives; see ``EagerBackend`` and ``XlaBackend``."""

    name: str
    device: torch.device
    capturable: bool  # AdamW keeps its step count on the device (no host sync in the step)
    process_index: int = 0
    process_count: int = 1

    @property
    def is_writer(self) -> bool:
        """The one process that writes metrics, logs and shared files."""
        return self.process_index == 0

    @abstractmethod
    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        """The autocast dtype for ``precision`` (``auto``/``fp32``/``bf16``), None = fp32."""

    @property
    @abstractmethod
    def autocast_device_type(self) -> str: ...

    @abstractmethod
    def prepare_model(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """Move (and on xla shard) the model; optional activation checkpointing."""

    def build_model(self, build: Callable[[], nn.Module], config: TrainConfig) -> nn.Module:
        """``build()`` (seeded, on the CPU) then ``prepare_model``; fsdp builds on the meta
        device, shards, then fills each shard (the weights equal ``build()``'s)."""
        return self.prepare_model(build(), config)

    def place_ema(self, ema: EMA) -> None:
        """Give the EMA averages the placement of their parameters (sharding on xla)."""
        return None

    def grad_zeros(self, param: Tensor) -> Tensor:
        """A zero gradient for ``param`` (placed like it)."""
        return torch.zeros_like(param)

    def scalar(self, value: float | int, dtype: torch.dtype) -> Tensor:
        """A 0-d tensor on the device (enters compiled graphs as data, not a constant)."""
        return torch.tensor(value, dtype=dtype, device=self.device)

    @abstractmethod
    def device_batches(
        self, loader: TrainLoader, encode: Encode
    ) -> Iterator[tuple[HostBatch, dict[str, Tensor]]]:
        """(host batch, its training tensors on the device), in loader order."""

    # -------------------------------------------------------------- frozen encoders

    def place_encoders(self, encoders: FrozenEncoders) -> FrozenEncoders:
        """Put the frozen tokenizer and T5 where training on image shards runs them. Default:
        on the training device, as loaded (eager; a torch.distributed backend inherits it, so
        each rank encodes its own batch on its GPU). Overridden by xla (bf16, SPMD)."""
        return encoders.to(self.device)

    def encode_batch(self, encoders: FrozenEncoders, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Device batch of ``FrozenEncoders.host_inputs`` (images, text ids and mask) -> the
        training tensors, under no_grad, outside the training step."""
        return encoders.encode_inputs(batch)

    @abstractmethod
    def run_step(
        self, step_fn: Callable[..., Any], batch: dict[str, Tensor], closure: Callable | None
    ) -> Any:
        """Run one training step; ``closure(outputs)`` runs on the host once it has executed."""

    def compiles(self) -> int | None:
        """Graphs compiled so far (xla only)."""
        return None

    def barrier(self) -> None:
        """Wait for every process (multi-host only)."""
        return None

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any of them (a collective: every
        process must call it at the same point). One process: the flag itself."""
        return flag

    def mean_over_processes(self, value: Tensor) -> Tensor:
        """The mean of a 0-d tensor over processes (each holding its part of the batch)."""
        return value

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """Clip the gradients to a global norm of ``max_norm``; return the norm before it."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -------------------------------------------------------------- checkpoints

    @abstractmethod
    def save_checkpoint(self, directory: Path, state: CheckpointState) -> None: ...

    @abstractmethod
    def load_checkpoint(self, directory: Path, state: CheckpointState) -> dict[str, Any]:
        """Restore model, EMA and optimizer in place; return the host state."""

    # -------------------------------------------------------------- RNG

    def rng_state(self) -> dict[str, Any]:
        """Host RNG states (torch CPU, python, numpy); backends add their device's."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))

    def seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def xla_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch_xla") is not None
    except (ImportError, ValueError):
        return False


def _tpu_host() -> bool:
    return os.environ.get("PJRT_DEVICE", "").upper() == "TPU" or os.path.exists("/dev/accel0")


def _torchrun_world() -> int:
    """The rank count torchrun (or any launcher setting its variables) started; 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class TorchDeviceBackend(Backend):
    """What the backends on PyTorch's own devices share (eager, fsdp): autocast in bf16 on
    accelerators under ``auto``, the CUDA generator in the RNG state, batches copied to the
    device as the loader yields them, and the step run as plain Python."""

    @property
    def autocast_device_type(self) -> str:
        return self.device.type

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32" or (precision == "auto" and self.device.type == "cpu"):
            return None
        return torch.bfloat16

    def rng_state(self) -> dict[str, Any]:
        state = super().rng_state()
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        super().set_rng_state(state)
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def device_batches(
        self, loader: TrainLoader, encode: Encode
    ) -> Iterator[tuple[HostBatch, dict[str, Tensor]]]:
        for host_batch in loader:
            tensors = encode(host_batch)
            yield host_batch, {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}

    def run_step(
        self, step_fn: Callable[..., Any], batch: dict[str, Tensor], closure: Callable | None
    ) -> Any:
        # Eager execution: the closure may read the outputs at once (a CUDA read waits for them).
        out = step_fn(batch)
        if closure is not None:
            closure(out)
        return out


def resolve_backend(name: str) -> str:
    """``auto`` -> ``xla`` on a TPU host with torch_xla installed, ``fsdp`` under torchrun with
    more than one rank, else ``eager``."""
    if name == "auto":
        if xla_available() and _tpu_host():
            return "xla"
        return "fsdp" if _torchrun_world() > 1 else "eager"
    if name not in ("eager", "xla", "fsdp"):
        raise ValueError(f"backend must be 'auto', 'eager', 'xla' or 'fsdp'; got {name!r}")
    if name == "xla" and not xla_available():
        raise RuntimeError(
            "backend 'xla' needs torch_xla (pip install 'fluid-train[xla]'); it is not installed"
        )
    return name


def build_backend(config: TrainConfig) -> Backend:
    name = resolve_backend(config.backend)
    if name == "xla":
        from .xla import XlaBackend

        return XlaBackend(config)
    if name == "fsdp":
        from .fsdp import FsdpBackend

        return FsdpBackend(config)
    from .eager import EagerBackend

    return EagerBackend(config)
