"""The xla backend: torch_xla SPMD on TPU (or any PJRT device, e.g. the CPU for tests).

- ``torch_xla.runtime.use_spmd()`` once, before any tensor touches the device; one process per
  host drives all of its devices.
- Mesh and sharding from ``fluid_train.parallelize`` (``('data', 'fsdp')``, FSDPv2 per block).
- Batches: ``MpDeviceLoader`` uploads each host batch in a background thread with the batch
  dimension sharded over ``('data', 'fsdp')``. The host metadata of a batch (its data position)
  travels beside it through a FIFO, so the trainer commits positions in step order.
- The step: ``torch_xla.compile`` traces the whole step (forward, backward, clipping, AdamW with
  a tensor learning rate, EMA) into one graph, executed at its exit; fixed shapes and no host
  values in the step keep the number of compiled graphs constant after the first steps.
- Training on image shards: the frozen tokenizer and T5 run on the device (bf16 on TPUs; sharded
  when they take more than half of a device's memory), as their own compiled graph between the
  upload and the step (``compile_xla_encode``) — never on the host CPU. Only SentencePiece runs
  on the host, in the loader thread.
- Host reads go through ``xm.add_step_closure``: they run after the step's graph has executed.
- ``compiles`` = torch_xla's ``CompileTime`` metric count.
- Checkpoints: ``torch.distributed.checkpoint`` with the SPMD planners (sharded, no gather).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import process_group
from ..checkpoint import load_dcp, load_torch, save_dcp, save_torch
from ..parallelize import batch_sharding, build_mesh, parallelize_xla, shard_like
from . import Backend, CheckpointState, Encode

if TYPE_CHECKING:  # pragma: no cover
    from ..data import HostBatch, TrainLoader
    from ..ema import EMA
    from ..encoders import FrozenEncoders
    from ..recipe import TrainConfig

__all__ = ["XlaBackend"]

logger = logging.getLogger(__name__)


class XlaBackend(Backend):
    name = "xla"
    capturable = True

    def __init__(self, config: TrainConfig) -> None:
        import torch_xla
        import torch_xla.runtime as xr

        xr.use_spmd()
        self._xr = xr
        self.device = torch_xla.device()
        self.process_index = xr.process_index()
        self.process_count = xr.process_count()
        self.device_type = xr.device_type()
        self.mesh = build_mesh(config.parallel.dcn_data_parallelism)
        if self.process_count > 1:
            # DCP coordinates the hosts' shard writes through a CPU process group.
            process_group.join(xla=True)
        self._compiled_step: Callable | None = None
        self._compiled_encode: Callable | None = None
        self._precision = config.precision
        logger.info(
            "xla backend: %s, %d devices, mesh %s, host %d of %d",
            self.device_type,
            xr.global_runtime_device_count(),
            dict(self.mesh.shape()),
            self.process_index,
            self.process_count,
        )

    @property
    def autocast_device_type(self) -> str:
        return "xla"

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32" or (precision == "auto" and self.device_type == "CPU"):
            return None
        return torch.bfloat16

    def prepare_model(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        return parallelize_xla(
            model, self.mesh, activation_checkpointing=config.parallel.activation_checkpointing
        )

    def place_ema(self, ema: EMA) -> None:
        for average, param in ema.pairs():
            shard_like(average, param)

    def grad_zeros(self, param: Tensor) -> Tensor:
        zeros = torch.zeros_like(param)
        shard_like(zeros, param)
        return zeros

    def scalar(self, value: float | int, dtype: torch.dtype) -> Tensor:
        import torch_xla.distributed.spmd as xs

        tensor = torch.tensor(value, dtype=dtype).to(self.device)
        # Annotated replicated, like the step graph's outputs: the same graph from step 1 on.
        xs.mark_sharding(tensor, self.mesh, ())
        return tensor

    def barrier(self) -> None:
        process_group.barrier()

    def any_process(self, flag: bool) -> bool:
        # On the hosts' CPU (gloo) group: no device work, no graph.
        return process_group.any_true(flag)

    # -------------------------------------------------------------- data

    def device_batches(
        self, loader: TrainLoader, encode: Encode
    ) -> Iterator[tuple[HostBatch, dict[str, Tensor]]]:
        from torch_xla.distributed.parallel_loader import MpDeviceLoader

        pending: collections.deque[HostBatch] = collections.deque()
        host_iter = iter(loader)
        first = next(host_iter)
        first_tensors = encode(first)

        def cpu_batches() -> Iterator[dict[str, Tensor]]:
            pending.append(first)
            yield first_tensors
            for host_batch in host_iter:
                tensors = encode(host_batch)
                pending.append(host_batch)  # before the yield: the FIFO leads the uploads
                yield tensors

        minibatch = self.process_count > 1
        local_devices = self._xr.addressable_runtime_device_count()
        rows = next(iter(first_tensors.values())).shape[0]
        if rows % local_devices:
            raise ValueError(
                f"the per-host batch ({rows}) must divide over this host's {local_devices} "
                "devices; choose --batch-size as a multiple of the device count"
            )
        device_loader = MpDeviceLoader(
            cpu_batches(),
            self.device,
            input_sharding=batch_sharding(self.mesh, first_tensors, minibatch=minibatch),
        )
        for tensors in device_loader:
            yield pending.popleft(), tensors

    # -------------------------------------------------------------- frozen encoders

    def place_encoders(self, encoders: FrozenEncoders) -> FrozenEncoders:
        import torch_xla.core.xla_model as xm

        from ..encoders import encoders_fit
        from ..parallelize import shard_frozen_xla

        dtype = self.autocast_dtype(self._precision)  # bf16 on TPUs, fp32 on the CPU device
        if dtype is not None:
            encoders.to("cpu", dtype)
        encoders.to(self.device).prepare_for_xla()
        try:
            device_bytes: int | None = int(xm.get_memory_info(self.device)["bytes_limit"])
        except Exception:  # the CPU PJRT device reports no memory limit
            device_bytes = None
        if not encoders_fit(encoders.weight_bytes(), device_bytes):
            for module in (encoders.tokenizer, encoders.text_encoder):
                shard_frozen_xla(module, self.mesh)
        return encoders

    def encode_batch(self, encoders: FrozenEncoders, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        from ..encoders import compile_xla_encode

        # A graph of its own, outside the step: one compile, and the step graph is the same
        # as for encoded shards (inputs split by rows).
        if self._compiled_encode is None:
            self._compiled_encode = compile_xla_encode(encoders, self.mesh)
        return self._compiled_encode(batch)

    # -------------------------------------------------------------- the step

    def run_step(
        self, step_fn: Callable[..., Any], batch: dict[str, Tensor], closure: Callable | None
    ) -> Any:
        import torch_xla
        import torch_xla.core.xla_model as xm

        if self._compiled_step is None:

            def train_step(batch: dict[str, Tensor], closure: Callable | None) -> Any:
                out = step_fn(batch)
                if closure is not None:
                    xm.add_step_closure(closure, args=(out,))
                return out

            self._compiled_step = torch_xla.compile(train_step, name="fluid_train_step")
        return self._compiled_step(batch, closure)

    def compiles(self) -> int | None:
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    # -------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path, state: CheckpointState) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        # Every sync advances torch_xla's device seed: read the RNG state before the syncs of
        # the save and put it back after them, so that the randomness of a run does not depend
        # on where it wrote checkpoints (a preempted run resumes onto the uninterrupted one).
        rng = self.rng_state()
        torch_xla.sync()  # everything the state refers to is device data
        device_state = _device_state(state)
        scalars = _pop_scalars(device_state)
        save_dcp(directory, device_state)
        save_torch(
            directory,
            {
                "host": state.host,
                "rng": rng,
                "scalars": {path: t.detach().cpu() for path, t in scalars.items()},
            },
            name=f"host_{self.process_index}.pt",
        )
        xm.set_rng_state(int(rng["xla"]), self.device)

    def load_checkpoint(self, directory: Path, state: CheckpointState) -> dict[str, Any]:
        import torch_xla

        # DCP loads in place: the optimizer moments exist already (the trainer primes them).
        if not state.optimizer.state:
            raise RuntimeError("the optimizer state must be primed before loading a checkpoint")
        torch_xla.sync()
        saved = load_torch(directory, name=f"host_{self.process_index}.pt")
        lr = state.optimizer.param_groups[0]["lr"]
        device_state = _device_state(state)
        scalars = _pop_scalars(device_state)
        load_dcp(directory, device_state)
        missing = sorted(set(scalars) - set(saved["scalars"]))
        if missing:
            raise KeyError(f"checkpoint {directory} lacks the scalar state {missing[:5]}")
        with torch.no_grad():
            for path, tensor in scalars.items():
                tensor.copy_(saved["scalars"][path].to(tensor.device, tensor.dtype))
        _put_scalars(device_state, scalars)
        state.model.load_state_dict(device_state["model"])
        state.ema.load_state_dict(device_state["ema"])
        state.optimizer.load_state_dict(device_state["optimizer"])
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        torch_xla.sync()
        self.set_rng_state(saved["rng"])
        return saved["host"]

    # -------------------------------------------------------------- RNG

    def rng_state(self) -> dict[str, Any]:
        import torch_xla.core.xla_model as xm

        state = super().rng_state()
        state["xla"] = int(xm.get_rng_state(self.device))
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import torch_xla.core.xla_model as xm

        super().set_rng_state(state)
        if "xla" in state:
            xm.set_rng_state(int(state["xla"]), self.device)

    def seed(self, seed: int) -> None:
        import torch_xla

        super().seed(seed)
        torch_xla.manual_seed(seed)


def _device_state(state: CheckpointState) -> dict[str, Any]:
    optimizer = state.optimizer.state_dict()
    # The shared lr tensor is recomputed from the step; saving it would alias all groups.
    groups = [
        {k: v for k, v in g.items() if k not in ("lr", "names")} for g in optimizer["param_groups"]
    ]
    return {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": {"state": optimizer["state"], "param_groups": groups},
    }


# 0-d tensors (Adam's step counts, running maxima) travel in the host file: the SPMD load
# planner cannot read replicated 0-d tensors back (torch_xla 2.9), and they are a few bytes.
# They are keyed by their path of dict keys (the optimizer's parameter ids are ints).
def _pop_scalars(state: dict[Any, Any], prefix: tuple = ()) -> dict[tuple, Tensor]:
    found: dict[tuple, Tensor] = {}
    for key in list(state):
        value = state[key]
        if isinstance(value, dict):
            state[key] = value = dict(value)  # never edit the optimizer's own dicts
            found.update(_pop_scalars(value, (*prefix, key)))
        elif isinstance(value, Tensor) and value.ndim == 0:
            found[(*prefix, key)] = state.pop(key)
    return found


def _put_scalars(state: dict[Any, Any], scalars: dict[tuple, Tensor]) -> None:
    for path, tensor in scalars.items():
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = tensor
