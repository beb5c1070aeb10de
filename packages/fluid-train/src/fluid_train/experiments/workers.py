"""Workers sharing one study directory: a worker takes a run by creating its ``worker.lock``
exclusively (``claim``), and gives it back when the run is finished (``release``). A lock whose
process has died on this host is taken over; one written on another host counts as alive.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["claim", "release"]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the worker that wrote a lock still runs (a lock from another host counts as
    alive: its process cannot be asked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def claim(run_dir: Path) -> dict[str, Any] | None:
    """Take ``run_dir`` for this process (``worker.lock``, created exclusively); a lock whose
    process is gone is taken over. Returns None when taken, else the live holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "worker.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # being written right now: alive
            if holder and not _alive(holder):
                lock.unlink(missing_ok=True)  # its worker died: take the run over
                continue
            return holder or {"pid": "?", "host": "?"}
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return {"pid": "?", "host": "?"}


def release(run_dir: Path) -> None:
    (run_dir / "worker.lock").unlink(missing_ok=True)
