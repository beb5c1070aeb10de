"""Checkpoints that are never half-written, and the resume that reads them back.

Layout of ``RUN/checkpoints/``::

    step_00001000/        one complete checkpoint (``meta.json`` written last, inside)
    step_00002000/
    latest                the name of the newest complete checkpoint (a one-line file)

Writing (``CheckpointManager.save``): everything goes into ``.tmp-step_...``; files and the
directory are fsynced; ``os.replace`` renames it to ``step_...``; then ``latest`` is rewritten
through its own temp file + fsync + ``os.replace``. A crash at any point leaves ``latest``
naming the previous complete checkpoint (a leftover ``.tmp-*`` is removed by the next save).
Only checkpoints older than the ``keep`` newest are deleted, never the one ``latest`` names.

Formats: the eager backend writes one ``state.pt`` (``torch.save``; loaded with
``weights_only=True``). The xla backend writes the sharded tensors (model, EMA, optimizer)
with ``torch.distributed.checkpoint`` and torch_xla's SPMD planners — each host writes its own
shards, nothing is gathered — plus a small per-host ``host_{i}.pt`` (step, RNG, data position).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointManager",
    "fsync_dir",
    "fsync_tree",
    "load_dcp",
    "load_torch",
    "save_dcp",
    "save_torch",
]

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


class CheckpointManager:
    """Atomic step directories under ``root`` plus the ``latest`` pointer.

    ``is_writer`` is False on every host but one in a multi-host run: all hosts write their
    shards into the temp directory; the writer alone renames it and moves ``latest``
    (``barrier`` separates the two phases).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep: int = 3,
        is_writer: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.is_writer = is_writer
        self.barrier = barrier

    # -------------------------------------------------------------- reading

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or — if the pointer is missing — the newest complete
        ``step_*`` directory; None when there is none."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            path = self.root / name
            if not (path / META).is_file():
                raise RuntimeError(
                    f"{pointer} names {name}, which is not a complete checkpoint (no {META})"
                )
            return path
        complete = self.list()
        return complete[-1] if complete else None

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p for p in self.root.iterdir() if p.name.startswith("step_") and (p / META).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        return json.loads((path / META).read_text())

    # -------------------------------------------------------------- writing

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Run ``write(tmp_dir)`` and publish the result as ``step_{step}`` atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = step_dirname(step)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name
        if self.is_writer:
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        write(tmp)
        self.barrier()
        if self.is_writer:
            record = {"step": step, "time": time.time(), **meta}
            (tmp / META).write_text(json.dumps(record, indent=2) + "\n")
            fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                trash = self.root / f"{TMP_PREFIX}old-{name}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
            self._point_latest(name)
            self._prune(keep_name=name)
        self.barrier()
        logger.info("checkpoint written: %s", final)
        return final

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{TMP_PREFIX}{LATEST}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)

    def _prune(self, *, keep_name: str) -> None:
        complete = self.list()
        for path in complete[: max(len(complete) - self.keep, 0)]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- eager format


def save_torch(directory: Path, state: dict[str, Any], *, name: str = "state.pt") -> None:
    path = directory / name
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(directory: Path, *, name: str = "state.pt") -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- xla format


def save_dcp(directory: Path, state: dict[str, Any]) -> None:
    """Sharded ``torch.distributed.checkpoint`` save with torch_xla's SPMD planner."""
    import torch.distributed.checkpoint as dcp
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    dcp.save(
        state,
        storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True),
        planner=SPMDSavePlanner(),
    )


def load_dcp(directory: Path, state: dict[str, Any]) -> None:
    """Load in place into ``state`` (its tensors keep their device and sharding)."""
    import torch.distributed.checkpoint as dcp
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no torch.distributed.checkpoint (.metadata)")
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), planner=SPMDLoadPlanner())
