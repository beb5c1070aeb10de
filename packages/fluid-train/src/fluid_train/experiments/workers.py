"""Workers sharing one study directory: a worker holds a run while it trains it through an
exclusive ``flock`` on the run's ``worker.lock`` (``claimed``).

The kernel drops the lock when its process dies, however it dies, so a dead worker's run is
free again without asking whether its process still runs, and no two workers can take the same
run: taking the lock is one atomic call. The file also records the holder (pid, host) for the
other workers' log lines. ``flock`` is POSIX; on NFS, Linux maps it onto the server's byte-range
locks, so workers on several hosts share a directory too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["claimed"]

LOCK_FILE = "worker.lock"


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[dict[str, Any] | None]:
    """Try to hold ``run_dir`` for the ``with`` block. Yields None when this process holds it
    (until the block ends), else the holder's record ``{"pid", "host"}``: the run is another
    worker's. The lock file stays; only the lock is given back."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # being written right now
            yield holder or {"pid": "?", "host": "?"}
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield None
    finally:
        os.close(fd)  # closing the only descriptor gives the lock back
