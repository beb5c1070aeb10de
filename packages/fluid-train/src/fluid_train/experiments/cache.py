"""The experiments' stage cache: each stage's output lives in ``CACHE/<kind>-<key>/``.

The key is a hash of every setting that produced the entry (and of the entries it was built
from), so a changed setting never reuses an old entry. An entry is built in a temporary
directory beside it (one per process) and renamed into place with its ``done.json`` only when
the build finished, so an interrupted run never leaves a half-written entry, and of two
processes building the same entry the first to finish is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import move_into_place

__all__ = ["CACHE_FORMAT", "CacheEntry", "Log", "StageCache", "Stages"]

CACHE_FORMAT = 1  # bump when a stage's output layout changes: old entries are then ignored
Log = Callable[[str], None]


class Stages:
    """Timing and progress lines per stage; remembers which stages came from the cache.

    With ``progress``, a long stage shows a progress bar with its rate and ETA (:meth:`bar`).
    """

    def __init__(self, log: Log, *, progress: bool = False) -> None:
        self.log = log
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    @contextmanager
    def bar(self, total: int, desc: str, unit: str) -> Iterator[Any]:
        """A tqdm bar over ``total`` units (disabled without ``progress``)."""
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False) as bar:
            yield bar

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.log(f"[{name}] {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.log(f"[{name}] done in {time.perf_counter() - start:.1f} s")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cache entry: ``path`` is where it lives once built; ``build`` is the directory to
    write it into (``None`` when it was already built: a hit)."""

    path: Path
    build: Path | None

    @property
    def hit(self) -> bool:
        return self.build is None


class StageCache:
    """Entries of ``root`` keyed by their settings; :meth:`entry` builds one at most once."""

    def __init__(self, root: str | os.PathLike, stages: Stages) -> None:
        self.root = Path(root)
        self.stages = stages

    def key(self, kind: str, settings: dict[str, Any]) -> str:
        text = json.dumps(
            {"format": CACHE_FORMAT, "kind": kind, **settings}, sort_keys=True, default=str
        )
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    @contextmanager
    def entry(self, kind: str, settings: dict[str, Any], *, stage: str) -> Iterator[CacheEntry]:
        """The entry of ``kind`` for ``settings``. On a miss the body writes it into
        ``entry.build``, which becomes ``entry.path`` when the body returns without error."""
        final = self.root / self.key(kind, settings)
        if (final / "done.json").is_file():
            self.stages.cached[stage] = True
            self.stages.log(f"[{stage}] cached: {final}")
            yield CacheEntry(final, None)
            return
        self.stages.cached[stage] = False
        # Each process builds in a folder of its own: study workers sharing a cache may build
        # the same entry at once, and the first to finish is kept.
        build = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        try:
            yield CacheEntry(final, build)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        (build / "done.json").write_text(json.dumps({"kind": kind, **settings}, default=str) + "\n")
        if final.is_dir() and not (final / "done.json").is_file():
            shutil.rmtree(final, ignore_errors=True)  # an old entry without done.json
        try:
            move_into_place(build, final)
        except OSError:
            if not (final / "done.json").is_file():
                raise
            shutil.rmtree(build, ignore_errors=True)  # another process built it first: kept
