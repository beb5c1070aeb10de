"""Every sharding rule of Fluid training, in one place (applied to a built model from outside).

SPMD on the xla backend (``torch_xla`` is imported inside the functions, never at module load):

- Mesh ``('data', 'fsdp')`` over all devices of all hosts. ``fsdp`` spans the devices of one
  slice (fast ICI links); ``data`` spans slices (DCN), one replica group per slice. On a single
  slice ``data`` has size 1, so every rule below is the same for one slice or many.
- Parameters: FSDPv2 (``SpmdFullyShardedDataParallel``) wraps every transformer block of the
  trunk and of the text aligner: each block's parameters are sharded on their largest dimension
  over ``fsdp`` (all-gathered for the block's forward, gradients reduce-scattered), and the
  block output is sharded on the batch. Parameters outside blocks (embeddings, heads, norms)
  follow the same largest-dimension rule through ``mark_sharding``.
- Optimizer moments and EMA averages take the sharding of their parameter; buffers and the
  trainer's scalars (step, learning rate) are replicated.
- Inputs: the batch dimension over ``('data', 'fsdp')``; everything else replicated.
- Activation checkpointing (optional): each block's forward is recomputed in the backward
  (``torch_xla``'s checkpoint on xla, ``torch.utils.checkpoint`` on eager and fsdp).

FSDP2 on the fsdp backend (``torch.distributed.fsdp.fully_shard``, one process per device):

- Mesh ``('fsdp',)`` over all ranks, or for HSDP ``('replicate', 'fsdp')``: parameters sharded
  inside a replica group (one node by default: fast NVLink), replicated across groups (the
  gradients all-reduced over ``replicate`` after the reduce-scatter over ``fsdp``).
- Units: every block of the trunk and of the text aligner, then the root: the head (DiffLoss
  MLP or softmax layer, with the token embedding) together with the remaining embeddings and
  norms. The head is called twice a step (``head.embed`` at the input, ``head.loss`` at the
  output); as part of the root it is gathered once, for the whole step, rather than twice.
  Parameters are sharded on dim 0, except where dim 0 is smaller than the shard count
  (``pos_embed [1, N, D]``): then on a larger dim that divides evenly, so no rank is left empty.
- Optional per block: activation checkpointing (wrapped first) and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch_xla.distributed.spmd import Mesh

__all__ = [
    "BATCH_AXES",
    "activation_checkpoint_eager",
    "batch_partition_spec",
    "block_lists",
    "build_fsdp_mesh",
    "build_mesh",
    "fsdp_shard_dim",
    "mesh_shape_for",
    "param_partition_spec",
    "parallelize_fsdp",
    "parallelize_xla",
    "replicate",
    "shard_batch",
    "shard_frozen_xla",
    "shard_like",
]

# The batch dimension of every input and block output is split over both axes.
BATCH_AXES = ("data", "fsdp")


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The ``nn.ModuleList``\\ s of transformer blocks FSDPv2 wraps: ``trunk.blocks`` and the
    text aligner's blocks (found by attribute, so a component may name its list either way)."""
    found = []
    for owner_name in ("trunk", "text_aligner"):
        owner = getattr(model, owner_name, None)
        if owner is None:
            continue
        for attr in ("blocks", "layers"):
            blocks = getattr(owner, attr, None)
            if isinstance(blocks, nn.ModuleList):
                found.append(blocks)
                break
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no trunk.blocks / text_aligner.blocks ModuleList to wrap"
        )
    return found


def mesh_shape_for(num_devices: int, num_slices: int) -> tuple[int, int]:
    """``(data, fsdp)``: one data replica per slice, FSDP inside a slice."""
    if num_devices < 1 or num_slices < 1 or num_devices % num_slices:
        raise ValueError(
            f"cannot split {num_devices} devices into {num_slices} equal slices for the mesh"
        )
    return num_slices, num_devices // num_slices


def param_partition_spec(shape: Iterable[int]) -> tuple[Any, ...]:
    """FSDP rule for a parameter outside the blocks: shard its largest dim over ``fsdp``
    (the rule FSDPv2 applies inside blocks); scalars stay replicated."""
    shape = tuple(shape)
    spec: list[Any] = [None] * len(shape)
    if shape:
        spec[shape.index(max(shape))] = "fsdp"
    return tuple(spec)


def batch_partition_spec(ndim: int) -> tuple[Any, ...]:
    """Inputs ``[B, ...]``: batch over ``('data', 'fsdp')``, the rest replicated."""
    if ndim < 1:
        raise ValueError(f"a batched input needs at least 1 dimension; got {ndim}")
    return (BATCH_AXES,) + (None,) * (ndim - 1)


# ---------------------------------------------------------------------- xla


def build_mesh(dcn_data_parallelism: int | None = None) -> Mesh:
    """The ``('data', 'fsdp')`` mesh over every device of every host (call after use_spmd).

    ``dcn_data_parallelism`` = slices on the ``data`` axis; None reads the slice count from
    the runtime's device attributes (1 when they carry no ``slice_index``). On TPUs the mesh
    follows the physical topology (``HybridMesh``); elsewhere devices are taken in id order.
    """
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    num_devices = xr.global_runtime_device_count()
    attributes = xr.global_runtime_device_attributes()
    if dcn_data_parallelism is None:
        slices = {a.get("slice_index", 0) for a in attributes}
        dcn_data_parallelism = max(len(slices), 1)
    data, fsdp = mesh_shape_for(num_devices, dcn_data_parallelism)
    if xr.device_type() == "TPU":
        return xs.HybridMesh(
            ici_mesh_shape=(1, fsdp), dcn_mesh_shape=(data, 1), axis_names=("data", "fsdp")
        )
    return xs.Mesh(np.arange(num_devices), (data, fsdp), ("data", "fsdp"))


def parallelize_xla(
    model: nn.Module,
    mesh: Mesh,
    *,
    activation_checkpointing: Literal["none", "block"] = "none",
) -> nn.Module:
    """Move ``model`` to the SPMD device and shard it (FSDPv2 per block, the rest by rule)."""
    import torch_xla
    import torch_xla.distributed.spmd as xs
    from torch_xla.distributed.fsdp import checkpoint_module
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import (
        SpmdFullyShardedDataParallel as FSDPv2,
    )

    model.to(torch_xla.device())
    extra = "data" if "data" in mesh.axis_names else None
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            if activation_checkpointing == "block":
                block = checkpoint_module(block)
            blocks[i] = FSDPv2(block, mesh=mesh, extra_data_axis=extra)
    for param in model.parameters():
        if torch_xla._XLAC._get_xla_sharding_spec(param) == "":
            xs.mark_sharding(param, mesh, param_partition_spec(param.shape))
    # Buffers (diffusion tables, running maxima) are replicated — annotated so, as the step's
    # outputs will be: otherwise step 2 sees other input shardings than step 1 and recompiles.
    for buffer in model.buffers():
        if buffer.device.type == "xla" and torch_xla._XLAC._get_xla_sharding_spec(buffer) == "":
            xs.mark_sharding(buffer, mesh, (None,) * buffer.ndim)
    return model


def shard_frozen_xla(module: nn.Module, mesh: Mesh) -> nn.Module:
    """Shard a frozen encoder (T5, the image tokenizer) already on the SPMD device: each
    parameter on its largest dimension over ``fsdp``, as outside FSDPv2 blocks. Used when its
    weights do not fit one device (``fluid_train.preprocess.encoders_fit``); the compiler
    all-gathers each weight where it is used. No gradients, so no reduce-scatter."""
    import torch_xla.distributed.spmd as xs

    for param in module.parameters():
        xs.mark_sharding(param, mesh, param_partition_spec(param.shape))
    return module


def shard_like(tensor: Tensor, reference: Tensor) -> None:
    """Give ``tensor`` (same shape, on the xla device) the sharding of ``reference``."""
    import torch_xla

    sharding = torch_xla._XLAC._get_xla_op_sharding(reference)
    if sharding is not None:
        torch_xla._XLAC._xla_mark_sharding(tensor, sharding)


def batch_sharding(mesh: Mesh, example: dict[str, Tensor], *, minibatch: bool) -> dict[str, Any]:
    """``MpDeviceLoader`` input sharding for a dict batch: each tensor's batch dim sharded.

    ``minibatch``: each host holds only its part of the global batch (multi-host runs); the
    runtime assembles the global array from the hosts' parts.
    """
    import torch_xla.distributed.spmd as xs

    return {
        name: xs.ShardingSpec(mesh, batch_partition_spec(tensor.ndim), minibatch=minibatch)
        for name, tensor in example.items()
    }


def shard_batch(tensor: Tensor, mesh: Mesh) -> Tensor:
    """Generation: shard an input ``[B, ...]`` on the xla device over the batch axes."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(tensor, mesh, batch_partition_spec(tensor.ndim))
    return tensor


def replicate(tensor: Tensor, mesh: Mesh) -> Tensor:
    """Replicate ``tensor`` on every device (an all-gather), so every host can read it whole."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(tensor, mesh, (None,) * tensor.ndim)
    return tensor

# ---------------------------------------------------------------------- fsdp (FSDP2)


def build_fsdp_mesh(device_type: str, world_size: int, replicate: int = 1):
    """The FSDP2 device mesh: ``('fsdp',)``, or ``('replicate', 'fsdp')`` for HSDP when
    ``replicate`` > 1 (``world_size`` ranks, consecutive ranks in one shard group)."""
    from torch.distributed.device_mesh import init_device_mesh

    replicate, shard = mesh_shape_for(world_size, replicate)
    if replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("fsdp",))
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "fsdp"))


def fsdp_shard_dim(shape: Iterable[int], shards: int) -> int:
    """The dim FSDP2 shards a parameter on: 0 (padded when uneven), unless dim 0 is smaller
    than ``shards`` (it would leave ranks empty): then the largest other dim that divides
    evenly (FSDP2 requires even sharding off dim 0)."""
    shape = tuple(shape)
    if not shape or shape[0] >= shards:
        return 0
    even = [d for d in range(1, len(shape)) if shape[d] % shards == 0]
    return max(even, key=lambda d: shape[d]) if even else 0


# Block submodules the trunk calls outside the block's forward (CrossAttention.text_kv).
_CALLED_OUTSIDE_BLOCK = ("cross_attn.kv", "cross_attn.k_norm")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def parallelize_fsdp(
    model: nn.Module,
    mesh: Any,
    *,
    mp_policy: Any = None,
    activation_checkpointing: Literal["none", "block"] = "none",
    compile: bool = False,
    forward_methods: Iterable[str] = ("training_loss",),
) -> nn.Module:
    """``fully_shard`` per block, then the root (in place; works on the meta device).

    ``mp_policy``: a ``MixedPrecisionPolicy`` (None = fp32 parameters, compute and reduction).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )
    from torch.distributed.tensor import Shard

    shards = mesh.size(mesh.ndim - 1)  # the last mesh dim shards; a first one replicates

    def placement(param: nn.Parameter) -> Shard:
        return Shard(fsdp_shard_dim(param.shape, shards))

    options = {
        "mesh": mesh,
        "shard_placement_fn": placement,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            # The trunk computes every block's text K/V up front, outside the blocks' forward:
            # those layers are units of their own, gathered when they are called.
            for path in _CALLED_OUTSIDE_BLOCK:
                sub = block.get_submodule(path) if _has_submodule(block, path) else None
                if sub is not None and any(True for _ in sub.parameters()):
                    fully_shard(sub, **options)
            if activation_checkpointing == "block":
                block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            if compile:
                block.compile()  # in place: parameter names stay as they are
            fully_shard(block, **options)
            blocks[i] = block
    fully_shard(model, **options)
    # The trainer calls training_loss, not forward: FSDP2 must gather the root's parameters
    # around it as it does around forward.
    for method in forward_methods:
        register_fsdp_forward_method(model, method)
    return model


# ---------------------------------------------------------------------- eager


def activation_checkpoint_eager(model: nn.Module) -> nn.Module:
    """Recompute each block's forward in the backward (``torch.utils.checkpoint``).

    Uses torch's ``checkpoint_wrapper``, whose state-dict hooks drop the wrapper prefix, so
    checkpoints and exports keep the plain parameter names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def count_sharded(model: nn.Module) -> int:
    """Parameters that carry an SPMD sharding annotation (a check used by tests and logs)."""
    import torch_xla

    return sum(1 for p in model.parameters() if torch_xla._XLAC._get_xla_sharding_spec(p) != "")


def replicated_scalar(value: float | int, *, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor on the xla device that enters graphs as data, not as a constant."""
    import torch_xla

    return torch.tensor(value, dtype=dtype).to(torch_xla.device())
