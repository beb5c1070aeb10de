"""The fsdp backend: ``torch.distributed`` FSDP2 under torchrun, one process per device.

- Launch: ``torchrun --nproc-per-node N [--nnodes M ...] -m fluid_train.cli train ...``; the
  launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) feed
  ``init_process_group``: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on the CPU.
- ``process_index`` / ``process_count`` are rank / world size, so the trainer gives each rank
  ``batch_size / world`` samples per step from its own disjoint shards (the global batch is
  ``--batch-size`` whatever the rank count).
- Model: built on the meta device, sharded by ``parallelize_fsdp`` (FSDP2 per block, the head,
  the root; HSDP over a ``('replicate', 'fsdp')`` mesh), materialised empty on the device, and
  every shard then filled from a seeded CPU build, so the initial weights equal the eager
  backend's for the same seed. The ranks of one node build in turn: the host holds one full
  fp32 copy at a time, the device never more than its shards.
- Mixed precision on CUDA (``precision`` auto/bf16): bf16 parameters and compute, fp32
  gradient reduction, fp32 sharded master weights and AdamW state (``MixedPrecisionPolicy``).
  fp32 throughout on the CPU.
- The step runs op by op as on eager. The loss the host reads is the mean over ranks; the
  gradient norm is the global one (sharded DTensor norms, reduced).
- Checkpoints: ``torch.distributed.checkpoint`` of a portable state — ``model.state_dict()``,
  the EMA, and AdamW's moments keyed by parameter name — each rank writing its own shards,
  nothing gathered; plus ``host_{rank}.pt`` per rank (step, data position, RNG). DCP reshards
  on load, so a checkpoint resumes at any rank count (RNG streams restored only at the same
  count; else each rank keeps its seed + rank stream) and on the eager backend
  (``load_portable_checkpoint``); an eager ``state.pt`` resumes here (each rank copies its shards).
- Failures: an exception on one rank ends its process; torchrun then stops the others. A rank
  blocked on a lost peer raises after ``parallel.dist_timeout_s``. A NaN loss is seen by every
  rank at once (the loss is reduced before it is read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import process_group
from ..checkpoint import load_torch, save_torch
from ..parallelize import build_fsdp_mesh, parallelize_fsdp
from ..recipe import clean_name
from . import Backend, CheckpointState, TorchDeviceBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import TrainConfig

__all__ = ["FsdpBackend", "load_portable_checkpoint", "portable_state", "torchrun_env"]

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> dict[str, int]:
    """rank, world, local_rank, local_world from the launcher; a clear error outside one."""
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"backend 'fsdp' runs under torchrun (missing {', '.join(missing)}): launch with "
            "`torchrun --nproc-per-node N -m fluid_train.cli train --backend fsdp ...`"
        )
    world = int(os.environ["WORLD_SIZE"])
    return {
        "rank": int(os.environ["RANK"]),
        "world": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    }


class FsdpBackend(TorchDeviceBackend):
    name = "fsdp"

    def __init__(self, config: TrainConfig) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy

        env = torchrun_env()
        requested = torch.device(config.device) if config.device else None
        use_cuda = torch.cuda.is_available() and (requested is None or requested.type == "cuda")
        if requested is not None and requested.type not in ("cpu", "cuda"):
            raise ValueError(f"the fsdp backend runs on 'cpu' or 'cuda'; got device {requested}")
        if requested is not None and requested.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested} requested but CUDA is not available")
        if use_cuda:
            # One GPU per rank: the local rank picks it (an index in --device is ignored).
            self.device = torch.device("cuda", env["local_rank"])
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.capturable = use_cuda
        process_group.join(
            "nccl" if use_cuda else "gloo",
            timeout_s=config.parallel.dist_timeout_s,
            device_id=self.device if use_cuda else None,
        )
        self._dist = dist
        self.process_index = dist.get_rank()
        self.process_count = dist.get_world_size()
        self.local_rank, self.local_world = env["local_rank"], env["local_world"]
        nodes = max(self.process_count // max(self.local_world, 1), 1)
        replicate = config.parallel.dcn_data_parallelism or nodes
        self.mesh = build_fsdp_mesh(self.device.type, self.process_count, replicate)
        bf16 = use_cuda and config.precision != "fp32"
        self.mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        logger.info(
            "fsdp backend: rank %d of %d on %s, mesh %s %s, %s",
            self.process_index,
            self.process_count,
            self.device,
            self.mesh.mesh_dim_names,
            tuple(self.mesh.shape),
            "bf16 params / fp32 reduce" if bf16 else "fp32",
        )

    # -------------------------------------------------------------- the model

    def _parallelize(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        return parallelize_fsdp(
            model,
            self.mesh,
            mp_policy=self.mp_policy,
            activation_checkpointing=config.parallel.activation_checkpointing,
            compile=config.parallel.compile,
        )

    def prepare_model(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """Shard a model built already (on the CPU): FSDP2 moves each unit to the device."""
        return self._parallelize(model.to(self.device), config)

    def build_model(self, build: Callable[[], nn.Module], config: TrainConfig) -> nn.Module:
        # build() seeds the weights' RNG; this rank's own stream (seed + rank) resumes after.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with torch.device("meta"):
                model = build()
            self._parallelize(model, config)
            model.to_empty(device=self.device)
            # The ranks of a node take turns, so the host holds one full CPU copy at a time.
            for turn in range(self.local_world):
                if turn == self.local_rank:
                    reference = _named_tensors(build())
                    with torch.no_grad():
                        for name, tensor in _named_tensors(model).items():
                            copy_full_into(tensor, reference[name])
                    del reference
                self.barrier()
        return model

    # -------------------------------------------------------------- collectives

    def barrier(self) -> None:
        process_group.barrier()

    def any_process(self, flag: bool) -> bool:
        return process_group.any_true(flag, device=self.device)  # NCCL reduces on the GPU

    def mean_over_processes(self, value: Tensor) -> Tensor:
        total = value.detach().clone()
        self._dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.process_count

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the partial per-shard norms, reduced over ranks
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path, state: CheckpointState) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(
            portable_state(state),
            storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True),
        )
        save_torch(
            directory,
            {"host": state.host, "rng": self.rng_state(), "process_count": self.process_count},
            name=f"host_{self.process_index}.pt",
        )

    def load_checkpoint(self, directory: Path, state: CheckpointState) -> dict[str, Any]:
        if (directory / "state.pt").is_file():  # written by the eager backend
            saved = load_torch(directory)
            _load_full_state(state, saved)
            if self.process_count == 1:  # else each rank keeps its own stream (seed + rank)
                self.set_rng_state(saved["rng"])
            host = dict(saved["host"])
            host["all_data"] = [host["data"]]
            return host
        return load_portable_checkpoint(directory, state, self)

    # -------------------------------------------------------------- RNG

    def seed(self, seed: int) -> None:
        # Each rank its own stream of training noise (masks, diffusion noise, caption drop);
        # the initial weights are seeded separately, the same on every rank.
        super().seed(seed + self.process_index)


# ---------------------------------------------------------------------- portable state


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and every buffer (non-persistent ones too) by clean name."""
    named = {clean_name(n): p for n, p in model.named_parameters()}
    named.update({clean_name(n): b for n, b in model.named_buffers()})
    return named


def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copy the full tensor ``full`` into ``target``: into its local shard if it is a DTensor."""
    from torch.distributed.tensor import DTensor

    if tuple(target.shape) != tuple(full.shape):
        raise ValueError(f"shape {list(full.shape)} does not match {list(target.shape)}")
    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            full.shape, target.device_mesh, target.placements
        )
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        local = target.to_local()
        local.copy_(full[index].to(local.device, local.dtype))
    else:
        target.copy_(full.to(target.device, target.dtype))


def _optimizer_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, Tensor]]:
    """AdamW's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``) keyed by the clean
    parameter name: the same keys on every backend and rank count (the live tensors, so a
    DCP load into it is in place)."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    out: dict[str, dict[str, Tensor]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state:
                out[names[id(param)]] = dict(optimizer.state[param])
    return out


def portable_state(state: CheckpointState) -> dict[str, Any]:
    """The device state of a checkpoint in a layout every backend and rank count shares."""
    return {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": _optimizer_by_name(state.model, state.optimizer),
    }


def load_portable_checkpoint(
    directory: Path, state: CheckpointState, backend: Backend
) -> dict[str, Any]:
    """Load a DCP checkpoint written by the fsdp backend (at any rank count) in place into
    ``state`` — sharded or not — and return this process's host state with ``all_data``, the
    data positions of every rank that wrote it."""
    import torch.distributed.checkpoint as dcp

    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no torch.distributed.checkpoint (.metadata)")
    if not state.optimizer.state:
        raise RuntimeError("the optimizer state must be primed before loading a checkpoint")
    hosts = sorted(directory.glob("host_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not hosts:
        raise FileNotFoundError(f"checkpoint {directory} has no host_*.pt (step, data, RNG)")
    saved = [load_torch(directory, name=p.name) for p in hosts]
    if "scalars" in saved[0]:
        raise ValueError(
            f"checkpoint {directory} was written by the xla backend (SPMD layout); resume it "
            "with --backend xla"
        )
    template = portable_state(state)
    dcp.load(template, storage_reader=dcp.FileSystemReader(str(directory)))
    state.model.load_state_dict(template["model"])
    state.ema.load_state_dict(template["ema"])
    same_layout = saved[0].get("process_count") == backend.process_count == len(saved)
    mine = saved[backend.process_index] if same_layout else saved[0]
    if same_layout:  # else each process keeps the stream it was seeded with
        backend.set_rng_state(mine["rng"])
    host = dict(mine["host"])
    host["all_data"] = [s["host"]["data"] for s in saved]
    return host


def _load_full_state(state: CheckpointState, saved: dict[str, Any]) -> None:
    """An eager ``state.pt`` (full tensors; AdamW state by index) into sharded ``state``."""
    template = portable_state(state)
    with torch.no_grad():
        for section in ("model", "ema"):
            missing = sorted(set(template[section]) - set(saved[section]))
            if missing:
                raise KeyError(f"the eager checkpoint lacks {section} entries {missing[:5]}")
            for name, tensor in template[section].items():
                copy_full_into(tensor, saved[section][name])
        names = {id(p): clean_name(n) for n, p in state.model.named_parameters()}
        by_index = saved["optimizer"]["state"]
        for group, saved_group in zip(
            state.optimizer.param_groups, saved["optimizer"]["param_groups"], strict=True
        ):
            for param, index in zip(group["params"], saved_group["params"], strict=True):
                live = template["optimizer"][names[id(param)]]
                for key, value in by_index[index].items():
                    copy_full_into(live[key], value)
