"""Checkpoints that are never half-written, verified when read back, and the resume that reads them.

Layout of ``RUN/checkpoints/``::

    step_00001000/        one complete checkpoint (``meta.json`` written last, inside)
    step_00002000/
    latest                the name of the newest complete checkpoint (a one-line file)

Writing (``CheckpointManager.save``): everything goes into ``.tmp-step_...``; the writer then
records every file of that tree (its relative path, size and SHA-256, streamed in
chunks) in ``meta.json``; files and the directory are fsynced; ``os.replace``
renames it to ``step_...``; then ``latest`` is rewritten through its own temp file + fsync +
``os.replace``. A crash at any point leaves ``latest`` naming the previous complete checkpoint (a
leftover ``.tmp-*`` is removed by the next save). An ``OSError`` while writing (ENOSPC, EIO, ...)
removes the temp directory and raises ``WriteError`` naming the path and the free space; the
previous checkpoint and ``latest`` are untouched. Only checkpoints older than the ``keep`` newest
are deleted, never the one ``latest`` names.

Reading: ``verify(path)`` checks every file ``meta.json`` lists (present, same size, same
checksum). ``CheckpointManager.candidates()`` lists the step directories newest first; the trainer
resumes from the newest one that verifies and warns about each one it skips (it never deletes
them). Checkpoints written before checksums existed (``meta.json`` without ``files``) still load:
only the presence of their data files can be checked, and ``verify`` says so (``legacy``).

Formats: the eager backend writes one ``state.pt`` (``torch.save``; loaded with
``weights_only=True``). The xla backend writes the sharded tensors (model, EMA, optimizer)
with ``torch.distributed.checkpoint`` and torch_xla's SPMD planners — each host writes its own
shards, nothing is gathered — plus a small per-host ``host_{i}.pt`` (step, RNG, data position).
The manifest walks the whole tree, so any backend's files are covered.

Fault injection (tests): ``fault_hook(point, step)`` (module attribute) or the environment
variable ``FLUID_CHECKPOINT_FAULT=POINT[@STEP]`` (``os._exit(FAULT_EXIT)`` there, a crash with no
cleanup) fire at the points of the protocol: ``tmp_created``, ``after_file:REL`` for each file as
the manifest records it (the writer has finished; ``meta.json`` is the last), ``before_rename``,
``before_latest``. ``POINT`` may be an ``fnmatch`` pattern.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import fsync_dir, fsync_tree, write_text_atomic

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Verification",
    "WriteError",
    "disk_free",
    "file_checksum",
    "fsync_dir",
    "fsync_tree",
    "load_dcp",
    "load_torch",
    "manifest",
    "save_dcp",
    "save_torch",
    "verify",
]

logger = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
TMP_PREFIX = ".tmp-"
CHECKSUM = "sha256"
STEP_DIR = re.compile(r"^step_(\d{8,})$")

FAULT_ENV = "FLUID_CHECKPOINT_FAULT"
FAULT_EXIT = 86  # the exit status of a crash injected through FAULT_ENV
fault_hook: Callable[[str, int], None] | None = None  # tests: called at every protocol point


def _fault(point: str, step: int) -> None:
    if fault_hook is not None:
        fault_hook(point, step)
    spec = os.environ.get(FAULT_ENV)
    if spec:
        pattern, _, at = spec.partition("@")
        if fnmatch.fnmatchcase(point, pattern) and (not at or int(at) == step):
            os._exit(FAULT_EXIT)


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be resumed (each one tried is listed in the message)."""


class WriteError(RuntimeError):
    """Writing a checkpoint or an export failed (ENOSPC, EIO, ...); the previous state is intact."""

    def __init__(self, what: str, path: Path, cause: OSError | None, kept: str) -> None:
        self.path, self.cause = Path(path), cause
        self.free = disk_free(self.path)
        if cause is None:
            reason = "it failed on another process"
        else:
            code = errno.errorcode.get(cause.errno or 0, "")
            reason = f"{cause.strerror or cause}" + (f" ({code})" if code else "")
        free = "unknown" if self.free is None else _format_bytes(self.free)
        super().__init__(
            f"could not write {what} {path}: {reason}; {free} free on that filesystem; {kept}"
        )


def disk_free(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------- verification


def file_checksum(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (``hashlib.file_digest`` is Python 3.11+;
    the packages support 3.10)."""
    digest = hashlib.new(CHECKSUM)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` but ``meta.json``, sorted."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != META:
                found.append(rel)
    return sorted(found)


def manifest(root: Path, *, on_file: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{rel: {"size": bytes, "sha256": hex}}`` of every file under ``root`` (but meta.json)."""
    files = {}
    for rel in _files(root):
        path = root / rel
        files[rel] = {"size": path.stat().st_size, CHECKSUM: file_checksum(path)}
        if on_file is not None:
            on_file(rel)
    return files


@dataclass(frozen=True, slots=True)
class Verification:
    """What ``verify`` found: ``problems`` is empty when the checkpoint is whole."""

    path: Path
    step: int | None
    problems: tuple[str, ...]
    files: int  # files checked (size and checksum), or found (legacy)
    bytes: int
    legacy: bool  # meta.json holds no checksums (written before they existed)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        if self.legacy:
            return (
                f"no checksums (written before verified checkpoints): {self.files} data file(s) "
                "present, contents not verified"
            )
        return f"{self.files} file(s) match their size and {CHECKSUM}"


# The data files a checkpoint of each format must hold (for checkpoints without a manifest).
_LEGACY_DATA = ("state.pt", ".metadata")


def verify(path: Path) -> Verification:
    """Check a checkpoint directory against its ``meta.json`` manifest (never raises)."""
    path = Path(path)
    match = STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else None

    def result(problems, files=0, size=0, legacy=False):
        return Verification(path, step, tuple(problems), files, size, legacy)

    if not path.is_dir():
        return result([f"{path} does not exist"])
    meta_path = path / META
    if not meta_path.is_file():
        return result([f"incomplete: no {META} (the write did not finish)"])
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return result([f"{META} is unreadable ({error})"])
    if isinstance(meta.get("step"), int):
        step = meta["step"]
    listed = meta.get("files")
    if listed is None:  # written before checksums: only presence and non-emptiness can be checked
        present = [name for name in _LEGACY_DATA if (path / name).is_file()]
        data = [path / rel for rel in _files(path)]
        size = sum(p.stat().st_size for p in data)
        problems = []
        if not present:
            problems.append(f"no data file ({' or '.join(_LEGACY_DATA)})")
        problems += [
            f"{p.relative_to(path).as_posix()} is empty" for p in data if not p.stat().st_size
        ]
        return result(problems, len(data), size, legacy=True)
    problems, size = [], 0
    for rel, entry in sorted(listed.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        actual = file.stat().st_size
        size += actual
        if actual != entry.get("size"):
            problems.append(f"{rel} has {actual} bytes; {META} records {entry.get('size')}")
        elif file_checksum(file) != entry.get(CHECKSUM):
            problems.append(f"{rel} fails the {CHECKSUM} checksum {META} records (corrupt)")
    return result(problems, len(listed), size)


# ---------------------------------------------------------------------- the manager


class CheckpointManager:
    """Atomic step directories under ``root`` plus the ``latest`` pointer.

    ``is_writer`` is False on every host but one in a multi-host run: all hosts write their
    shards into the temp directory; the writer alone records the manifest, renames the directory
    and moves ``latest``. ``agree(failed) -> bool`` (the backend's ``any_process``) separates the
    phases: it is a collective, so it is also the barrier, and it makes every process stop when
    a write failed on any of them (``barrier`` is kept for callers that pass only that).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep: int = 3,
        is_writer: bool = True,
        barrier: Callable[[], None] = lambda: None,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.is_writer = is_writer
        self.barrier = barrier
        self.agree = agree if agree is not None else self._barrier_agree

    def _barrier_agree(self, failed: bool) -> bool:
        self.barrier()
        return failed

    # -------------------------------------------------------------- reading

    def resume_newest(
        self, load: Callable[[Path], None], candidates: list[Path], *, retry_failed_load: bool
    ) -> Path:
        """Resume (``load``) from the newest of ``candidates`` that verifies; warn about each
        one skipped.

        The writer verifies (one read of the files); ``agree`` makes every process skip the
        same ones. A load that fails anyway (``CheckpointError``, e.g. a checkpoint without
        checksums) moves on to the next one with ``retry_failed_load`` (a single-process run);
        otherwise it is raised (a collective load cannot be abandoned by one process).
        """
        named = self.latest()
        tried: list[str] = []
        for path in candidates:
            problem = None
            if self.is_writer:
                check = verify(path)
                problem = None if check.ok else check.describe()
                if check.ok and check.legacy:
                    logger.warning("checkpoint %s: %s", path, check.describe())
            if self.agree(problem is not None):
                problem = problem or "rejected on the writer process"
                tried.append(f"{path.name}: {problem}")
                logger.warning("cannot resume from %s: %s; trying an older checkpoint", path, problem)  # fmt: skip
                continue
            try:
                load(path)
            except CheckpointError as error:
                if not retry_failed_load:
                    raise
                tried.append(f"{path.name}: {error}")
                logger.warning("cannot resume from %s: %s; trying an older checkpoint", path, error)  # fmt: skip
                continue
            if named is not None and path != named:
                logger.warning(
                    "resumed from %s, the newest checkpoint that verifies; `latest` names %s",
                    path.name,
                    named.name,
                )
            return path
        listing = "\n  ".join(tried)
        raise CheckpointError(
            f"cannot resume {self.root.parent}: no checkpoint in {self.root} verifies "
            f"(none was deleted); tried, newest first:\n  {listing}"
        )

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names (complete or not: see ``verify``), or — if the pointer
        is missing — the newest complete ``step_*`` directory; None when there is none."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if name:
                return self.root / name
        complete = self.list()
        return complete[-1] if complete else None

    def list(self) -> list[Path]:
        """Complete checkpoints (those holding ``meta.json``), oldest first."""
        return [p for p in reversed(self.candidates()) if (p / META).is_file()]

    def candidates(self) -> list[Path]:
        """Every ``step_*`` directory, complete or not, newest step first (the resume order)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True) if p.is_dir()]

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        return json.loads((path / META).read_text())

    # -------------------------------------------------------------- writing

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Run ``write(tmp_dir)`` on every process and publish the result as ``step_{step}``
        atomically; raises ``WriteError`` (everything removed but the previous checkpoint) when
        an ``OSError`` interrupts it on any process."""
        name = step_dirname(step)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name

        def begin() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            tmp.mkdir()
            _fault("tmp_created", step)

        self._phase("checkpoint", tmp, begin, writer_only=True)
        self._phase("checkpoint", tmp, lambda: write(tmp))
        self._phase(
            "checkpoint", tmp, lambda: self._publish(step, tmp, final, meta), writer_only=True
        )
        logger.info("checkpoint written: %s", final)
        return final

    def _phase(
        self, what: str, tmp: Path, action: Callable[[], None], *, writer_only=False
    ) -> None:
        error: OSError | None = None
        if self.is_writer or not writer_only:
            try:
                action()
            except OSError as caught:  # anything else (a crash, a bug) propagates untouched
                error = caught
        if self.agree(error is not None):
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.root / f"{TMP_PREFIX}{LATEST}").unlink(missing_ok=True)
            previous = self.latest() if self.root.is_dir() else None
            kept = (
                f"the previous checkpoint {previous.name} and `latest` are intact"
                if previous is not None
                else "no earlier checkpoint exists"
            )
            raise WriteError(
                what, tmp, error, f"{kept}; the partial {tmp.name} was removed"
            ) from error

    def _publish(self, step: int, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        files = manifest(tmp, on_file=lambda rel: _fault(f"after_file:{rel}", step))
        record = {"step": step, "time": time.time(), **meta, "checksum": CHECKSUM, "files": files}
        with open(tmp / META, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        _fault(f"after_file:{META}", step)
        fsync_tree(tmp)
        _fault("before_rename", step)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            if verify(final).ok:
                trash = self.root / f"{TMP_PREFIX}old-{final.name}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:  # a damaged one is kept aside for inspection, never deleted here
                aside = self.root / f"{final.name}.unverified-{int(time.time())}"
                os.replace(final, aside)
                os.replace(tmp, final)
                logger.warning("kept the damaged %s as %s", final.name, aside.name)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        _fault("before_latest", step)
        self._point_latest(final.name)
        self._prune(keep_name=final.name)

    def _point_latest(self, name: str) -> None:
        write_text_atomic(self.root / LATEST, name + "\n")

    def _prune(self, *, keep_name: str) -> None:
        complete = self.list()
        for path in complete[: max(len(complete) - self.keep, 0)]:
            if path.name != keep_name:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- eager format


def save_torch(directory: Path, state: dict[str, Any], *, name: str = "state.pt") -> None:
    import torch  # here, so that listing/verifying checkpoints needs no torch

    path = directory / name
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(directory: Path, *, name: str = "state.pt") -> dict[str, Any]:
    import torch

    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
    ) as error:  # truncated or garbled zip
        raise CheckpointError(f"could not read checkpoint file {path}: {error}") from error


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
