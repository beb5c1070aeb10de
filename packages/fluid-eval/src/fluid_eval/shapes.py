"""The shapes world: flat shapes on a black canvas, captioned with GenEval's prompt grammar.

A scene is a handful of non-overlapping circles, squares and triangles in a six-colour
palette. Training captions and evaluation prompts come from one grammar — GenEval's six task
families (single object, two objects, counting, colours, position, colour attribution) plus
richer compositions such as "a photo of two red circles left of a blue square" — and every
caption is the ``prompt`` of a GenEval metadata entry, so the same rules that score generated
images also certify that a training caption is true of its own scene.

Geometry is resolution-independent: centres and sizes are fractions of the image side, with
``y`` pointing down as in image coordinates. Every shape fills a square bounding box (the
triangle points up, base = height = size), so the detector can tell shapes apart by how much
of their box they fill and by where their mass sits.

Design choices that keep the world learnable in minutes and detectable without ambiguity:
- the background is black, so a blurred edge is a dimmed copy of the object's colour and the
  colour stays recognisable from its chromaticity (rgb / max channel);
- the palette's colours are at least 60 degrees of hue apart (plus white);
- objects are 14-22 px at 64 px (at least two tokens of an 8x8 token grid across) and keep a
  4 px gap, so generated images that blur edges still give one blob per object.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .geneval import RELATIONS, TASKS, load_metadata, relative_position, write_sample_folder

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "yellow": (240, 220, 30),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "purple": (190, 40, 230),
    "white": (240, 240, 240),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
DEFAULT_SIZE = 64
MAX_OBJECTS = 4
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
# Families a training caption is drawn from: GenEval's six, plus free compositions.
TRAINING_FAMILIES: tuple[str, ...] = (*TASKS, "composite")


@dataclass(frozen=True, slots=True)
class ShapeObject:
    """One flat shape. ``center`` is (x, y) and ``size`` the side of its bounding square, all
    as fractions of the image side."""

    shape: str
    color: str
    center: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}; got {self.shape!r}")
        if self.color not in PALETTE:
            raise ValueError(f"color must be one of {COLORS}; got {self.color!r}")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(
                f"size must be a fraction of the image side in (0, 1]; got {self.size}"
            )

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in image fractions."""
        (x, y), half = self.center, self.size / 2
        return (x - half, y - half, x + half, y + half)


@dataclass(frozen=True, slots=True)
class Scene:
    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        try:
            objects = tuple(
                ShapeObject(
                    o["shape"],
                    o["color"],
                    (float(o["center"][0]), float(o["center"][1])),
                    float(o["size"]),
                )
                for o in data["objects"]
            )
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(
                "scene must be {'objects': [{'shape', 'color', 'center': [x, y], 'size'}, ...]}; "
                f"got {data!r}"
            ) from error
        return cls(objects)


class TrainingPair(NamedTuple):
    scene: Scene
    caption: str
    metadata: dict[str, Any]


@dataclass(kw_only=True, frozen=True, slots=True)
class LayoutConfig:
    """How scenes are laid out, in fractions of the image side (defaults given at 64 px)."""

    min_size: float = 14 / 64
    max_size: float = 22 / 64
    gap: float = 4 / 64  # between the bounding boxes of two objects
    border: float = 2 / 64  # between a bounding box and the image edge
    # Relations are placed so they hold under a stricter threshold than GenEval's 0.1, so a
    # detector's slightly different boxes cannot flip them.
    position_threshold: float = 0.2
    max_objects: int = MAX_OBJECTS
    # When set, every object lies inside its own cell of a ``cells x cells`` grid (sizes and
    # gap still in image fractions; the gap is kept between an object and its cell's edges, so
    # objects in neighbouring cells are a gap apart). Matching the grid to a tokenizer's token
    # grid makes every object one token.
    cells: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.min_size <= self.max_size <= 1.0:
            raise ValueError(
                f"layout sizes must satisfy 0 < min_size <= max_size <= 1; "
                f"got min_size={self.min_size}, max_size={self.max_size}"
            )
        if self.cells is not None:
            if self.cells < 1 or self.cells * self.cells < self.max_objects:
                raise ValueError(
                    f"layout cells must be >= 1 with cells**2 >= max_objects={self.max_objects}; "
                    f"got cells={self.cells}"
                )
            if self.max_size + self.gap > 1.0 / self.cells + 1e-9:
                raise ValueError(
                    f"layout max_size + gap must fit a cell (1/cells = {1.0 / self.cells:.4f}); "
                    f"got max_size={self.max_size}, gap={self.gap}"
                )

    @classmethod
    def in_cells(cls, cells: int, **overrides: Any) -> LayoutConfig:
        """One object per cell of a ``cells x cells`` grid: sizes 0.72 to 0.75 of a cell and a
        quarter-cell gap. At 32 px with 4 cells that is 5.8-6 px objects, 2 px apart: the
        smallest the detector scores above GenEval's counting threshold (0.9) every time
        (at 5.5 px, 12 of 2,000 training scenes missed a triangle)."""
        cell = 1.0 / cells
        defaults = {"min_size": 0.72 * cell, "max_size": 0.75 * cell, "gap": 0.25 * cell}
        return cls(cells=cells, **{**defaults, **overrides})


# --------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = DEFAULT_SIZE, *, supersample: int = 4) -> np.ndarray:
    """Draw a scene. Returns uint8 ``[size, size, 3]``; antialiased by drawing at
    ``size * supersample`` and box-filtering down (``supersample=1``: hard edges)."""
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels; got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1; got {supersample}")
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * big for v in obj.box)
        fill = PALETTE[obj.color]
        # PIL's boxes include their last pixel: shrink by one so a shape covers exactly
        # [x0, x1) x [y0, y1) of the supersampled grid.
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    if supersample > 1:
        canvas = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_image(scene: Scene, size: int = DEFAULT_SIZE, *, supersample: int = 4) -> Image.Image:
    """:func:`render` as a PIL image."""
    return Image.fromarray(render(scene, size, supersample=supersample))


# --------------------------------------------------------------------------------------------
# Caption grammar (GenEval's prompt wording)


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(noun: str) -> str:
    return f"{noun}es" if noun.endswith("s") else f"{noun}s"


def noun_phrase(shape: str, count: int = 1, color: str | None = None) -> str:
    """'a circle', 'a red circle', 'three circles', 'two red circles'."""
    noun = shape if color is None else f"{color} {shape}"
    if count == 1:
        return with_article(noun)
    if count not in NUMBER_WORDS:
        raise ValueError(f"count must be in {sorted(NUMBER_WORDS)}; got {count}")
    words = plural(shape) if color is None else f"{color} {plural(shape)}"
    return f"{NUMBER_WORDS[count]} {words}"


def prompt_for(include: Sequence[Mapping[str, Any]]) -> str:
    """The caption of a GenEval ``include`` list: groups joined by 'and', or 'A <relation> B'
    when the second group carries a position relative to the first (GenEval's order)."""
    phrases = [noun_phrase(g["class"], g["count"], g.get("color")) for g in include]
    positioned = [i for i, g in enumerate(include) if "position" in g]
    if not positioned:
        return "a photo of " + " and ".join(phrases)
    if len(include) != 2 or positioned != [1] or include[1]["position"][1] != 0:
        raise ValueError(
            "a positional caption needs exactly two groups, the second placed relative to the "
            f"first; got include={list(include)!r}"
        )
    return f"a photo of {phrases[1]} {include[1]['position'][0]} {phrases[0]}"


def make_metadata(tag: str, include: list[dict[str, Any]]) -> dict[str, Any]:
    """A GenEval metadata entry, key order as the official ``create_prompts.py``: tag, include,
    exclude (when a group's count is > 1: no more than that many), prompt."""
    metadata: dict[str, Any] = {"tag": tag, "include": include}
    exclude = [{"class": g["class"], "count": g["count"] + 1} for g in include if g["count"] > 1]
    if exclude:
        metadata["exclude"] = exclude
    metadata["prompt"] = prompt_for(include)
    return metadata


def _group(shape: str, count: int = 1, color: str | None = None) -> dict[str, Any]:
    group: dict[str, Any] = {"class": shape, "count": count}
    if color is not None:
        group["color"] = color
    return group


def _choice(rng: np.random.Generator, options: Sequence[str], k: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def sample_metadata(family: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw one GenEval metadata entry of a family (one of :data:`TRAINING_FAMILIES`)."""
    if family == "single_object":
        return make_metadata(family, [_group(*_choice(rng, SHAPES))])
    if family == "two_object":
        a, b = _choice(rng, SHAPES, 2)
        return make_metadata(family, [_group(a), _group(b)])
    if family == "counting":
        return make_metadata(family, [_group(_choice(rng, SHAPES)[0], int(rng.integers(2, 5)))])
    if family == "colors":
        return make_metadata(family, [_group(_choice(rng, SHAPES)[0], 1, _choice(rng, COLORS)[0])])
    if family == "position":
        a, b = _choice(rng, SHAPES, 2)
        rel = _choice(rng, RELATIONS)[0]
        return make_metadata(family, [_group(b), {**_group(a), "position": [rel, 0]}])
    if family == "color_attr":
        a, b = _choice(rng, SHAPES, 2)
        ca, cb = _choice(rng, COLORS, 2)
        return make_metadata(family, [_group(a, 1, ca), _group(b, 1, cb)])
    if family == "composite":
        # One or two groups of distinct shapes (GenEval's rules score a class once), counts
        # 1-3 with at most MAX_OBJECTS objects, colours sometimes named, sometimes a relation.
        num_groups = int(rng.integers(1, 3))
        shapes = _choice(rng, SHAPES, num_groups)
        counts = [int(rng.integers(1, 4)) for _ in shapes]
        while sum(counts) > MAX_OBJECTS:
            counts[int(np.argmax(counts))] -= 1
        groups = [
            _group(s, c, _choice(rng, COLORS)[0] if rng.random() < 0.5 else None)
            for s, c in zip(shapes, counts, strict=True)
        ]
        if num_groups == 2 and rng.random() < 0.5:
            groups[1]["position"] = [_choice(rng, RELATIONS)[0], 0]
        return make_metadata(family, groups)
    raise ValueError(f"family must be one of {TRAINING_FAMILIES}; got {family!r}")


# --------------------------------------------------------------------------------------------
# Scenes from prompts


def _check_renderable(metadata: Mapping[str, Any], layout: LayoutConfig) -> list[Mapping[str, Any]]:
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"metadata needs a non-empty 'include' list; got {dict(metadata)!r}")
    seen: set[str] = set()
    for i, group in enumerate(include):
        shape, count = group.get("class"), group.get("count")
        if shape not in SHAPES:
            raise ValueError(f"include[{i}] class must be one of {SHAPES}; got {shape!r}")
        if shape in seen:
            raise ValueError(f"include[{i}] repeats class {shape!r}; each class may appear once")
        seen.add(shape)
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"include[{i}] count must be an integer >= 1; got {count!r}")
        if "color" in group and group["color"] not in PALETTE:
            raise ValueError(f"include[{i}] color must be one of {COLORS}; got {group['color']!r}")
        if "position" in group:
            pos = group["position"]
            ok = isinstance(pos, list | tuple) and len(pos) == 2
            if (
                not ok
                or pos[0] not in RELATIONS
                or not isinstance(pos[1], int)
                or not 0 <= pos[1] < i
            ):
                raise ValueError(
                    f"include[{i}] position must be [relation in {RELATIONS}, index of an earlier "
                    f"group]; got {group['position']!r}"
                )
    for ex in metadata.get("exclude", []):
        for group in include:
            if group["class"] == ex.get("class") and group["count"] >= ex.get("count", 0):
                raise ValueError(f"include {group!r} contradicts exclude {ex!r}")
    total = sum(g["count"] for g in include)
    if total > layout.max_objects:
        raise ValueError(
            f"metadata asks for {total} objects; the world draws at most {layout.max_objects}"
        )
    return include


def _apart(box: tuple[float, ...], other: tuple[float, ...], gap: float) -> bool:
    return (
        box[0] >= other[2] + gap
        or other[0] >= box[2] + gap
        or box[1] >= other[3] + gap
        or other[1] >= box[3] + gap
    )


def scene_from_prompt(
    metadata: Mapping[str, Any],
    rng: np.random.Generator | int,
    *,
    layout: LayoutConfig = LayoutConfig(),
) -> Scene:
    """A ground-truth scene satisfying a GenEval metadata entry: exactly ``count`` objects per
    ``include`` group, in the group's colour (random per object when none is named), placed so
    each positioned object stands in its relation to every object of its target group."""
    rng = np.random.default_rng(rng)
    include = _check_renderable(metadata, layout)
    for attempt in range(200):
        # Shrink objects on repeated failures so crowded layouts (four objects) always fit.
        shrink = 1.0 - 0.4 * attempt / 200
        placed: list[list[ShapeObject]] = []
        for group in include:
            members: list[ShapeObject] = []
            targets = placed[group["position"][1]] if "position" in group else []
            for _ in range(group["count"]):
                obj = _place(
                    group, targets, [o for g in placed for o in g] + members, rng, layout, shrink
                )
                if obj is None:
                    break
                members.append(obj)
            if len(members) < group["count"]:
                break
            placed.append(members)
        else:
            return Scene(tuple(o for g in placed for o in g))
    raise RuntimeError(f"could not lay out a scene for {metadata.get('prompt')!r} in 200 attempts")


def _place(
    group: Mapping[str, Any],
    targets: list[ShapeObject],
    others: list[ShapeObject],
    rng: np.random.Generator,
    layout: LayoutConfig,
    shrink: float,
) -> ShapeObject | None:
    for _ in range(100):
        size = rng.uniform(layout.min_size, layout.max_size)
        if layout.cells is None:  # cells always have room: only free layouts shrink
            size = max(layout.min_size * 0.8, size * shrink)
            lo, hi = layout.border + size / 2, 1.0 - layout.border - size / 2
            center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        else:
            center = _center_in_cell(rng, layout.cells, size, layout.gap)
        color = group.get("color") or str(_choice(rng, COLORS)[0])
        obj = ShapeObject(group["class"], color, center, float(size))
        if not all(_apart(obj.box, o.box, layout.gap) for o in others):
            continue
        rel = group["position"][0] if "position" in group else None
        if rel is not None and not all(
            rel in relative_position(obj.box, t.box, threshold=layout.position_threshold)
            for t in targets
        ):
            continue
        return obj
    return None


def _center_in_cell(
    rng: np.random.Generator, cells: int, size: float, gap: float
) -> tuple[float, float]:
    """A centre in a random cell, so the object's box keeps ``gap / 2`` from the cell's edges
    (objects in different cells are then at least ``gap`` apart)."""
    cell = 1.0 / cells
    col, row = (int(i) for i in rng.integers(cells, size=2))
    slack = max(cell - size - gap, 0.0) / 2
    dx, dy = rng.uniform(-slack, slack, size=2) if slack > 0 else (0.0, 0.0)
    return (float((col + 0.5) * cell + dx), float((row + 0.5) * cell + dy))


def sample_training_pair(
    rng: np.random.Generator | int,
    *,
    families: Sequence[str] = TRAINING_FAMILIES,
    layout: LayoutConfig = LayoutConfig(),
) -> TrainingPair:
    """A (scene, caption, metadata) triple: a family uniformly from ``families``, a metadata
    entry of it, and a scene drawn to satisfy it. The caption is the metadata's prompt."""
    rng = np.random.default_rng(rng)
    family = families[int(rng.integers(len(families)))]
    metadata = sample_metadata(family, rng)
    return TrainingPair(
        scene_from_prompt(metadata, rng, layout=layout), metadata["prompt"], metadata
    )


def evaluation_metadata(num: int, seed: int = 43) -> list[dict[str, Any]]:
    """A fixed, balanced suite of ``num`` evaluation prompts: the six GenEval families in
    GenEval's order, ``num // 6`` each (the first ``num % 6`` families get one more).
    Single-object prompts cycle through the shapes so every shape is asked for equally."""
    if num < 1:
        raise ValueError(f"num must be >= 1; got {num}")
    rng = np.random.default_rng(seed)
    entries: list[dict[str, Any]] = []
    for f, family in enumerate(TASKS):
        count = num // len(TASKS) + (1 if f < num % len(TASKS) else 0)
        if family == "single_object":
            order = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
            entries.extend(
                make_metadata(family, [_group(order[i % len(order)])]) for i in range(count)
            )
        else:
            entries.extend(sample_metadata(family, rng) for _ in range(count))
    return entries


# --------------------------------------------------------------------------------------------
# Files: training shards, evaluation prompts, ground-truth renders


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    out_dir: str | os.PathLike[str],
    num: int,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    shard_size: int = 1000,
    *,
    families: Sequence[str] = TRAINING_FAMILIES,
    layout: LayoutConfig = LayoutConfig(),
) -> list[Path]:
    """Write ``num`` training pairs as webdataset shards in the img2dataset layout:
    ``00000.tar, 00001.tar, ...`` holding ``{key}.png``, ``{key}.txt`` (the caption) and
    ``{key}.json`` (caption, GenEval metadata and the scene). Sample ``i`` depends only on
    ``(seed, i)``, not on the shard size. Each shard is written to a temporary name and renamed,
    so an interrupted run never leaves a truncated ``.tar``."""
    if num < 1 or shard_size < 1:
        raise ValueError(f"num and shard_size must be >= 1; got num={num}, shard_size={shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = len(str(shard_size - 1))
    paths: list[Path] = []
    for shard, start in enumerate(range(0, num, shard_size)):
        path = out / f"{shard:05d}.tar"
        partial = path.with_name(path.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + shard_size, num)):
                pair = sample_training_pair(
                    np.random.default_rng([seed, i]), families=families, layout=layout
                )
                key = f"{shard:05d}{i - start:0{digits}d}"
                record = {
                    "key": key,
                    "caption": pair.caption,
                    "metadata": pair.metadata,
                    "scene": pair.scene.to_dict(),
                    "size": size,
                    "seed": seed,
                    "index": i,
                }
                _tar_add(tar, f"{key}.png", _png_bytes(render(pair.scene, size)))
                _tar_add(tar, f"{key}.txt", pair.caption.encode())
                _tar_add(tar, f"{key}.json", json.dumps(record).encode())
        os.replace(partial, path)
        paths.append(path)
    return paths


def write_prompts(
    path: str | os.PathLike[str], num: int = 96, seed: int = 43
) -> list[dict[str, Any]]:
    """Write :func:`evaluation_metadata` as GenEval's ``evaluation_metadata.jsonl`` (one
    ``json.dumps`` line per prompt, as the official ``create_prompts.py`` prints them).
    Unlike the official suite, prompts are not de-duplicated: the world's grammar is small,
    and a repeated prompt simply adds samples to its task (GenEval scores per image)."""
    entries = evaluation_metadata(num, seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return entries


def render_metadata(
    metadata_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    n_samples: int = 4,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    layout: LayoutConfig = LayoutConfig(),
) -> Path:
    """Render ground-truth scenes for every prompt of a GenEval metadata file into GenEval's
    output layout (``<out>/00000/metadata.jsonl``, ``<out>/00000/samples/0000.png``, ...).
    Sample ``k`` of prompt ``n`` depends only on ``(seed, n, k)``."""
    entries = load_metadata(metadata_file)
    out = Path(out_dir)
    for n, metadata in enumerate(entries):
        scenes = [
            scene_from_prompt(metadata, np.random.default_rng([seed, n, k]), layout=layout)
            for k in range(n_samples)
        ]
        write_sample_folder(out, n, metadata, [render_image(s, size) for s in scenes])
    return out
