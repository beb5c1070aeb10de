from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_eval import fid, shapes


def _renders(seed: int, num: int, *, blur: bool = False) -> torch.Tensor:
    images = []
    for i in range(num):
        image = shapes.render_image(
            shapes.sample_training_pair(np.random.default_rng([seed, i])).scene
        )
        if blur:
            image = image.resize((16, 16), Image.Resampling.BILINEAR).resize(
                (64, 64), Image.Resampling.BILINEAR
            )
        images.append(np.asarray(image))
    return (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    )  # [N, 3, 64, 64]


@pytest.fixture(scope="module")
def sets() -> dict[str, torch.Tensor]:
    return {"a": _renders(0, 96), "b": _renders(1, 96), "blurry": _renders(0, 96, blur=True)}


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_difference(sets) -> None:
    same = fid.compute_fid(sets["a"], sets["a"]).fid
    fresh = fid.compute_fid(sets["a"], sets["b"]).fid  # same world, other samples
    blurry = fid.compute_fid(sets["a"], sets["blurry"]).fid
    noise = fid.compute_fid(sets["a"], torch.rand(96, 3, 64, 64) * 2 - 1).fid
    assert abs(same) < 1e-3
    assert fresh > 100 * max(abs(same), 1e-6)
    assert noise > blurry > fresh > 0


def test_feature_net_is_deterministic_from_its_seed() -> None:
    x = torch.rand(4, 3, 64, 64)
    a, b, c = (
        fid.ShapesFeatureNet(seed=3),
        fid.ShapesFeatureNet(seed=3),
        fid.ShapesFeatureNet(seed=4),
    )
    assert a(x).shape == (4, a.num_features) == (4, 2 * 128 + 48)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    assert not any(p.requires_grad for p in a.parameters())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        a(torch.rand(4, 1, 64, 64))


def test_folders_files_and_tensors_give_the_same_fid(sets, tmp_path) -> None:
    for name in ("a", "b"):
        folder = tmp_path / name / "nested"
        folder.mkdir(parents=True)
        pixels = ((sets[name] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(folder / f"{i:04d}.png")
    from_tensors = fid.compute_fid(sets["a"], sets["b"], batch_size=40).fid
    from_folders = fid.compute_fid(tmp_path / "a", tmp_path / "b", batch_size=40)
    assert from_folders.num_real == from_folders.num_fake == 96
    assert from_folders.fid == pytest.approx(from_tensors, rel=1e-3)
    files = fid.list_images(tmp_path / "b")
    batches = [sets["b"][:50], sets["b"][50:]]
    assert fid.compute_fid(files, iter(batches)).fid == pytest.approx(
        fid.compute_fid(sets["b"], sets["b"]).fid, abs=1e-3
    )
    # An unreadable file is skipped and counted; the rest still gives a result.
    (tmp_path / "b" / "nested" / "9999.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="1 unreadable images skipped"):
        result = fid.compute_fid(tmp_path / "a", tmp_path / "b")
    assert result.num_fake == 96 and len(result.skipped) == 1 and "9999.png" in result.skipped[0]


def test_any_feature_module_and_clear_errors(tmp_path) -> None:
    class ColourMean(torch.nn.Module):
        num_features = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    levels = torch.linspace(0.2, 1.0, 8)  # [8] red (then blue) intensities in [0, 1]
    red = torch.full((8, 3, 8, 8), 0.5)
    red[:, 0] = levels[:, None, None]
    blue = red[:, [2, 1, 0]]
    # By hand: features (v, .5, .5) vs (.5, .5, v); the covariances are orthogonal, so
    # FID = |mean difference|^2 + trace of both covariances.
    expected = 2 * (levels.mean() - 0.5) ** 2 + 2 * levels.var()
    got = fid.compute_fid(red * 2 - 1, blue * 2 - 1, feature=ColourMean()).fid
    assert got == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="needs weights_path"):
        fid.make_fid("inception")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fid.make_fid("inception", weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="feature must be"):
        fid.make_fid("clip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.compute_fid(tmp_path / "none", tmp_path / "none")
    with pytest.raises(ValueError, match="at least 2 real images"):
        fid.compute_fid(red[:1] * 2 - 1, blue)


def test_inception_needs_torch_fidelity_when_absent(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match=r"fluid-eval\[fid\]"):
        fid.make_fid("inception", weights_path=weights)


def test_center_crop_resize_keeps_the_middle() -> None:
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 200))  # a blue stripe cropped away
    out = fid.center_crop_resize(image, 256)
    assert out.size == (256, 256) and np.asarray(out)[..., 2].max() == 0


def test_coco_pairs_are_a_seeded_draw_of_distinct_images(tmp_path) -> None:
    data = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(50)],
        "annotations": [{"id": 1000 + 5 * i + k, "image_id": i, "caption": f"image {i} caption {k} "}
                        for i in range(50) for k in range(5)],
    }  # fmt: skip
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    pairs = fid.sample_coco_pairs(path, num=30, seed=3)
    assert len({p.image_id for p in pairs}) == 30
    assert all(
        p.caption.startswith(f"image {p.image_id} caption ")
        and p.file_name.endswith(f"{p.image_id:012d}.jpg")
        for p in pairs
    )
    assert pairs == fid.sample_coco_pairs(path, num=30, seed=3)
    assert pairs != fid.sample_coco_pairs(path, num=30, seed=4)
    # The draw does not depend on the order of the file's entries.
    data["annotations"].reverse()
    data["images"].reverse()
    path.write_text(json.dumps(data))
    assert pairs == fid.sample_coco_pairs(path, num=30, seed=3)
    with pytest.raises(ValueError, match="cannot draw 51"):
        fid.sample_coco_pairs(path, num=51)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected COCO captions JSON"):
        fid.sample_coco_pairs(path, num=1)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20000, 3))
    shift = np.array([1.0, -2.0, 0.5])
    # Same covariance: the trace term vanishes and the distance is |shift|^2 = 5.25.
    assert fid.frechet_distance(real, real + shift) == pytest.approx(5.25, abs=0.05)
    scaled = fid.frechet_distance(real, 2.0 * real)  # tr(I + 4I - 2*2I) = 3
    assert scaled == pytest.approx(3.0, abs=0.05)


def test_bootstrap_stderr_is_the_spread_of_fresh_draws() -> None:
    # Gaussian features, 200 real and 200 fake: the FID's spread over fresh independent draws
    # is what the bootstrap estimates from one draw. Averaged over 8 draws it comes within 20%
    # (resampling only one side gives ~0.65 of it, a constant guess nothing like it).
    shift = np.array([1.0, 0.0, 0.0])
    rng = np.random.default_rng(5)
    fresh = [
        fid.frechet_distance(rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + shift)
        for _ in range(300)
    ]
    estimates = []
    for s in range(8):
        draw = np.random.default_rng([s, 1])
        real, fake = draw.normal(size=(200, 3)), draw.normal(size=(200, 3)) + shift
        estimates.append(fid._bootstrap_stderr(real, fake, resamples=100, seed=0))
    assert np.mean(estimates) / np.std(fresh, ddof=1) == pytest.approx(1.0, abs=0.2)


def test_bootstrap_stderr_keeps_the_fid_and_measures_its_spread(sets) -> None:
    plain = fid.compute_fid(sets["a"], sets["b"])
    measured = fid.compute_fid(sets["a"], sets["b"], resamples=20)
    assert plain.stderr is None
    assert measured.fid == pytest.approx(plain.fid, rel=1e-6)  # the point estimate is unchanged
    assert measured.stderr is not None and 0 < measured.stderr < plain.fid
    few = fid.compute_fid(sets["a"][:24], sets["b"][:24], resamples=20)
    assert few.stderr > measured.stderr  # fewer images, noisier FID
    with pytest.raises(ValueError, match="resamples"):
        fid.compute_fid(sets["a"], sets["b"], resamples=1)
