"""torch.distributed's default process group: created once for whichever part needs it first, and
destroyed when a command finishes cleanly.

A process that exits with a gloo group still alive can abort in the interpreter's teardown
("terminate called without an active exception", SIGABRT): gloo's worker threads still hold work
whose tensors reference Python objects. So every part of fluid that needs a group (the fsdp and
xla backends, the encoders, multi-process sampling) gets it from :func:`join`, and the ``fluid``
command calls :func:`leave` once the command returned, whatever its exit status. It is not
destroyed when an exception propagates: a rank that failed may have peers still inside a
collective, and destroying could wait on them (torchrun stops the other ranks).

:func:`barrier` and :func:`any_true` are the two collectives the processes agree through (the
backends, the encoders and sampling call them). Code that drives
:class:`~fluid_train.trainer.Trainer` (or the encoders) under torchrun itself calls :func:`leave`
at the end, like any torch.distributed program calls
``destroy_process_group``. Importing this module imports no torch.
"""

from __future__ import annotations

import datetime
import sys
from typing import Any


def join(
    backend: str = "gloo",
    *,
    xla: bool = False,
    timeout_s: float | None = None,
    device_id: Any = None,
) -> None:
    """Create the default process group unless one exists already (then it is used as it is).

    ``xla=True`` finds the peers through the SPMD runtime (``init_method="xla://"``); otherwise
    torchrun's environment (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``) names them.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if xla:
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers "xla://")

        kwargs["init_method"] = "xla://"
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if device_id is not None:
        kwargs["device_id"] = device_id
    dist.init_process_group(backend, **kwargs)


def leave() -> bool:
    """Destroy the default process group if there is one; True if one was destroyed.

    Call it once every rank is done communicating (after a clean finish, never in an error
    handler). torch is not imported when nothing imported torch.distributed.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True


def barrier() -> None:
    """Wait for every process of the default group (none: nothing to wait for)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_true(flag: bool, *, device: Any = None) -> bool:
    """True on every process when ``flag`` is True on any of them: a one-element MAX
    all-reduce on the default group (a collective: every process calls it at the same point;
    ``device``: where the group's backend wants the tensor, e.g. the GPU for NCCL). Without a
    group, the flag itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return flag
    import torch

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
