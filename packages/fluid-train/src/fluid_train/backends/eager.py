"""The eager backend: plain PyTorch on the CPU or one CUDA device.

The step runs op by op; the host reads losses only at log and checkpoint boundaries (so a CUDA
run is not synchronised every step). Checkpoints are one ``torch.save`` file per step directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_torch, save_torch
from ..parallelize import activation_checkpoint_eager
from . import CheckpointState, TorchDeviceBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import TrainConfig

__all__ = ["EagerBackend"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class EagerBackend(TorchDeviceBackend):
    name = "eager"

    def __init__(self, config: TrainConfig) -> None:
        device = torch.device(config.device) if config.device else default_device()
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"the eager backend runs on 'cpu' or 'cuda[:i]'; got device {device}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        # Adam's capturable path keeps step counts on the device; PyTorch supports it on CUDA only.
        self.capturable = device.type == "cuda"

    def prepare_model(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        if config.parallel.activation_checkpointing == "block":
            activation_checkpoint_eager(model)
        return model.to(self.device)

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path, state: CheckpointState) -> None:
        save_torch(
            directory,
            {
                "model": state.model.state_dict(),
                "ema": state.ema.state_dict(),
                "optimizer": _optimizer_state(state.optimizer),
                "host": state.host,
                "rng": self.rng_state(),
            },
        )

    def load_checkpoint(self, directory: Path, state: CheckpointState) -> dict[str, Any]:
        if (directory / ".metadata").is_file():  # sharded, written by the fsdp backend
            from .fsdp import load_portable_checkpoint

            return load_portable_checkpoint(directory, state, self)
        saved = load_torch(directory)
        state.model.load_state_dict(saved["model"])
        state.ema.load_state_dict(saved["ema"])
        _load_optimizer_state(state.optimizer, saved["optimizer"])
        self.set_rng_state(saved["rng"])
        return saved["host"]


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` without the shared lr tensor (the trainer owns and saves it)
    and the per-group ``names`` (rebuilt from the model)."""
    state = optimizer.state_dict()
    groups = []
    for group in state["param_groups"]:
        group = {k: v for k, v in group.items() if k != "names"}
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        groups.append(group)
    return {"state": state["state"], "param_groups": groups}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    lr = optimizer.param_groups[0]["lr"]
    names = [g.get("names") for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, group_names in zip(optimizer.param_groups, names, strict=True):
        group["lr"] = lr  # keep the one shared schedule tensor
        if group_names is not None:
            group["names"] = group_names
