"""When a training loop ends before its last step: a stop signal (preemption) or a time limit.

TPU pods and spot GPUs stop jobs with SIGTERM and a grace period: the first SIGTERM or SIGINT
asks the loop to stop after the current step (the trainer then flushes metrics and writes a
checkpoint), a second one interrupts at once. A wall-clock limit (``TrainConfig.time_limit_s``)
ends the run like its last step. With several processes the decision is collective
(``Backend.any_process``) and taken every ``check_every`` steps, so every host stops at the same
step and a pod never writes a torn checkpoint; one process checks after every step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .backends import Backend

__all__ = ["STOP_CHECK_EVERY", "STOP_SIGNALS", "StopControl"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Steps between the collective stop decisions of a multi-process run (one 4-byte all-reduce).
STOP_CHECK_EVERY = 10


class StopControl:
    """Stop requests of one training run; ``signals()`` installs the handlers for its loop."""

    def __init__(self, backend: Backend, *, check_every: int = STOP_CHECK_EVERY) -> None:
        self.backend = backend
        self.check_every = check_every
        self.signal: int | None = None  # the first stop signal received, if any
        self.deadline: float | None = None

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT request a stop; the previous handlers are back afterwards. Signal
        handlers can only be set from the main thread: elsewhere the defaults stay."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

        def request_stop(signum, frame):
            if self.signal is not None:
                raise KeyboardInterrupt  # the second signal: no more waiting
            self.signal = signum

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def start_clock(self, limit_s: float | None) -> None:
        """The time limit counts from now (the loop's start)."""
        self.deadline = None if limit_s is None else time.perf_counter() + limit_s

    def _agreed(self, step: int, local: bool) -> bool:
        if self.backend.process_count == 1:
            return local
        return step % self.check_every == 0 and self.backend.any_process(local)

    def preempted(self, step: int) -> bool:
        """A stop signal reached this process or another one (decided at the cadence)."""
        return self._agreed(step, self.signal is not None)

    def out_of_time(self, step: int) -> bool:
        """The time limit has passed (here or on another process)."""
        if self.deadline is None:
            return False
        return self._agreed(step, time.perf_counter() >= self.deadline)

    @property
    def reason(self) -> str:
        """What stopped this process: the signal's name, or another process's decision."""
        return signal.Signals(self.signal).name if self.signal is not None else "another process"
