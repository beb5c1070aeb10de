from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_eval import geneval, shapes
from fluid_eval.geneval import Detection, GenEvalConfig


def _det(
    label: str,
    x: float,
    y: float,
    *,
    size: float = 10,
    score: float = 0.99,
    color: str | None = "red",
) -> Detection:
    return Detection(label, (x - size / 2, y - size / 2, x + size / 2, y + size / 2), score, color)


class _ListDetector:
    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections

    def detect(self, image: Image.Image) -> list[Detection]:
        return self.detections


def test_relative_position_follows_genevals_geometry() -> None:
    a, b = (0, 20, 10, 30), (30, 20, 40, 30)  # A is 30 px left of B, same height
    assert geneval.relative_position(a, b) == {"left of"}
    assert geneval.relative_position(b, a) == {"right of"}
    assert geneval.relative_position((30, 0, 40, 10), (30, 30, 40, 40)) == {"above"}
    assert geneval.relative_position((30, 30, 40, 40), (30, 0, 40, 10)) == {"below"}
    assert geneval.relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # Offsets inside the dead zone (threshold x summed sizes) give no relation at all.
    assert geneval.relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    assert geneval.relative_position((0, 0, 20, 20), (10, 0, 30, 20), threshold=0.5) == set()
    assert geneval.relative_position((0, 0, 20, 20), (10, 0, 30, 20), threshold=0.1) == {"left of"}


def test_counting_uses_the_counting_threshold_and_exclude() -> None:
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 3}],
            "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}  # fmt: skip
    three = [_det("circle", 10 + 15 * i, 10) for i in range(3)]
    assert geneval.evaluate(geneval.select_objects(three, "counting"), meta) == (True, "")
    four = [*three, _det("circle", 10, 40)]
    ok, reason = geneval.evaluate(geneval.select_objects(four, "counting"), meta)
    assert not ok and reason == "expected circle<4, found 4"
    # A 4th object below the counting threshold (0.9) does not count ...
    unsure = [*three, _det("circle", 10, 40, score=0.5)]
    assert geneval.evaluate(geneval.select_objects(unsure, "counting"), meta)[0]
    # ... but for other tags the threshold is 0.3.
    assert len(geneval.select_objects(unsure, "two_object")["circle"]) == 4
    ok, reason = geneval.evaluate(geneval.select_objects(three[:2], "counting"), meta)
    assert not ok and reason == "expected circle>=3, found 2"


def test_colour_is_judged_on_the_most_confident_objects() -> None:
    meta = {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "blue"}],
        "prompt": "a photo of a blue square",
    }
    right_first = [
        _det("square", 10, 10, color="blue", score=0.95),
        _det("square", 40, 40, color="red", score=0.6),
    ]
    assert geneval.evaluate(geneval.select_objects(right_first, "colors"), meta)[0]
    wrong_first = [
        _det("square", 10, 10, color="blue", score=0.6),
        _det("square", 40, 40, color="red", score=0.95),
    ]
    ok, reason = geneval.evaluate(geneval.select_objects(wrong_first, "colors"), meta)
    assert not ok and reason == "expected blue square>=1, found 0 blue; and 1 red"


def test_position_needs_the_target_group_matched() -> None:
    meta = {"tag": "position",
            "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a circle left of a square"}  # fmt: skip
    assert geneval.evaluate(
        {"square": [_det("square", 50, 20)], "circle": [_det("circle", 10, 20)]}, meta
    )[0]
    ok, reason = geneval.evaluate(
        {"square": [_det("square", 10, 20)], "circle": [_det("circle", 50, 20)]}, meta
    )
    assert not ok and reason == "expected circle left of target, found right of target"
    ok, reason = geneval.evaluate({"circle": [_det("circle", 10, 20)]}, meta)
    assert not ok and reason == "expected square>=1, found 0\nno target for circle to be left of"


def test_ground_truth_scenes_score_near_one(ground_truth_dir, prompts_file, detector) -> None:
    report = geneval.score_folder(ground_truth_dir, detector, metadata_file=prompts_file)
    assert list(report.tasks) == list(geneval.TASKS)
    assert report.num_images == 240 and report.skipped == () and report.missing_prompts == ()
    assert report.overall == pytest.approx(np.mean(list(report.tasks.values())))
    assert report.overall >= 0.98, report.format()
    assert "Overall score (avg. over tasks)" in report.format()


@pytest.mark.parametrize("kind", ["noise", "black", "white", "grey"])
def test_noise_and_blank_images_score_near_zero(kind, prompts_file, tmp_path, detector) -> None:
    rng = np.random.default_rng(0)
    for index, meta in enumerate(geneval.load_metadata(prompts_file)):
        if kind == "noise":
            images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
        else:
            value = {"black": 0, "white": 255, "grey": 128}[kind]
            images = [np.full((64, 64, 3), value, dtype=np.uint8)] * 4
        geneval.write_sample_folder(tmp_path, index, meta, images)
    assert geneval.score_folder(tmp_path, detector).overall <= 0.05


def test_layout_is_byte_for_byte_what_the_official_scripts_use(tmp_path, prompts_file) -> None:
    lines = prompts_file.read_text().splitlines()
    shapes.render_metadata(prompts_file, tmp_path, n_samples=4)
    assert sorted(os.listdir(tmp_path)) == [f"{i:05d}" for i in range(len(lines))]
    for index, line in enumerate(lines):
        folder = tmp_path / f"{index:05d}"
        # The official generation script: json.dump(json.loads(line), fp) — no newline.
        assert (folder / "metadata.jsonl").read_bytes() == json.dumps(json.loads(line)).encode()
        assert sorted(os.listdir(folder / "samples")) == [
            "0000.png",
            "0001.png",
            "0002.png",
            "0003.png",
        ]
    # What the official evaluator walks: numeric folders, json.load of metadata, \d+.png samples.
    found = 0
    for sub in os.listdir(tmp_path):
        assert sub.isdigit()
        with open(tmp_path / sub / "metadata.jsonl") as fp:
            assert json.load(fp) == json.loads(lines[int(sub)])
        found += sum(bool(re.match(r"\d+\.png", n)) for n in os.listdir(tmp_path / sub / "samples"))
    assert found == 4 * len(lines)


def test_reader_accepts_the_generation_scripts_five_digit_sample_names(tmp_path, detector) -> None:
    meta = shapes.evaluation_metadata(6, seed=0)[3]  # a 'colors' prompt
    folder = geneval.write_sample_folder(
        tmp_path, 0, meta, [shapes.render(shapes.scene_from_prompt(meta, 0))]
    )
    (folder / "samples" / "0000.png").rename(folder / "samples" / "00000.png")
    (folder / "samples" / "notes.txt").write_text("ignored")
    report = geneval.score_folder(tmp_path, detector)
    assert report.num_images == 1 and report.results[0].correct


class _FakeGenerator:
    """Draws the ground truth for each prompt, as a [B, 3, H, W] tensor in [-1, 1]."""

    def __init__(self, metadata: list[dict]) -> None:
        self.by_prompt = {m["prompt"]: m for m in metadata}
        self.calls: list[int] = []

    def generate(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(len(prompts))
        images = [
            shapes.render(shapes.scene_from_prompt(self.by_prompt[p], i))
            for i, p in enumerate(prompts)
        ]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_write_generations_batches_across_prompts(tmp_path, detector) -> None:
    metadata = shapes.evaluation_metadata(12, seed=2)
    generator = _FakeGenerator(metadata)
    assert isinstance(generator, geneval.Generator)
    progress: list[int] = []
    geneval.write_generations(generator, metadata, tmp_path, n_samples=3, batch_size=5,
                              progress=lambda done, total: progress.append(done))  # fmt: skip
    assert generator.calls == [5] * 7 + [1] and progress == list(range(1, 13))
    report = geneval.score_folder(tmp_path, detector)
    assert report.num_images == 36 and report.overall == 1.0


def test_missing_folder_and_malformed_metadata_are_named(tmp_path, detector) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        geneval.score_folder(tmp_path / "nowhere", detector)
    with pytest.raises(ValueError, match="holds no prompt folders"):
        geneval.score_folder(tmp_path, detector)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"tag": "colors", "include": [{"class": "circle", "count": 1}], "prompt": "x"}\n{"tag": "colors"\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        geneval.load_metadata(bad)
    bad.write_text(
        '{"tag": "colors", "include": [{"class": "circle", "count": "one"}], "prompt": "x"}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: expected a JSON object"):
        geneval.load_metadata(bad)
    folder = geneval.write_sample_folder(
        tmp_path / "out", 0, shapes.evaluation_metadata(1)[0], [np.zeros((8, 8, 3), np.uint8)]
    )
    (folder / "metadata.jsonl").write_text("{not json")
    with pytest.raises(ValueError, match=r"00000/metadata.jsonl: not valid JSON"):
        geneval.score_folder(tmp_path / "out", detector)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"00000/metadata.jsonl is missing"):
        geneval.score_folder(tmp_path / "out", detector)


def test_unreadable_images_are_skipped_and_counted(
    ground_truth_dir, prompts_file, tmp_path, detector
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ground_truth_dir, copy)
    (copy / "00002" / "samples" / "0001.png").write_bytes(b"not a png")
    shutil.rmtree(copy / "00005")
    with pytest.warns(UserWarning, match="1 images or folders skipped"):
        report = geneval.score_folder(copy, detector, metadata_file=prompts_file)
    assert report.num_images == 240 - 1 - 4
    assert len(report.skipped) == 1 and "00002/samples/0001.png: unreadable" in report.skipped[0]
    assert report.missing_prompts == (5,)
    other = tmp_path / "other.jsonl"
    shapes.write_prompts(other, 60, seed=8)
    with pytest.raises(ValueError, match="does not match line 1"):
        geneval.score_folder(copy, detector, metadata_file=other)


def test_results_are_written_in_the_official_format(ground_truth_dir, tmp_path, detector) -> None:
    report = geneval.score_folder(ground_truth_dir, detector, config=GenEvalConfig(max_objects=2))
    path = geneval.write_results(report.results[:5], tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5
    for row, result in zip(rows, report.results, strict=False):
        assert list(row) == [
            "filename",
            "tag",
            "prompt",
            "correct",
            "reason",
            "metadata",
            "details",
        ]
        assert json.loads(row["metadata"]) == result.metadata and row["correct"] is result.correct
        assert all(len(box) == 5 for boxes in json.loads(row["details"]).values() for box in boxes)
    assert geneval.summarize(report.results[:8]).tasks == {"single_object": 1.0}
    with pytest.raises(ValueError, match="no images were scored"):
        geneval.summarize([])


def test_standard_errors_are_binomial_per_task_and_combined_for_the_mean() -> None:
    import math

    from fluid_eval.geneval import ImageResult, summarize

    def result(tag: str, correct: bool, n: int) -> ImageResult:
        return ImageResult(f"{tag}{n}.png", tag, f"p{n}", correct, "", {"tag": tag, "n": n}, {})

    results = [result("a", i < 3, i) for i in range(4)] + [result("b", i < 1, i) for i in range(10)]
    report = summarize(results)
    se = report.standard_errors()
    assert se["tasks"]["a"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert se["tasks"]["b"] == pytest.approx(math.sqrt(0.1 * 0.9 / 10))
    assert se["overall"] == pytest.approx(math.hypot(se["tasks"]["a"], se["tasks"]["b"]) / 2)
    # A task every image got right (or wrong) has no binomial spread.
    assert summarize([result("c", True, i) for i in range(3)]).standard_errors()["overall"] == 0
