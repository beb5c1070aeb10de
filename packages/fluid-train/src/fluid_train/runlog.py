"""What a training run writes about itself: ``train.log``, ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` holds one JSON object per logged step (DESIGN.md §12: at least ``step`` and
``loss``, and ``compiles`` on the xla backend). Only the writer process (host or rank 0)
writes metrics; every process logs to ``train.log``. On resume, lines logged after the
checkpoint the run continues from are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "RunLog", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
_SCALARS = ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged steps of a run directory's ``metrics.jsonl``, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """The run's log file handler (from construction), metrics and TensorBoard (from ``start``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.writer = False  # set by start(): only the writer process writes metrics
        self.metrics = self.run_dir / METRICS_FILE
        self._handler = logging.FileHandler(self.run_dir / "train.log")
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root = logging.getLogger("fluid_train")
        root.addHandler(self._handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._tensorboard: Any = None

    def start(self, step: int, *, writer: bool) -> None:
        """Continue after ``step``: drop later metrics lines; open TensorBoard where installed."""
        self.writer = writer
        if not writer:
            return
        if self.metrics.is_file():
            logged = read_metrics(self.run_dir)
            kept = [record for record in logged if record["step"] <= step]
            if len(kept) != len(logged):
                self.metrics.write_text("".join(json.dumps(record) + "\n" for record in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl only
            return
        self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one logged step (writer only)."""
        if not self.writer:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            step = record["step"]
            for key in _SCALARS:
                self._tensorboard.add_scalar(f"train/{key}", record[key], step)
            self._tensorboard.add_scalar("data/skipped", sum(record["skipped"].values()), step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        logging.getLogger("fluid_train").removeHandler(self._handler)
        self._handler.close()
