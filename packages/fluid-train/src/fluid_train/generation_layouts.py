"""Where generated images go, written so a prompt is finished exactly when its files are in
place: PNGs per prompt with ``index.jsonl`` and a contact sheet (``PromptFiles``), or GenEval's
official layout assembled under ``.partial/`` and renamed into place (``GenEvalFolders``).
``fluid_train.sampling`` fills them from every process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .atomic import atomic_file, move_into_place

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image


__all__ = ["MAX_SHEET_IMAGES", "GenEvalFolders", "Layout", "PromptFiles"]

MAX_SHEET_IMAGES = 64


# ---------------------------------------------------------------------- output layouts


class Layout(Protocol):
    """Where a prompt's images go, and whether they are already there."""

    out: Path
    prompts: list[str]

    def is_done(self, prompt: int) -> bool: ...

    def write(self, prompt: int, images: Sequence[Image.Image]) -> None: ...

    def finish(self, *, seed: int | None = None) -> None:
        """After every process is done (writer only): indexes, contact sheet, clean-up."""


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG that appears complete or not at all (hidden temp name, then rename)."""
    with atomic_file(path) as f:
        image.save(f, format="PNG")


class PromptFiles:
    """``OUT/{prompt:05}_{sample:02}.png``, ``OUT/index.jsonl`` and ``OUT/grid.png``."""

    def __init__(self, out: str | os.PathLike, prompts: Sequence[str], *, images_per_prompt: int):
        self.out = Path(out)
        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt

    def path(self, prompt: int, sample: int) -> Path:
        return self.out / f"{prompt:05}_{sample:02}.png"

    def is_done(self, prompt: int) -> bool:
        return all(self.path(prompt, k).is_file() for k in range(self.images_per_prompt))

    def write(self, prompt: int, images: Sequence[Image.Image]) -> None:
        for k, image in enumerate(images):
            path = self.path(prompt, k)
            if not path.is_file():  # a sample written before an interruption stays as it is
                _save_png(image, path)

    def files(self) -> list[Path]:
        return [
            self.path(i, k) for i in range(len(self.prompts)) for k in range(self.images_per_prompt)
        ]

    def finish(self, *, seed: int | None = None) -> None:
        with atomic_file(self.out / "index.jsonl", "w") as fp:
            for i, prompt in enumerate(self.prompts):
                for k in range(self.images_per_prompt):
                    record = {"file": self.path(i, k).name, "prompt": prompt, "prompt_index": i,
                              "sample": k, "seed": seed}  # fmt: skip
                    fp.write(json.dumps(record) + "\n")
        shown = self.files()[:MAX_SHEET_IMAGES]
        captions = [self.prompts[i] for i in range(len(self.prompts))
                    for _ in range(self.images_per_prompt)][:MAX_SHEET_IMAGES]  # fmt: skip
        _write_sheet(shown, captions, self.out / "grid.png", columns=self.images_per_prompt)


class GenEvalFolders:
    """GenEval's official layout: ``OUT/{index:05}/metadata.jsonl`` + ``samples/{k:04}.png``.

    A folder is assembled under ``OUT/.partial/`` and renamed into place whole, so a prompt
    folder exists only when it is complete (the official ``evaluate_images.py`` reads only
    numeric folder names and would stop at a folder without ``metadata.jsonl``).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        entries: Sequence[Mapping[str, Any]],
        *,
        images_per_prompt: int,
    ):
        self.out = Path(out)
        self.entries = list(entries)
        self.prompts = [str(e["prompt"]) for e in self.entries]
        self.images_per_prompt = images_per_prompt

    @property
    def staging(self) -> Path:
        return self.out / ".partial"

    def is_done(self, prompt: int) -> bool:
        return (self.out / f"{prompt:05}").is_dir()

    def write(self, prompt: int, images: Sequence[Image.Image]) -> None:
        from fluid_eval import write_sample_folder

        name = f"{prompt:05}"
        if (self.out / name).is_dir():
            return
        stale = self.staging / name
        if stale.exists():  # left by an interrupted run
            shutil.rmtree(stale)
        folder = write_sample_folder(self.staging, prompt, self.entries[prompt], list(images))
        move_into_place(folder, self.out / name)

    def finish(self, *, seed: int | None = None) -> None:
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()
        shown = self.entries[: max(1, MAX_SHEET_IMAGES // self.images_per_prompt)]
        files = [self.out / f"{n:05}" / "samples" / f"{k:04}.png"
                 for n in range(len(shown)) for k in range(self.images_per_prompt)]  # fmt: skip
        captions = [str(e["prompt"]) for e in shown for _ in range(self.images_per_prompt)]
        _write_sheet(files, captions, self.out / "grid.png", columns=self.images_per_prompt)


def _write_sheet(
    files: Sequence[Path], captions: Sequence[str], path: Path, *, columns: int
) -> None:
    from PIL import Image

    from .pipeline import contact_sheet

    images, shown = [], []
    for file, caption in zip(files, captions, strict=True):
        if not file.is_file():  # written by another host onto a disk this one cannot see
            continue
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
        shown.append(caption)
    if not images:
        return
    sheet = contact_sheet(images, shown, columns=columns)
    with atomic_file(path) as f:
        sheet.save(f, format="PNG")
