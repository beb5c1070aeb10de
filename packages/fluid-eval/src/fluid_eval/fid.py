"""FID through ``torchmetrics.image.fid.FrechetInceptionDistance``, offline.

Two feature networks:

- ``"inception"``: the standard FID Inception-v3 (2048-d pool features), loaded by torchmetrics
  from a local weights file (``feature_extractor_weights_path``, the ``pt_inception-2015-12-05``
  file torch-fidelity uses); needs the ``fid`` extra (torch-fidelity). Nothing is downloaded.
- ``"shapes"``: :class:`ShapesFeatureNet`, a small fixed random convolutional network plus a
  coarse colour layout, deterministic from a seed. The shapes world's FID uses it, not
  Inception: its numbers compare models on that world only, never with published FIDs.

Any other ``nn.Module`` mapping float ``[B, 3, H, W]`` images in ``[0, 1]`` to ``[B, D]``
features works too. Images come as tensors in ``[-1, 1]`` (the package convention), folders,
lists of files or iterables of tensor batches; unreadable files are skipped and counted.

MS-COCO protocol (zero-shot FID-30K): :func:`sample_coco_pairs` draws 30K caption-image pairs
of the 2014 captions file with a seed; reference images are center-cropped and resized to 256.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ImageSource = Tensor | str | os.PathLike | Sequence[str | os.PathLike] | Iterable[Tensor]


class ShapesFeatureNet(nn.Module):
    """Fixed features for small synthetic worlds: three random stride-2 convolutions with ReLU,
    mean- and max-pooled over space (how much of each edge/corner/blob pattern there is, and how
    strongly it occurs anywhere: max pooling is what makes blur visible), concatenated with the
    mean colour of each cell of a ``grid x grid`` layout (where which colour sits).
    He-initialised from ``seed``; never trained.

    Input: float ``[B, 3, H, W]`` in ``[0, 1]`` (torchmetrics' ``normalize=True`` convention),
    resized to ``input_size``. Output: ``[B, num_features]``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        input_size: int = 64,
        widths: Sequence[int] = (32, 64, 128),
        grid: int = 4,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.input_size, self.grid = input_size, grid
        convs, channels = [], 3
        for width in widths:
            conv = nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=generator)
                    * (2.0 / (channels * 9)) ** 0.5
                )
                conv.bias.zero_()
            convs.append(conv)
            channels = width
        self.convs = nn.ModuleList(convs)
        self.num_features = 2 * channels + 3 * grid * grid
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ShapesFeatureNet:
        return super().train(False)  # a fixed feature map: no mode to switch

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got {list(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        x = x * 2 - 1  # [B, 3, S, S]
        layout = F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # [B, 3 * grid * grid]
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))  # [B, C_i, S / 2^i, S / 2^i]
        return torch.cat(
            [h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), layout], dim=1
        )  # [B, num_features]


def make_fid(
    feature: Literal["shapes", "inception"] | nn.Module = "shapes",
    *,
    weights_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> FrechetInceptionDistance:
    """A torchmetrics FID metric that takes float images in ``[0, 1]`` (``normalize=True``).

    It scores what this process feeds it: ``compute`` does not gather states from other
    torch.distributed ranks (under torchrun only one rank computes FID)."""
    if feature == "inception":
        if weights_path is None:
            raise ValueError(
                "feature='inception' needs weights_path: the FID Inception weights file (no downloads)"
            )
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights file {weights_path} does not exist")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ImportError(
                "Inception FID needs torch-fidelity: pip install 'fluid-eval[fid]'"
            ) from None
        metric = FrechetInceptionDistance(
            feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path),
            sync_on_compute=False,
        )  # fmt: skip
    elif feature == "shapes":
        metric = FrechetInceptionDistance(
            feature=ShapesFeatureNet(seed=seed), normalize=True, sync_on_compute=False
        )
    elif isinstance(feature, nn.Module):
        metric = FrechetInceptionDistance(feature=feature, normalize=True, sync_on_compute=False)
    else:
        raise ValueError(f"feature must be 'shapes', 'inception' or an nn.Module; got {feature!r}")
    return metric.to(device) if device is not None else metric


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to ``size`` (bicubic), as the COCO protocol does."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.convert("RGB").crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under a folder (recursive, sorted), e.g. a GenEval output folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def iter_batches(
    source: ImageSource,
    *,
    batch_size: int = 64,
    image_size: int | None = None,
    skipped: list[str] | None = None,
) -> Iterator[Tensor]:
    """Batches ``[b, 3, H, W]`` in ``[0, 1]`` from any image source. Files are center-cropped
    and resized to ``image_size`` (default: the first image's shorter side); unreadable files
    are appended to ``skipped`` as 'path: why'."""
    if isinstance(source, Tensor):
        if source.ndim != 4 or source.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [-1, 1]; got {list(source.shape)}")
        for start in range(0, len(source), batch_size):
            yield ((source[start : start + batch_size].float() + 1) / 2).clamp(0, 1)
        return
    if isinstance(source, str | os.PathLike):
        source = list_images(source)
    items = list(source) if isinstance(source, Sequence) else source
    if isinstance(items, list) and items and isinstance(items[0], str | os.PathLike):
        yield from _file_batches([Path(p) for p in items], batch_size, image_size, skipped)
        return
    for batch in items:
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"expected a tensor batch [b, 3, H, W] in [-1, 1]; got {type(batch).__name__}"
            )
        yield from iter_batches(batch, batch_size=batch_size)


def _file_batches(
    files: list[Path], batch_size: int, image_size: int | None, skipped: list[str] | None
) -> Iterator[Tensor]:
    batch: list[Tensor] = []
    for path in files:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            if skipped is None:
                raise ValueError(f"{path}: unreadable image ({error})") from error
            skipped.append(f"{path}: unreadable ({error.__class__.__name__})")
            continue
        if image_size is None:
            image_size = min(image.size)
        pixels = (
            np.asarray(center_crop_resize(image, image_size), dtype=np.float32) / 255.0
        )  # [H, W, 3]
        batch.append(torch.from_numpy(pixels).permute(2, 0, 1))  # [3, H, W]
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@dataclass(frozen=True, slots=True)
class FIDResult:
    fid: float
    num_real: int
    num_fake: int
    skipped: tuple[str, ...] = ()  # unreadable files, 'path: why'
    # Bootstrap standard error (``compute_fid(..., resamples=R)``): the spread of the FID over
    # R redraws, with replacement, of both image sets; None when not measured.
    stderr: float | None = None


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (float64):
    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, the trace of the root from the
    eigenvalues of ``S_r S_f`` (as torchmetrics computes it)."""
    mu_r, mu_f = real.mean(axis=0), fake.mean(axis=0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    eig = np.linalg.eigvals(cov_r @ cov_f)
    root_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * root_trace)


def _features(metric: FrechetInceptionDistance, batch: Tensor) -> np.ndarray:
    """The features ``metric.update`` adds for ``batch`` (its own preprocessing)."""
    images = batch
    if metric.normalize and not metric.used_custom_model:
        images = (batch * 255).byte()
    with torch.no_grad():
        return metric.inception(images).double().cpu().numpy()  # [b, D]


def _bootstrap_stderr(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int) -> float:
    rng = np.random.default_rng([seed, 11])
    draws = [
        frechet_distance(
            real[rng.integers(0, len(real), len(real))], fake[rng.integers(0, len(fake), len(fake))]
        )
        for _ in range(resamples)
    ]
    return float(np.std(draws, ddof=1))


def compute_fid(
    real: ImageSource,
    fake: ImageSource,
    *,
    feature: Literal["shapes", "inception"] | nn.Module = "shapes",
    weights_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    resamples: int = 0,
) -> FIDResult:
    """FID between two image sets (tensors in ``[-1, 1]``, folders, file lists or batches).

    ``resamples > 1`` also measures the FID's bootstrap standard error (``stderr``): the
    features of both sets are kept (extracted once, by the metric's own network and
    preprocessing), the FID is their :func:`frechet_distance`, and the distance is recomputed
    on ``resamples`` redraws."""
    if resamples == 1 or resamples < 0:
        raise ValueError(f"resamples must be 0 (no standard error) or >= 2; got {resamples}")
    metric = make_fid(feature, weights_path=weights_path, seed=seed, device=device)
    skipped: list[str] = []
    counts = {}
    kept: dict[str, list[np.ndarray]] = {"real": [], "fake": []}
    for name, source, is_real in (("real", real, True), ("fake", fake, False)):
        count = 0
        for batch in iter_batches(
            source, batch_size=batch_size, image_size=image_size, skipped=skipped
        ):
            batch = batch.to(metric.device)
            if resamples:
                kept[name].append(_features(metric, batch))  # [b, D]
            else:
                metric.update(batch, real=is_real)
            count += len(batch)
        if count < 2:
            raise ValueError(f"FID needs at least 2 {name} images; got {count}")
        counts[name] = count
    if skipped:
        warnings.warn(
            f"{len(skipped)} unreadable images skipped; first: {skipped[0]}", stacklevel=2
        )
    if not resamples:
        return FIDResult(float(metric.compute()), counts["real"], counts["fake"], tuple(skipped))
    real_features, fake_features = np.concatenate(kept["real"]), np.concatenate(kept["fake"])
    return FIDResult(
        frechet_distance(real_features, fake_features), counts["real"], counts["fake"],
        tuple(skipped), _bootstrap_stderr(real_features, fake_features, resamples, seed),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# MS-COCO 2014 zero-shot protocol


@dataclass(frozen=True, slots=True)
class CocoPair:
    image_id: int
    file_name: str
    caption: str


def sample_coco_pairs(
    captions_json: str | os.PathLike[str], *, num: int = 30_000, seed: int = 0
) -> list[CocoPair]:
    """A seeded draw of ``num`` caption-image pairs from a COCO captions file
    (``captions_val2014.json`` format): ``num`` distinct images, one random caption each."""
    path = Path(captions_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {path} does not exist")
    try:
        data = json.loads(path.read_text())
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[tuple[int, str]]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(
                (int(ann["id"]), str(ann["caption"]).strip())
            )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: expected COCO captions JSON with 'images' [{{'id', 'file_name'}}] and "
            f"'annotations' [{{'id', 'image_id', 'caption'}}] ({error!r})"
        ) from error
    image_ids = sorted(i for i in captions if i in files)
    if num > len(image_ids):
        raise ValueError(
            f"{path} has {len(image_ids)} captioned images; cannot draw {num} distinct ones"
        )
    rng = np.random.default_rng(seed)
    pairs = []
    for image_id in sorted(
        image_ids[i] for i in rng.choice(len(image_ids), size=num, replace=False)
    ):
        options = sorted(captions[image_id])  # by annotation id: independent of file order
        pairs.append(
            CocoPair(image_id, files[image_id], options[int(rng.integers(len(options)))][1])
        )
    return pairs
