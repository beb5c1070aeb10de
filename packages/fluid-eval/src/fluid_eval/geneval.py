"""GenEval (Ghosh et al., 2023): object-focused text-to-image alignment, with any detector.

Reads GenEval's ``evaluation_metadata.jsonl``, writes and reads its output layout, and scores
images with the rules of the official ``evaluation/evaluate_images.py``:

- detections per class are sorted by confidence and kept above ``threshold`` (``counting``
  prompts: ``counting_threshold``), at most ``max_objects`` per class, optional box NMS;
- every ``include`` clause must hold (AND): at least ``count`` objects of the class; with a
  ``color``, the ``count`` most confident of them all have that colour; with a
  ``position = [relation, group]``, each of them stands in that relation to every object
  matched by the earlier clause ``group``, judged on box centres with a dead zone of
  ``position_threshold`` times the summed box sizes;
- any ``exclude`` clause fails the image when at least ``count`` objects of its class remain;
- a task's score is the fraction of its images judged correct; overall = mean of task scores.

Layout (``<out>/00000/metadata.jsonl`` holding the prompt's metadata line as ``json.dump``
writes it, without a newline; ``<out>/00000/samples/0000.png, 0001.png, ...``) is the one the
official README documents and its evaluator reads (any ``\\d+.png`` sample name).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

TASKS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# The colour names GenEval's CLIP colour classifier chooses from (order used in its reasons).
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
_SAMPLE_NAME = re.compile(r"\d+\.png")


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object. ``box`` = (x0, y0, x1, y1) in pixels; ``score`` = confidence;
    ``color`` = colour name, or None for a detector that does not judge colour."""

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    color: str | None = None
    centroid: tuple[float, float] | None = None
    area: float | None = None


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: Image.Image) -> Sequence[Detection]: ...


@runtime_checkable
class Generator(Protocol):
    """Anything that draws images for prompts: PIL images, or a ``[B, 3, H, W]`` tensor in
    ``[-1, 1]``, one per prompt in order."""

    def generate(self, prompts: list[str]) -> Any: ...


@dataclass(kw_only=True, frozen=True, slots=True)
class GenEvalConfig:
    """The official evaluator's options (``--options key=value``) with their defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 = no NMS
    position_threshold: float = 0.1


# --------------------------------------------------------------------------------------------
# The rules


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], *, threshold: float = 0.1
) -> set[str]:
    """Relations of box A to box B: centre offset, shrunk per axis by ``threshold`` times the
    summed box sizes, then a relation holds when its axis carries over half of the offset."""
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(
        2, 2, 2
    )  # [obj, corner, xy]
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the official evaluator's inclusive-pixel (+1) convention."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area(
        [
            max(box_a[0], box_b[0]),
            max(box_a[1], box_b[1]),
            min(box_a[2], box_b[2]),
            min(box_a[3], box_b[3]),
        ]
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_objects(
    detections: Iterable[Detection], tag: str, config: GenEvalConfig = GenEvalConfig()
) -> dict[str, list[Detection]]:
    """Per class: most confident first, above the threshold, at most ``max_objects``, NMS."""
    threshold = config.counting_threshold if tag == "counting" else config.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    selected: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        ordering = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)
        ordering = ordering[: config.max_objects]
        kept: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            kept.append(best)
            if config.max_overlap < 1:
                ordering = [d for d in ordering if box_iou(best.box, d.box) < config.max_overlap]
        if kept:
            selected[label] = kept
    return selected


def evaluate(
    objects: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    config: GenEvalConfig = GenEvalConfig(),
) -> tuple[bool, str]:
    """GenEval's verdict on selected objects: (correct, reason) — include clauses combine
    with AND, exclude clauses with OR; colour and position look at the most confident ones."""
    correct = True
    reason: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        classname, count = req["class"], req["count"]
        matched = True
        found = list(objects.get(classname, []))[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    names = [c for c in GENEVAL_COLORS if c in colors]
                    names += sorted(
                        {c for c in colors if c is not None and c not in GENEVAL_COLORS}
                    )
                    reason.append(
                        f"expected {req['color']} {classname}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in names)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                targets = matched_groups[target_group]
                if targets is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in targets:
                            true_rels = relative_position(
                                obj.box, target.box, threshold=config.position_threshold
                            )
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(
                f"expected {classname}<{req['count']}, found {len(objects.get(classname, []))}"
            )
    return correct, "\n".join(reason)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class ImageResult:
    filename: str
    tag: str
    prompt: str
    correct: bool
    reason: str
    metadata: dict[str, Any]
    detections: dict[str, list[list[float]]]  # class -> boxes [x0, y0, x1, y1, score]

    def to_official(self) -> dict[str, Any]:
        """One line of the official ``results.jsonl`` (``metadata``/``details`` as JSON text)."""
        return {
            "filename": self.filename,
            "tag": self.tag,
            "prompt": self.prompt,
            "correct": self.correct,
            "reason": self.reason,
            "metadata": json.dumps(self.metadata),
            "details": json.dumps(self.detections),
        }


@dataclass(frozen=True, slots=True)
class GenEvalReport:
    overall: float  # mean of the task scores
    tasks: dict[str, float]  # task -> fraction of its images judged correct
    num_images: int
    num_prompts: int
    correct_images: float  # fraction of all images
    correct_prompts: float  # fraction of prompts with at least one correct image
    results: tuple[ImageResult, ...] = ()
    skipped: tuple[str, ...] = ()  # "path: why" for every image or folder that could not be read
    missing_prompts: tuple[int, ...] = ()  # metadata lines with no folder of generations

    def standard_errors(self) -> dict[str, Any]:
        """Binomial standard errors: ``sqrt(p (1 - p) / n)`` of each task's fraction over its
        ``n`` images, and of the overall score (the mean of the tasks) ``sqrt(sum se^2) / T``.
        Images of one prompt are not independent draws, so these are lower bounds."""
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.tag] = counts.get(r.tag, 0) + 1
        tasks = {
            tag: math.sqrt(p * (1 - p) / counts[tag]) if counts.get(tag) else float("nan")
            for tag, p in self.tasks.items()
        }
        overall = math.sqrt(sum(se * se for se in tasks.values())) / max(len(tasks), 1)
        return {"overall": overall, "tasks": tasks}

    def to_dict(self, *, with_results: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "overall": self.overall,
            "tasks": dict(self.tasks),
            "num_images": self.num_images,
            "num_prompts": self.num_prompts,
            "correct_images": self.correct_images,
            "correct_prompts": self.correct_prompts,
            "skipped": list(self.skipped),
            "missing_prompts": list(self.missing_prompts),
        }
        if with_results:
            out["results"] = [r.to_official() for r in self.results]
        return out

    def format(self) -> str:
        """A summary in the style of the official ``summary_scores.py``."""
        lines = [
            f"Total images: {self.num_images}",
            f"Total prompts: {self.num_prompts}",
            f"% correct images: {self.correct_images:.2%}",
            f"% correct prompts: {self.correct_prompts:.2%}",
            "",
        ]
        for tag, score in self.tasks.items():
            task = [r for r in self.results if r.tag == tag]
            lines.append(f"{tag:<16} = {score:.2%} ({sum(r.correct for r in task)} / {len(task)})")
        lines += ["", f"Overall score (avg. over tasks): {self.overall:.5f}"]
        if self.skipped:
            lines.append(f"skipped: {len(self.skipped)} (first: {self.skipped[0]})")
        if self.missing_prompts:
            lines.append(f"prompts without generations: {len(self.missing_prompts)}")
        return "\n".join(lines)


def summarize(
    results: Sequence[ImageResult],
    *,
    skipped: Sequence[str] = (),
    missing_prompts: Sequence[int] = (),
) -> GenEvalReport:
    """Per-task scores in order of first appearance and their mean, as ``summary_scores.py``."""
    if not results:
        raise ValueError("no images were scored: cannot summarize an empty set of results")
    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in results:
        tasks.setdefault(r.tag, []).append(r.correct)
        key = json.dumps(r.metadata, sort_keys=True)
        prompts[key] = prompts.get(key, False) or r.correct
    scores = {tag: float(np.mean(v)) for tag, v in tasks.items()}
    return GenEvalReport(
        overall=float(np.mean(list(scores.values()))),
        tasks=scores,
        num_images=len(results),
        num_prompts=len(prompts),
        correct_images=float(np.mean([r.correct for r in results])),
        correct_prompts=float(np.mean(list(prompts.values()))),
        results=tuple(results),
        skipped=tuple(skipped),
        missing_prompts=tuple(missing_prompts),
    )


def evaluate_image(
    image: Image.Image,
    metadata: Mapping[str, Any],
    detector: Detector,
    *,
    config: GenEvalConfig = GenEvalConfig(),
    filename: str = "",
) -> ImageResult:
    """Detect, select and judge one image against its metadata."""
    objects = select_objects(detector.detect(image), metadata["tag"], config)
    correct, reason = evaluate(objects, metadata, config)
    return ImageResult(
        filename=filename,
        tag=metadata["tag"],
        prompt=metadata["prompt"],
        correct=correct,
        reason=reason,
        metadata=dict(metadata),
        detections={
            k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in objects.items()
        },
    )


def write_results(results: Iterable[ImageResult], path: str | os.PathLike[str]) -> Path:
    """Per-image results as the official evaluator's ``results.jsonl``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r.to_official()) + "\n" for r in results))
    return out


# --------------------------------------------------------------------------------------------
# Metadata and the output layout


def parse_metadata(text: str, where: str) -> dict[str, Any]:
    """One metadata entry from its JSON text; ``where`` names it in errors ('file line 3')."""
    expected = (
        "a JSON object with 'tag' (str), 'prompt' (str), 'include' (non-empty list of "
        "{'class': str, 'count': int >= 1, optional 'color': str, optional 'position': "
        "[relation, group index]}) and optional 'exclude' (list of {'class', 'count'})"
    )
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg}); expected {expected}") from None

    def clause_ok(c: Any, *, include: bool) -> bool:
        if not isinstance(c, dict) or not isinstance(c.get("class"), str):
            return False
        count = c.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < (1 if include else 0):
            return False
        if include and "color" in c and not isinstance(c["color"], str):
            return False
        if include and "position" in c:
            pos = c["position"]
            return (
                isinstance(pos, list | tuple)
                and len(pos) == 2
                and pos[0] in RELATIONS
                and isinstance(pos[1], int)
            )
        return True

    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("tag"), str)
        and isinstance(entry.get("prompt"), str)
        and isinstance(entry.get("include"), list)
        and len(entry["include"]) > 0
        and all(clause_ok(c, include=True) for c in entry["include"])
        and isinstance(entry.get("exclude", []), list)
        and all(clause_ok(c, include=False) for c in entry.get("exclude", []))
    )
    if not ok:
        raise ValueError(f"{where}: expected {expected}; got {text.strip()[:200]!r}")
    for i, clause in enumerate(entry["include"]):
        if "position" in clause and not 0 <= clause["position"][1] < i:
            raise ValueError(
                f"{where}: include[{i}] position must refer to an earlier clause; got {clause['position']}"
            )
    return entry


def load_metadata(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read an ``evaluation_metadata.jsonl``: one entry per line, validated."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GenEval metadata file {file} does not exist")
    lines = file.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{file} holds no metadata lines")
    return [parse_metadata(line, f"{file} line {n + 1}") for n, line in enumerate(lines)]


def to_pil_images(images: Any) -> list[Image.Image]:
    """PIL images from PIL images, uint8 ``[H, W, 3]`` arrays, or a float tensor/array
    ``[B, 3, H, W]`` in ``[-1, 1]`` (the package boundary convention)."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1]; got {list(images.shape)}")
        pixels = np.clip((images.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        return [Image.fromarray(p) for p in pixels]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        elif (
            isinstance(im, np.ndarray)
            and im.dtype == np.uint8
            and im.ndim == 3
            and im.shape[2] == 3
        ):
            out.append(Image.fromarray(im))
        else:
            raise TypeError(
                f"image {i} must be a PIL image or a uint8 [H, W, 3] array; got {type(im).__name__}"
            )
    return out


def write_sample_folder(
    out_dir: str | os.PathLike[str], index: int, metadata: Mapping[str, Any], images: Any
) -> Path:
    """Write one prompt's folder: ``{index:05}/metadata.jsonl`` = ``json.dump(metadata)`` (no
    newline), byte for byte as the official generation script, and ``samples/{k:04}.png`` as
    the official README shows (its diffusers script writes ``{k:05}.png``; the evaluator
    reads any ``\\d+.png``, and so does :func:`read_layout`)."""
    folder = Path(out_dir) / f"{index:0>5}"
    samples = folder / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fp:
        json.dump(metadata, fp)
    for k, image in enumerate(to_pil_images(images)):
        image.save(samples / f"{k:04}.png")
    return folder


def write_generations(
    generator: Generator,
    metadata: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    n_samples: int = 4,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate ``n_samples`` images per prompt in batches of ``batch_size`` images and write
    them in GenEval's layout. ``progress(done_prompts, total_prompts)`` after each folder."""
    entries = load_metadata(metadata) if isinstance(metadata, str | os.PathLike) else list(metadata)
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1; got {n_samples}, {batch_size}")
    jobs = [(n, entry) for n, entry in enumerate(entries) for _ in range(n_samples)]
    pending: dict[int, list[Image.Image]] = {}
    done = 0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = to_pil_images(generator.generate([str(e["prompt"]) for _, e in chunk]))
        if len(images) != len(chunk):
            raise ValueError(f"generator returned {len(images)} images for {len(chunk)} prompts")
        for (n, entry), image in zip(chunk, images, strict=True):
            pending.setdefault(n, []).append(image)
            if len(pending[n]) == n_samples:
                write_sample_folder(out_dir, n, entry, pending.pop(n))
                done += 1
                if progress is not None:
                    progress(done, len(entries))
    return Path(out_dir)


@dataclass(slots=True)
class GenEvalLayout:
    """A folder in GenEval's layout: (index, metadata, sample paths) per prompt folder, and
    'path: why' for each samples folder that is missing or empty."""

    folders: list[tuple[int, dict[str, Any], list[Path]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_layout(image_dir: str | os.PathLike[str]) -> GenEvalLayout:
    """Prompt folders (numeric names, in numeric order) with their metadata and sample paths."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval image folder {root} does not exist")
    layout = GenEvalLayout()
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not folders:
        raise ValueError(
            f"{root} holds no prompt folders (00000/, 00001/, ...) in GenEval's layout"
        )
    for folder in folders:
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{meta_file} is missing; every prompt folder needs its metadata line"
            )
        metadata = parse_metadata(meta_file.read_text(), str(meta_file))
        samples_dir = folder / "samples"
        if not samples_dir.is_dir():
            layout.skipped.append(f"{samples_dir}: missing")
            continue
        samples = sorted(
            (p for p in samples_dir.iterdir() if p.is_file() and _SAMPLE_NAME.fullmatch(p.name)),
            key=lambda p: int(p.stem),
        )
        if not samples:
            layout.skipped.append(f"{samples_dir}: no NNNN.png samples")
        layout.folders.append((int(folder.name), metadata, samples))
    return layout


def score_folder(
    image_dir: str | os.PathLike[str],
    detector: Detector,
    *,
    config: GenEvalConfig = GenEvalConfig(),
    metadata_file: str | os.PathLike[str] | None = None,
) -> GenEvalReport:
    """Score a folder of generations in GenEval's layout. Unreadable images are skipped and
    listed in ``report.skipped``; with ``metadata_file``, every folder's metadata must equal its
    line there, and lines without a folder are listed in ``report.missing_prompts``."""
    layout = read_layout(image_dir)
    skipped = list(layout.skipped)
    missing: list[int] = []
    if metadata_file is not None:
        expected = load_metadata(metadata_file)
        present = {index for index, _, _ in layout.folders}
        for index, metadata, _ in layout.folders:
            if index >= len(expected) or expected[index] != metadata:
                raise ValueError(
                    f"{Path(image_dir) / f'{index:0>5}'}: metadata does not match line {index + 1} of {metadata_file}"
                )
        missing = [n for n in range(len(expected)) if n not in present]
    results: list[ImageResult] = []
    for _, metadata, samples in layout.folders:
        for path in samples:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, UnidentifiedImageError) as error:
                skipped.append(f"{path}: unreadable ({error.__class__.__name__})")
                continue
            results.append(
                evaluate_image(image, metadata, detector, config=config, filename=str(path))
            )
    if skipped:
        warnings.warn(
            f"{len(skipped)} images or folders skipped in {image_dir}; first: {skipped[0]}",
            stacklevel=2,
        )
    return summarize(results, skipped=skipped, missing_prompts=missing)
