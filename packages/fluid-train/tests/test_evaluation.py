"""``fluid eval coco`` (COCO-protocol FID end to end) and ``fluid eval loss`` (held-out loss)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluid_train.cli import evaluate as evaluate_cli


def _run_eval(argv):
    parser = argparse.ArgumentParser(prog="fluid")
    evaluate_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def write_coco(root: Path, *, num_images: int = 7) -> tuple[Path, Path]:
    """A COCO-2014-style captions file + JPEG folder: non-square images, 2 captions each."""
    rng = np.random.default_rng(0)
    images_dir = root / "train2014"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        name = f"COCO_train2014_{image_id:012d}.jpg"
        size = (40, 28) if i % 2 else (22, 34)  # wide and tall: both get center-cropped
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for j, colour in enumerate(("red", "blue")):
            annotations.append({"id": 10 * i + j, "image_id": image_id,
                                "caption": f"a photo of {i + 1} {colour} squares "})  # fmt: skip
    captions = root / "annotations" / "captions_train2014.json"
    captions.parent.mkdir()
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return captions, images_dir


def test_eval_coco_end_to_end_on_a_synthetic_layout(tmp_path, tiny_pipeline):
    from fluid_eval.fid import compute_fid, sample_coco_pairs

    tiny_pipeline("continuous", "random").save_pretrained(tmp_path / "run" / "pipeline")
    captions, images = write_coco(tmp_path / "coco")
    out = tmp_path / "fid"
    argv = ["coco", "--model", str(tmp_path / "run"), "--captions", str(captions), "--images",
            str(images), "--out", str(out), "--num-pairs", "5", "--feature", "shapes", "--steps", "2",
            "--cfg", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert _run_eval(argv) == 0
    report = json.loads((out / "report.json").read_text())
    pairs = sample_coco_pairs(captions, num=5, seed=0)
    assert [
        json.loads(line)["caption"] for line in (out / "pairs.jsonl").read_text().splitlines()
    ] == [p.caption for p in pairs]
    index = [
        json.loads(line) for line in (out / "samples" / "index.jsonl").read_text().splitlines()
    ]
    assert [e["prompt"] for e in index] == [p.caption for p in pairs]
    samples = sorted((out / "samples").glob("0*.png"))
    assert len(samples) == 5 and all(Image.open(p).size == (16, 16) for p in samples)
    assert report["num_images"] == report["num_real"] == 5
    assert report["image_size"] == 16 and report["feature"] == "shapes"
    assert report["settings"]["options"] == {"num_steps": 2, "cfg": 2.0}
    assert report["wall_s"] >= report["generation_s"] > 0 and report["images_generated"] == 5
    # The FID is the one of the sampled real images center-cropped to the model resolution.
    expected = compute_fid([images / p.file_name for p in pairs], samples, feature="shapes",
                           image_size=16)  # fmt: skip
    assert math.isfinite(report["fid"]) and report["fid"] == pytest.approx(expected.fid)
    # Run again: nothing is generated anew, the score is the same.
    assert _run_eval(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["images_generated"] == 0 and again["prompts_resumed"] == 5
    assert again["fid"] == pytest.approx(report["fid"])
    # Under torchrun only rank 0 computes FID: the metric must not wait for the other ranks.
    from fluid_eval.fid import make_fid

    assert make_fid("shapes").sync_on_compute is False


def test_eval_coco_names_missing_inputs(tmp_path, tiny_pipeline, capsys):
    tiny_pipeline("continuous", "random").save_pretrained(tmp_path / "run" / "pipeline")
    captions, images = write_coco(tmp_path / "coco")
    next(images.glob("*.jpg")).unlink()
    base = ["coco", "--model", str(tmp_path / "run"), "--captions", str(captions), "--images",
            str(images), "--out", str(tmp_path / "fid"), "--no-progress"]  # fmt: skip
    assert _run_eval([*base, "--num-pairs", "7", "--feature", "shapes"]) == 2
    assert "1 of the 7 sampled COCO images are missing" in capsys.readouterr().err
    assert _run_eval([*base, "--num-pairs", "3"]) == 2  # inception without its weights file
    assert "weights_path" in capsys.readouterr().err
    assert not (tmp_path / "fid" / "samples").exists()  # failed before generating


# ---------------------------------------------------------------------- validation loss


def _eval_loss(run: Path, data: Path, out: Path, *options: str) -> dict:
    """``fluid eval loss`` of the pipeline saved in ``run`` on ``data``; the JSON it wrote."""
    argv = ["loss", "--model", str(run), "--data", str(data), "--out", str(out), *options]
    assert _run_eval(argv) == 0
    return json.loads(out.read_text())


def test_eval_loss_is_the_same_for_any_number_of_ranks(tmp_path, tiny_pipeline, encoded_shards):
    from fluid_train.evaluation import combine_shard_losses, shard_losses

    pipe = tiny_pipeline("continuous", "random")
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    val = encoded_shards(tmp_path / "val", pipe.model.config, shards=3, per_shard=5)
    shards = [str(val / f"{s:05d}.tar") for s in range(3)]
    loss_args = [tmp_path / "run", val, tmp_path / "loss.json", "--batch-size", "2"]
    result = _eval_loss(*loss_args)
    assert result["num_images"] == 15 and result["num_shards"] == 3
    assert result["num_batches"] == 9 and result["processes"] == 1  # 2 + 2 + 1 per shard
    # Two ranks: rank 0 takes shards 0 and 2, rank 1 shard 1; the merge gives the same number.
    model = pipe.model
    parts = [shard_losses(model, shards, idx, batch_size=2, seed=0) for idx in ([0, 2], [1])]
    two = combine_shard_losses(parts, num_shards=3, processes=2, seed=0)
    assert two.mean == pytest.approx(result["mean"], rel=1e-6)
    assert two.std_error == pytest.approx(result["std_error"], rel=1e-6)
    # Weighted by images: the last batch of each shard holds one image.
    records = [r for s in (0, 1, 2) for r in {**parts[0][0], **parts[1][0]}[s]]
    assert [w for _, w in records] == [2, 2, 1] * 3
    assert result["mean"] == pytest.approx(sum(v * w for v, w in records) / 15, rel=1e-6)
    # A fixed seed: the same again; another seed draws other masks and noise.
    assert _eval_loss(*loss_args)["mean"] == result["mean"]
    assert _eval_loss(*loss_args, "--seed", "1")["mean"] != result["mean"]


def test_eval_loss_encodes_image_shards_with_the_pipeline(tmp_path, tiny_pipeline):
    from fluid_eval.shapes import write_shards

    tiny_pipeline("discrete", "random").save_pretrained(tmp_path / "run" / "pipeline")
    write_shards(tmp_path / "val", 6, seed=1, size=16, shard_size=4)
    result = _eval_loss(
        tmp_path / "run", tmp_path / "val", tmp_path / "loss.json", "--batch-size", "4"
    )
    assert result["num_images"] == 6 and result["num_shards"] == 2
    assert math.isfinite(result["mean"]) and result["mean"] > 0
