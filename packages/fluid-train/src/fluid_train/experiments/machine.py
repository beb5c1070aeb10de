"""Process settings for CPU runs of the experiments, made by the command line's entry.

The library never changes process-global torch settings itself; ``fluid demo`` and ``fluid
study`` call :func:`configure_cpu` before they run.
"""

from __future__ import annotations

import os
import time

__all__ = ["auto_threads", "configure_cpu"]


def _busy_cores(window_s: float = 0.5) -> float | None:
    """Cores busy right now (Linux ``/proc/stat`` over ``window_s``); None where unreadable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]  # the aggregate "cpu" line
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """Intra-op threads for this process: the cores not busy now, at least 1.

    On a shared machine, more threads than free cores is much slower than fewer: a training
    step of 64 px shapes-m took 4.3 s with 2 threads and 0.93 s with 1 while another job used
    a core of 2 (OpenMP workers wait on each other at every op). Busy cores are measured over
    half a second (``/proc/stat``), not read from the one-minute load average, which still
    counts a job that just ended (an install right before ``fluid demo``, say); the load
    average is the fallback where ``/proc/stat`` is missing.
    """
    cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(busy)))


def configure_cpu(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default :func:`auto_threads`) and flush subnormal floats
    to zero; returns the thread count. Process-global: for command-line entries."""
    import torch

    threads = threads or auto_threads()
    torch.set_num_threads(threads)
    # Tiny convolutions and MLPs on a CPU meet subnormal floats; flushing them to zero keeps
    # training ~10x faster (measured on the VAE) and changes no result above 1e-38.
    torch.set_flush_denormal(True)
    return threads
