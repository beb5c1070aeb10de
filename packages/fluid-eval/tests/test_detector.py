from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fluid_eval import shapes
from fluid_eval.detector import ShapesDetector


def _match_rate(
    detector: ShapesDetector, transform, *, seed: int, num: int, size: int = 64
) -> tuple[float, int, int]:
    """Fraction of ground-truth objects found (box contains their centre) with the right shape
    and colour; also the object count and the number of confident spurious detections."""
    right = total = spurious = 0
    for i in range(num):
        pair = shapes.sample_training_pair(np.random.default_rng([seed, i]))
        found = [
            d
            for d in detector.detect(transform(shapes.render_image(pair.scene, size)))
            if d.score > 0.3
        ]
        used: set[int] = set()
        for obj in pair.scene.objects:
            total += 1
            cx, cy = obj.center[0] * size, obj.center[1] * size
            hits = [
                j
                for j, d in enumerate(found)
                if j not in used and d.box[0] <= cx <= d.box[2] and d.box[1] <= cy <= d.box[3]
            ]
            if hits:
                used.add(hits[0])
                right += found[hits[0]].label == obj.shape and found[hits[0]].color == obj.color
        spurious += len(found) - len(used)
    return right / total, total, spurious


def test_detector_reads_held_out_ground_truth_renders(detector) -> None:
    rate, total, spurious = _match_rate(detector, lambda im: im, seed=99, num=320)
    assert total >= 600
    assert rate >= 0.99 and spurious == 0, (rate, spurious)


def test_detector_tolerates_blur_and_noise_like_generated_images(detector) -> None:
    rng = np.random.default_rng(0)

    def degrade(image: Image.Image) -> Image.Image:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        return Image.fromarray(
            np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        )

    rate, _, spurious = _match_rate(detector, degrade, seed=98, num=100)
    assert rate >= 0.97 and spurious <= 2, (rate, spurious)


def test_detector_is_scale_free(detector) -> None:
    rate, _, spurious = _match_rate(detector, lambda im: im, seed=97, num=30, size=160)
    assert rate == 1.0 and spurious == 0


def test_blank_and_noise_images_yield_no_confident_objects(detector) -> None:
    for color in [(0, 0, 0), (255, 255, 255), (128, 128, 128), (235, 35, 35)]:
        assert [
            d for d in detector.detect(Image.new("RGB", (64, 64), color)) if d.score > 0.3
        ] == []
    rng = np.random.default_rng(1)
    confident = sum(
        d.score > 0.3
        for _ in range(50)
        for d in detector.detect(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    )
    assert confident <= 2


def test_detections_carry_box_centroid_and_are_sorted(detector) -> None:
    scene = shapes.Scene((
        shapes.ShapeObject("triangle", "green", (0.3, 0.3), 0.3),
        shapes.ShapeObject("square", "white", (0.7, 0.7), 0.25),
    ))  # fmt: skip
    found = detector.detect(shapes.render_image(scene))
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    by_label = {d.label: d for d in found}
    tri, sq = by_label["triangle"], by_label["square"]
    assert tri.color == "green" and sq.color == "white"
    assert np.allclose(sq.box, (0.575 * 64, 0.575 * 64, 0.825 * 64, 0.825 * 64), atol=1.0)
    assert np.allclose(sq.centroid, (0.7 * 64, 0.7 * 64), atol=0.5)
    # A triangle's mass sits low: centroid 2/3 of the way down its box.
    assert tri.centroid[1] == pytest.approx(0.15 * 64 + 0.3 * 64 * 2 / 3, abs=0.7)
    assert sq.area == pytest.approx((0.25 * 64) ** 2, rel=0.05)


def test_read_scene_round_trips(detector) -> None:
    for i in range(20):
        scene = shapes.sample_training_pair(np.random.default_rng([5, i])).scene
        read = detector.read_scene(shapes.render_image(scene, 64))
        assert len(read.objects) == len(scene.objects)
        for obj in scene.objects:
            twin = min(
                read.objects,
                key=lambda o: np.hypot(o.center[0] - obj.center[0], o.center[1] - obj.center[1]),
            )
            assert (twin.shape, twin.color) == (obj.shape, obj.color)
            assert (
                np.allclose(twin.center, obj.center, atol=1.5 / 64)
                and abs(twin.size - obj.size) < 2 / 64
            )


def test_detector_accepts_arrays_and_tensors_alike(detector) -> None:
    pair = shapes.sample_training_pair(3)
    pixels = shapes.render(pair.scene)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W] in [-1, 1]
    reference = detector.detect(Image.fromarray(pixels))
    for image in (pixels, tensor):
        got = detector.detect(image)
        assert [(d.label, d.color) for d in got] == [(d.label, d.color) for d in reference]
        assert np.allclose([d.box for d in got], [d.box for d in reference])
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        detector.detect(np.zeros((64, 64), dtype=np.uint8))
