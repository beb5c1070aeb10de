"""The shapes-world detector: reads a scene back from an image, for GenEval scoring.

1. Foreground = pixels brighter than ``min_value`` whose chromaticity (rgb / max channel) lies
   within ``max_color_distance`` of a palette colour. On the black background a blurred or
   antialiased edge is a dimmed copy of its object's colour, so chromaticity is unchanged.
2. Connected components of the foreground (4-connectivity, so uniform noise cannot percolate)
   between ``min_area`` and ``max_area`` of the image are candidate objects; a component's colour
   is the palette colour holding most of its mass.
3. Shape from two scale-free features of the soft mask (alpha = brightness / the component's
   typical brightness, which undoes antialiasing and blur): ``fill`` = area / (widest row x
   tallest column), 1.0 for a square, pi/4 for a circle, about 1/2 for the triangle; and the
   vertical skewness of the mass, -0.57 for an apex-up triangle and 0 for the symmetric shapes.
   Horizontal skewness and the width/height ratio are 0 for every shape and tell blobs apart.
4. Confidence = posterior of the shape in a Gaussian mixture over those features with one
   extra "not a shape" class, times the colour purity of the blob: a clean render scores
   about 1, a blob midway between a circle and a square about 0.5, noise near 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .geneval import Detection
from .shapes import PALETTE, SHAPES, Scene, ShapeObject

# Each shape's (mean, spread) of fill and of vertical skewness, measured on antialiased renders
# of 14-22 px, clean and blurred (Gaussian sigma up to 2 px at 64 px). Blur rounds a triangle
# (its fill rises from 0.55 towards 0.75) but keeps its mass bottom-heavy (skewness -0.56 ->
# -0.40), so the triangle is told by skewness and given a broad fill; circle and square are
# told apart by fill, which blur barely moves (0.78-0.82 and 0.98-1.0).
SHAPE_PROTOTYPES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "circle": ((0.785, 0.05), (0.0, 0.12)),
    "square": ((1.0, 0.05), (0.0, 0.12)),
    "triangle": ((0.62, 0.12), (-0.52, 0.12)),
}


@dataclass(kw_only=True, frozen=True, slots=True)
class ShapesDetectorConfig:
    min_value: float = 0.3  # brightness (max channel, 0-1) below which a pixel is background
    max_color_distance: float = 0.35  # chromaticity distance to the nearest palette colour
    min_area: float = 0.01  # soft area, fraction of the image (41 px at 64 px; objects: >= 63 px)
    max_area: float = 0.25  # larger blobs are backgrounds, not objects (largest object: 0.12)
    skew_x_sigma: float = 0.12  # horizontal skewness: 0 for every shape
    aspect_sigma: float = 0.15  # on log(width / height): 0 for every shape
    outlier_distance: float = 3.0  # Mahalanobis distance at which "not a shape" is as likely


def _as_rgb_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] float in [0, 1] from a PIL image, a uint8 [H, W, 3] array, or a float
    [3, H, W] tensor/array in [-1, 1] (the package boundary convention)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.ndim == 3 and array.shape[0] == 3 and np.issubdtype(array.dtype, np.floating):
        return np.clip((array.transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    raise ValueError(
        "image must be a PIL image, a uint8 [H, W, 3] array or a float [3, H, W] tensor in "
        f"[-1, 1]; got {type(image).__name__} of shape {list(array.shape)} and dtype {array.dtype}"
    )


def _skewness(coords: np.ndarray, weights: np.ndarray) -> float:
    mean = np.average(coords, weights=weights)
    var = np.average((coords - mean) ** 2, weights=weights)
    if var <= 1e-12:
        return 0.0
    return float(np.average((coords - mean) ** 3, weights=weights) / var**1.5)


class ShapesDetector:
    """Detects the shapes world's objects: ``detect(image) -> list[Detection]`` (most
    confident first; ``label`` = shape, ``color`` = palette name, ``box`` in pixels)."""

    def __init__(self, config: ShapesDetectorConfig | None = None) -> None:
        self.config = config or ShapesDetectorConfig()
        self.color_names = tuple(PALETTE)
        rgb = np.asarray([PALETTE[c] for c in self.color_names], dtype=np.float32)
        self._chroma = rgb / rgb.max(axis=1, keepdims=True)  # [K, 3]

    def _features(self, alpha: np.ndarray) -> tuple[float, float, float, float]:
        """(fill, skew_y, skew_x, log aspect) of a soft mask cropped to its component."""
        ys, xs = np.nonzero(alpha)
        weights = alpha[ys, xs]
        area = float(weights.sum())
        width, height = float(alpha.sum(axis=1).max()), float(alpha.sum(axis=0).max())
        fill = area / max(width * height, 1e-6)
        # +0.5: pixel centres; skewness is offset-free anyway.
        skew_y, skew_x = _skewness(ys + 0.5, weights), _skewness(xs + 0.5, weights)
        return fill, skew_y, skew_x, float(np.log(max(width, 1e-6) / max(height, 1e-6)))

    def _classify(
        self, fill: float, skew_y: float, skew_x: float, log_aspect: float
    ) -> tuple[str, float]:
        c = self.config
        shared = (skew_x / c.skew_x_sigma) ** 2 + (log_aspect / c.aspect_sigma) ** 2
        d2 = np.asarray(
            [
                ((fill - fm) / fs) ** 2 + ((skew_y - sm) / ss) ** 2 + shared
                for (fm, fs), (sm, ss) in SHAPE_PROTOTYPES.values()
            ]
        )  # [shapes], squared Mahalanobis distances
        logits = np.append(-0.5 * d2, -0.5 * c.outlier_distance**2)  # [shapes + "not a shape"]
        posterior = np.exp(logits - logits.max())
        posterior /= posterior.sum()
        best = int(np.argmax(posterior[:-1]))
        return tuple(SHAPE_PROTOTYPES)[best], float(posterior[best])

    def detect(self, image: Image.Image | np.ndarray) -> list[Detection]:
        c = self.config
        rgb = _as_rgb_float(image)  # [H, W, 3]
        h, w, _ = rgb.shape
        value = rgb.max(axis=2)  # [H, W]
        chroma = rgb / np.maximum(value, 1e-6)[..., None]  # [H, W, 3]
        dist = np.linalg.norm(
            chroma[:, :, None, :] - self._chroma[None, None], axis=-1
        )  # [H, W, K]
        label = dist.argmin(axis=2)  # [H, W]
        foreground = (value > c.min_value) & (dist.min(axis=2) < c.max_color_distance)
        components, _ = ndimage.label(foreground)  # 4-connectivity
        detections: list[Detection] = []
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            mask = components[box] == index  # [h, w] of the component's bounding box
            pixels = int(mask.sum())
            if not c.min_area * h * w <= pixels <= c.max_area * h * w:
                continue
            v = value[box] * mask
            reference = float(np.percentile(v[mask], 90))
            alpha = np.clip(v / reference, 0.0, 1.0)  # soft coverage, 0 outside the component
            if alpha.sum() < c.min_area * h * w:
                continue
            votes = np.bincount(
                label[box][mask], weights=alpha[mask], minlength=len(self.color_names)
            )
            color = int(votes.argmax())
            purity = float(
                votes[color] / votes.sum()
            )  # multi-coloured blobs are less likely objects
            shape, confidence = self._classify(*self._features(alpha))
            y0, x0 = box[0].start, box[1].start
            ys, xs = np.nonzero(alpha > 0.5)  # the box: pixels at least half covered
            cy, cx = ndimage.center_of_mass(alpha)  # alpha-weighted, in pixel-index units
            detections.append(
                Detection(
                    label=shape,
                    box=(
                        float(x0 + xs.min()),
                        float(y0 + ys.min()),
                        float(x0 + xs.max() + 1),
                        float(y0 + ys.max() + 1),
                    ),
                    score=confidence * purity,
                    color=self.color_names[color],
                    centroid=(float(x0 + cx + 0.5), float(y0 + cy + 0.5)),
                    area=float(alpha.sum()),
                )
            )
        detections.sort(key=lambda d: -d.score)
        return detections

    def read_scene(self, image: Image.Image | np.ndarray, *, min_score: float = 0.3) -> Scene:
        """The scene an image shows, in the world's resolution-free coordinates."""
        h, w = _as_rgb_float(image).shape[:2]
        objects = []
        for d in self.detect(image):
            if d.score <= min_score or d.label not in SHAPES:
                continue
            x0, y0, x1, y1 = d.box
            objects.append(
                ShapeObject(
                    d.label,
                    d.color or "white",
                    ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h),
                    max(x1 - x0, y1 - y0) / max(h, w),
                )
            )
        return Scene(tuple(objects))
