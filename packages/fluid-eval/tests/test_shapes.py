from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fluid_eval import geneval, shapes
from fluid_eval.shapes import PALETTE, LayoutConfig, Scene, ShapeObject


def test_render_is_deterministic_from_the_seed() -> None:
    a = shapes.sample_training_pair(np.random.default_rng(123))
    b = shapes.sample_training_pair(np.random.default_rng(123))
    c = shapes.sample_training_pair(np.random.default_rng(124))
    assert a.caption == b.caption and a.scene == b.scene
    assert np.array_equal(shapes.render(a.scene), shapes.render(b.scene))
    assert not np.array_equal(shapes.render(a.scene), shapes.render(c.scene))


def test_render_puts_each_shape_in_its_colour_on_black() -> None:
    scene = Scene((
        ShapeObject("square", "red", (0.25, 0.25), 0.3),
        ShapeObject("circle", "blue", (0.75, 0.25), 0.3),
        ShapeObject("triangle", "yellow", (0.5, 0.75), 0.3),
    ))  # fmt: skip
    image = shapes.render(scene, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[16, 16]) == PALETTE["red"]
    assert tuple(image[16, 48]) == PALETTE["blue"]
    assert tuple(image[52, 32]) == PALETTE["yellow"]
    # The square fills its box's corner, the circle does not; the triangle's top corners are empty.
    assert tuple(image[7, 7]) == PALETTE["red"]
    assert tuple(image[7, 39]) == (0, 0, 0)
    assert tuple(image[39, 23]) == (0, 0, 0) and tuple(image[56, 24]) == PALETTE["yellow"]
    assert tuple(image[0, 0]) == (0, 0, 0) and tuple(image[32, 2]) == (0, 0, 0)
    # Scale free: the same scene at 128 px is the 64 px render up to resampling.
    big = np.asarray(
        Image.fromarray(shapes.render(scene, 128)).resize((64, 64), Image.Resampling.BOX)
    )
    assert np.abs(big.astype(int) - image.astype(int)).mean() < 3


def test_prompts_use_genevals_wording_and_metadata_format() -> None:
    rng = np.random.default_rng(0)
    nouns = "|".join(shapes.SHAPES)
    colors = "|".join(shapes.COLORS)
    patterns = {
        "single_object": rf"a photo of a ({nouns})",
        "two_object": rf"a photo of a ({nouns}) and a ({nouns})",
        "counting": rf"a photo of (two|three|four) ({nouns})s",
        "colors": rf"a photo of an? ({colors}) ({nouns})",
        "position": rf"a photo of a ({nouns}) (left of|right of|above|below) a ({nouns})",
        "color_attr": rf"a photo of an? ({colors}) ({nouns}) and an? ({colors}) ({nouns})",
    }
    for family, pattern in patterns.items():
        for _ in range(20):
            meta = shapes.sample_metadata(family, rng)
            assert re.fullmatch(pattern, meta["prompt"]), (family, meta["prompt"])
            assert list(meta)[0] == "tag" and list(meta)[-1] == "prompt" and meta["tag"] == family
            classes = [g["class"] for g in meta["include"]]
            assert len(set(classes)) == len(classes)
    counting = shapes.sample_metadata("counting", np.random.default_rng(3))
    n = counting["include"][0]["count"]
    assert counting["exclude"] == [{"class": counting["include"][0]["class"], "count": n + 1}]
    position = shapes.sample_metadata("position", np.random.default_rng(4))
    first, second = position["include"]
    assert "position" not in first and second["position"][1] == 0
    assert (
        position["prompt"]
        == f"a photo of a {second['class']} {second['position'][0]} a {first['class']}"
    )


def test_richer_compositions_are_expressible_rendered_and_true(detector) -> None:
    meta = shapes.make_metadata(
        "composite",
        [{"class": "square", "count": 1, "color": "blue"},
         {"class": "circle", "count": 2, "color": "red", "position": ["left of", 0]}],
    )  # fmt: skip
    assert meta["prompt"] == "a photo of two red circles left of a blue square"
    assert meta["exclude"] == [{"class": "circle", "count": 3}]
    for seed in range(10):
        scene = shapes.scene_from_prompt(meta, seed)
        square = [o for o in scene.objects if o.shape == "square"]
        circles = [o for o in scene.objects if o.shape == "circle"]
        assert len(square) == 1 and len(circles) == 2 and len(scene.objects) == 3
        assert all(o.color == "red" for o in circles) and square[0].color == "blue"
        assert all(c.center[0] < square[0].center[0] for c in circles)
        result = geneval.evaluate_image(shapes.render_image(scene), meta, detector)
        assert result.correct, result.reason


@pytest.mark.parametrize(
    "layout", [LayoutConfig(), LayoutConfig.in_cells(4)], ids=["free", "cells"]
)
def test_scene_from_prompt_satisfies_every_evaluation_prompt(layout) -> None:
    for n, meta in enumerate(shapes.evaluation_metadata(120, seed=9)):
        scene = shapes.scene_from_prompt(meta, np.random.default_rng(n), layout=layout)
        groups = []
        for group in meta["include"]:
            members = [o for o in scene.objects if o.shape == group["class"]]
            assert len(members) == group["count"], meta["prompt"]
            if "color" in group:
                assert all(o.color == group["color"] for o in members)
            if "position" in group:
                rel, target = group["position"]
                for o in members:
                    for t in groups[target]:
                        assert rel in geneval.relative_position(
                            o.box, t.box, threshold=layout.position_threshold
                        )
            groups.append(members)
        assert len(scene.objects) == sum(g["count"] for g in meta["include"])
        if layout.cells is not None:
            cells = set()
            for o in scene.objects:  # inside one cell, half a gap from its edges
                col, row = (int(c * layout.cells) for c in o.center)
                x0, y0, x1, y1 = (v * layout.cells for v in o.box)
                margin = layout.gap / 2 * layout.cells - 1e-9
                assert x0 - col >= margin and col + 1 - x1 >= margin, (o, meta["prompt"])
                assert y0 - row >= margin and row + 1 - y1 >= margin, (o, meta["prompt"])
                cells.add((col, row))
            assert len(cells) == len(scene.objects)  # one object per cell
        for i, a in enumerate(scene.objects):
            border = layout.border if layout.cells is None else layout.gap / 2
            assert min(a.box) >= border - 1e-9 and max(a.box) <= 1 - border + 1e-9
            for b in scene.objects[i + 1 :]:
                gap = max(
                    b.box[0] - a.box[2],
                    a.box[0] - b.box[2],
                    b.box[1] - a.box[3],
                    a.box[1] - b.box[3],
                )
                assert gap >= layout.gap - 1e-9


@pytest.mark.parametrize(
    "layout,size", [(LayoutConfig(), 64), (LayoutConfig.in_cells(4), 32)], ids=["free", "cells"]
)
def test_every_training_caption_is_judged_true_of_its_scene(detector, layout, size) -> None:
    families = Counter()
    for i in range(300):
        pair = shapes.sample_training_pair(np.random.default_rng([2024, i]), layout=layout)
        families[pair.metadata["tag"]] += 1
        assert pair.caption == pair.metadata["prompt"]
        image = shapes.render_image(pair.scene, size)
        result = geneval.evaluate_image(image, pair.metadata, detector)
        assert result.correct, (pair.caption, result.reason)
    assert set(families) == set(shapes.TRAINING_FAMILIES)


def test_write_shards_img2dataset_layout_deterministic(tmp_path) -> None:
    paths = shapes.write_shards(tmp_path / "a", 7, seed=5, size=32, shard_size=3)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[1]) as tar:
        names = tar.getnames()
        # img2dataset keys: shard number, then the index inside the shard.
        assert names == [f"00001{i}.{ext}" for i in range(3) for ext in ("png", "txt", "json")]
        record = json.loads(tar.extractfile("000011.json").read())
        caption = tar.extractfile("000011.txt").read().decode()
        image = Image.open(io.BytesIO(tar.extractfile("000011.png").read()))
        assert image.size == (32, 32) and image.mode == "RGB"
    assert record["caption"] == caption == record["metadata"]["prompt"] and record["index"] == 4
    scene = Scene.from_dict(record["scene"])
    assert np.array_equal(np.asarray(image), shapes.render(scene, 32))
    again = shapes.write_shards(tmp_path / "b", 7, seed=5, size=32, shard_size=3)
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again, strict=True))
    # Sample 4 is the same whatever the shard size.
    (other,) = shapes.write_shards(tmp_path / "c", 7, seed=5, size=32, shard_size=10)
    with tarfile.open(other) as tar:
        assert json.loads(tar.extractfile("000004.json").read())["scene"] == record["scene"]
    assert not list(tmp_path.rglob("*.partial"))


def test_write_prompts_is_balanced_and_one_json_dumps_line_each(tmp_path) -> None:
    path = tmp_path / "evaluation_metadata.jsonl"
    entries = shapes.write_prompts(path, 62, seed=1)
    lines = path.read_text().splitlines()
    assert len(lines) == 62 and [json.loads(line) for line in lines] == entries
    assert all(line == json.dumps(json.loads(line)) for line in lines)
    counts = Counter(e["tag"] for e in entries)
    assert list(counts) == list(geneval.TASKS)
    assert sorted(counts.values()) == [10, 10, 10, 10, 11, 11]
    singles = Counter(e["include"][0]["class"] for e in entries if e["tag"] == "single_object")
    assert set(singles) == set(shapes.SHAPES) and max(singles.values()) - min(singles.values()) <= 1
    assert shapes.write_prompts(tmp_path / "again.jsonl", 62, seed=1) == entries


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ([{"class": "hexagon", "count": 1}], "class must be one of"),
        ([{"class": "circle", "count": 1, "color": "teal"}], "color must be one of"),
        ([{"class": "circle", "count": 5}], "at most 4"),
        ([{"class": "circle", "count": 1}, {"class": "circle", "count": 1}], "repeats class"),
        ([{"class": "circle", "count": 1, "position": ["left of", 0]}], "earlier group"),
        (
            [
                {"class": "square", "count": 1},
                {"class": "circle", "count": 1, "position": "left of"},
            ],
            "earlier group",
        ),
        ([], "non-empty 'include'"),
    ],
)
def test_scene_from_prompt_rejects_what_it_cannot_draw(include, message) -> None:
    with pytest.raises(ValueError, match=message):
        shapes.scene_from_prompt({"tag": "x", "include": include, "prompt": "p"}, 0)


def test_shape_object_and_scene_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="shape must be one of"):
        ShapeObject("star", "red", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match="size must be"):
        ShapeObject("circle", "red", (0.5, 0.5), 0.0)
    with pytest.raises(ValueError, match="scene must be"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})
    scene = shapes.sample_training_pair(0).scene
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_layout_checks_its_sizes_and_cells() -> None:
    with pytest.raises(ValueError, match="min_size <= max_size"):
        LayoutConfig(min_size=0.3, max_size=0.2)
    with pytest.raises(ValueError, match="cells\\*\\*2 >= max_objects=4"):
        LayoutConfig.in_cells(1)
    with pytest.raises(ValueError, match="max_size \\+ gap must fit a cell"):
        LayoutConfig(cells=4)  # the free layout's 22/64 objects do not fit a quarter side
    cells = LayoutConfig.in_cells(4)
    assert (cells.min_size, cells.max_size, cells.gap) == (0.18, 6 / 32, 2 / 32)
