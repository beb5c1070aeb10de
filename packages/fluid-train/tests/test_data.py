"""Data: shard lists, decoding, skip counting, deterministic order and exact resumption."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fluid_train.data import (
    SkipSample,
    TrainLoader,
    center_crop_resize,
    decode_encoded_sample,
    decode_image_sample,
    describe_skips,
    expand_shards,
    write_shard,
)
from fluid_train.preprocess import encoded_sample


def png_bytes(color=(255, 0, 0), size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_samples(prefix: str, n: int) -> list[dict]:
    return [
        {
            "__key__": f"{prefix}{i:04d}",
            "png": png_bytes((10 * i % 255, 0, 0)),
            "txt": f"caption {i}",
        }
        for i in range(n)
    ]


def indexed_encoded_shards(root, shards: int, per_shard: int) -> list[str]:
    """Encoded shards whose sample i has tokens [i, 0, 0, 0] (ids tell samples apart)."""
    paths = []
    for s in range(shards):
        samples = [
            encoded_sample(
                f"{s}{i:04d}",
                tokens=np.array([s * per_shard + i, 0, 0, 0]),
                text_hidden=np.zeros((3, 2), np.float32),
                text_mask=np.array([True, False, False]),
            )
            for i in range(per_shard)
        ]
        path = root / f"{s:05d}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    return paths


def ids(batch) -> list[int]:
    return batch.tensors["tokens"][:, 0].tolist()


def test_data_re_exports_the_whole_sample_api():
    import fluid_train.samples

    namespace: dict = {}
    exec("from fluid_train.data import *", namespace)  # fails on a name data does not hold
    for name in fluid_train.samples.__all__:
        assert namespace[name] is getattr(fluid_train.samples, name), name
    assert namespace["TrainLoader"] is TrainLoader


# ---------------------------------------------------------------------- shard lists


def test_expand_shards_paths_dirs_globs_braces_and_errors(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", image_samples("a", 1))
    expected = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path)) == expected
    assert expand_shards(str(tmp_path / "*.tar")) == expected
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == expected
    assert expand_shards([expected[2], expected[0]]) == [expected[2], expected[0]]
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]  # URLs are passed through
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        expand_shards(str(tmp_path / "missing.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(str(tmp_path / "*.zip"))
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])


# ---------------------------------------------------------------------- decoding


def test_center_crop_resize_keeps_the_center_and_the_size():
    # 300x100: left third red, middle green, right blue -> the center crop is all green.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    out = center_crop_resize(image, 16)
    assert out.size == (16, 16)
    array = np.asarray(out).astype(int)
    assert np.abs(array[2:-2, 2:-2] - [0, 255, 0]).max() <= 2
    big = center_crop_resize(Image.new("RGB", (1000, 700), (7, 8, 9)), 32)  # box-halving path
    assert big.size == (32, 32) and np.asarray(big)[16, 16].tolist() == [7, 8, 9]


def test_decode_image_sample_values_caption_and_skips():
    image, caption = decode_image_sample(
        {"__key__": "k", "png": png_bytes((255, 0, 0)), "txt": b" a red square \n"}, 8
    )
    assert caption == "a red square"
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    # img2dataset's json caption when .txt is missing
    _, caption = decode_image_sample(
        {"__key__": "k", "jpg": png_bytes(), "json": json.dumps({"caption": "from json"}).encode()},
        8,
    )
    assert caption == "from json"
    with pytest.raises(SkipSample) as info:
        decode_image_sample({"__key__": "k", "png": b"not an image", "txt": b"x"}, 8)
    assert info.value.reason == "unreadable_image"
    with pytest.raises(SkipSample) as info:
        decode_image_sample({"__key__": "k", "png": png_bytes(), "txt": b"   "}, 8)
    assert info.value.reason == "missing_caption"
    with pytest.raises(SkipSample) as info:
        decode_image_sample({"__key__": "k", "txt": b"caption only"}, 8)
    assert info.value.reason == "missing_image"


def test_decode_encoded_sample_types_and_shape_checks():
    raw = encoded_sample(
        "k",
        tokens=np.random.rand(4, 3),
        token_std=np.random.rand(4, 3),
        text_hidden=np.random.rand(5, 2),
        text_mask=np.array([1, 1, 0, 0, 0]),
    )
    out = decode_encoded_sample(
        raw, {"tokens": (4, 3), "token_std": (4, 3), "text_hidden": (-1, 2)}
    )
    assert out["tokens"].dtype == torch.float32 and out["text_mask"].dtype == torch.bool
    assert out["text_hidden"].dtype == torch.float32  # stored float16, trained in float32
    assert out["text_mask"].tolist() == [True, True, False, False, False]
    ids = decode_encoded_sample(
        encoded_sample("k", tokens=np.arange(4), text_hidden=np.zeros((5, 2)), text_mask=np.ones(5))
    )["tokens"]
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 2, 3]
    for expected in ({"tokens": (5, 3)}, {"text_hidden": (-1, 7)}):
        with pytest.raises(SkipSample) as info:
            decode_encoded_sample(raw, expected)
        assert info.value.reason == "malformed"
    with pytest.raises(SkipSample, match="token_std"):  # std here, absent from the first sample
        decode_encoded_sample(
            raw, {"tokens": (4, 3), "text_hidden": (5, 2), "text_mask": (5,)}, exact=True
        )
    assert describe_skips("d/1.tar", {"unreadable_image": 3, "missing_caption": 0}) == (
        "shard d/1.tar: 3 unreadable images skipped"
    )


# ---------------------------------------------------------------------- the loader


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    samples = image_samples("a", 6)
    samples[1]["png"] = b"\x89PNG corrupt"
    del samples[3]["txt"]
    write_shard(tmp_path / "00000.tar", samples)
    loader = TrainLoader(str(tmp_path), batch_size=2, image_size=8, shuffle_buffer=0)
    assert loader.kind == "images"
    with caplog.at_level(logging.WARNING, logger="fluid_train"):
        iterator = iter(loader)
        batches = [next(iterator) for _ in range(2)]  # the 4 good samples of epoch 0
        for batch in batches:
            loader.commit(batch)
    assert [b.captions for b in batches] == [["caption 0", "caption 2"], ["caption 4", "caption 5"]]
    assert batches[0].tensors["images"].shape == (2, 3, 8, 8)
    assert loader.skip_totals()["unreadable_image"] == 1
    assert loader.skip_totals()["missing_caption"] == 1
    message = f"shard {tmp_path / '00000.tar'}: 1 unreadable images skipped, 1 samples without a caption skipped"
    assert message in caplog.text
    assert loader.skips_by_shard() == {
        str(tmp_path / "00000.tar"): {"unreadable_image": 1, "missing_caption": 1}
    }


def test_an_unreadable_shard_is_counted_and_the_rest_is_read(tmp_path, caplog):
    write_shard(tmp_path / "00000.tar", image_samples("a", 4))
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    loader = TrainLoader(str(tmp_path), batch_size=1, image_size=8, shuffle_buffer=0)
    iterator = iter(loader)
    with caplog.at_level(logging.WARNING, logger="fluid_train"):
        captions = []
        for _ in range(6):  # more than one epoch of good samples: every shard is visited
            batch = next(iterator)
            loader.commit(batch)
            captions += batch.captions
    assert set(captions) == {f"caption {i}" for i in range(4)}
    assert loader.skip_totals()["read_error"] >= 1
    assert f"shard {tmp_path / '00001.tar'}: read error skipped" in caplog.text


def test_order_is_deterministic_per_seed_and_epochs_cover_every_sample(tmp_path):
    urls = indexed_encoded_shards(tmp_path, shards=3, per_shard=5)

    def first(seed: int, count: int) -> list[int]:
        loader = TrainLoader(urls, batch_size=5, image_size=8, seed=seed, shuffle_buffer=4)
        iterator = iter(loader)
        return [i for _ in range(count) for i in ids(next(iterator))]

    epoch = first(0, 3)
    assert sorted(epoch) == list(range(15))  # one epoch = each sample exactly once
    assert epoch != list(range(15))  # shuffled
    assert first(0, 6) == first(0, 6)  # same seed, same order (two epochs)
    assert first(0, 6)[15:] != epoch  # each epoch reshuffles
    assert first(1, 3) != epoch


@pytest.mark.parametrize("workers,memory_mb", [(0, 0), (2, 0), (0, 1), (2, 1)])
def test_resume_continues_with_exactly_the_batches_the_run_would_have_seen(
    tmp_path, workers, memory_mb
):
    urls = indexed_encoded_shards(tmp_path, shards=4, per_shard=5)
    kwargs = dict(
        batch_size=3, image_size=8, seed=3, shuffle_buffer=4, num_workers=workers,
        memory_mb=memory_mb,
    )  # fmt: skip
    reference = TrainLoader(urls, **kwargs)
    iterator = iter(reference)
    expected = [ids(next(iterator)) for _ in range(12)]  # crosses the epoch boundary (20 samples)

    loader = TrainLoader(urls, **kwargs)
    iterator = iter(loader)
    for _ in range(5):  # train on 5 batches; a 6th is prefetched but never committed
        loader.commit(next(iterator))
    next(iterator)
    state = loader.state_dict()

    resumed = TrainLoader(urls, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    iterator = iter(resumed)
    assert [ids(next(iterator)) for _ in range(7)] == expected[5:]


def test_loader_rejects_inconsistent_resume_state_and_too_few_shards(tmp_path):
    urls = indexed_encoded_shards(tmp_path, shards=2, per_shard=2)
    state = TrainLoader(urls, batch_size=1, image_size=8).state_dict()
    with pytest.raises(ValueError, match="need at least 3"):
        TrainLoader(urls, batch_size=1, image_size=8, num_workers=3)
    with pytest.raises(ValueError, match="keep --data"):
        TrainLoader(urls[:1], batch_size=1, image_size=8).load_state_dict(state)


def test_malformed_encoded_samples_are_skipped(tmp_path):
    good = [
        encoded_sample(
            f"{i}", tokens=np.arange(4) + i, text_hidden=np.zeros((3, 2)), text_mask=np.ones(3)
        )
        for i in range(3)
    ]
    bad = encoded_sample(
        "9", tokens=np.arange(5), text_hidden=np.zeros((3, 2)), text_mask=np.ones(3)
    )
    write_shard(tmp_path / "0.tar", [good[0], bad, good[1], good[2]])
    loader = TrainLoader(
        str(tmp_path), batch_size=3, image_size=8, shuffle_buffer=0, expected={"tokens": (4,)}
    )
    assert loader.kind == "encoded"
    batch = next(iter(loader))
    loader.commit(batch)
    assert batch.tensors["tokens"][:, 0].tolist() == [0, 1, 2]
    assert loader.skip_totals()["malformed"] == 1


def test_shards_kept_in_memory_give_the_same_batches_without_the_files(tmp_path):
    urls = indexed_encoded_shards(tmp_path, shards=4, per_shard=5)
    kwargs = dict(batch_size=4, image_size=8, seed=1, shuffle_buffer=6)
    reading = iter(TrainLoader(urls, **kwargs))
    expected = [ids(next(reading)) for _ in range(15)]  # three epochs of 5 batches

    kept = iter(TrainLoader(urls, memory_mb=1, **kwargs))
    got = [ids(next(kept)) for _ in range(5)]  # the first epoch reads every shard
    for url in urls:
        (tmp_path / url).unlink()
    got += [ids(next(kept)) for _ in range(10)]  # later epochs come from memory
    assert got == expected

    # Over the limit nothing is kept: without the files the next epoch has nothing to read.
    urls = indexed_encoded_shards(tmp_path, shards=4, per_shard=5)
    tight = iter(TrainLoader(urls, memory_mb=1e-4, **kwargs))  # 104 bytes < one shard
    [next(tight) for _ in range(5)]
    for url in urls:
        (tmp_path / url).unlink()
    with pytest.raises(RuntimeError, match="read no sample"):
        next(tight)


def test_skips_count_alike_with_shards_in_memory(tmp_path):
    samples = [
        encoded_sample(
            f"{i}", tokens=np.arange(4) + i, text_hidden=np.zeros((3, 2)), text_mask=np.ones(3)
        )
        for i in range(4)
    ]
    samples[2] = encoded_sample(
        "9", tokens=np.arange(5), text_hidden=np.zeros((3, 2)), text_mask=np.ones(3)
    )
    write_shard(tmp_path / "0.tar", samples)
    totals = []
    for memory_mb in (0, 1):
        loader = TrainLoader(
            str(tmp_path), batch_size=3, image_size=8, shuffle_buffer=0,
            expected={"tokens": (4,)}, memory_mb=memory_mb,
        )  # fmt: skip
        iterator = iter(loader)
        for _ in range(3):  # three epochs of three good samples
            batch = next(iterator)
            assert batch.tensors["tokens"][:, 0].tolist() == [0, 1, 3]
            loader.commit(batch)
        totals.append(loader.skip_totals()["malformed"])
    assert totals == [3, 3]  # the malformed sample is counted once per epoch either way


def test_read_errors_count_alike_with_shards_in_memory(tmp_path):
    # A shard cut short: its readable samples are kept, and its read error counts every epoch
    # as a re-read would count it.
    (path,) = indexed_encoded_shards(tmp_path, shards=1, per_shard=6)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    results = []
    for memory_mb in (0, 1):
        loader = TrainLoader(
            path, batch_size=1, image_size=8, shuffle_buffer=0, memory_mb=memory_mb
        )
        iterator = iter(loader)
        seen = []
        for _ in range(9):
            batch = next(iterator)
            loader.commit(batch)
            seen += ids(batch)
        results.append((seen, loader.skip_totals()["read_error"]))
    assert results[0] == results[1]
    seen, read_errors = results[0]
    assert read_errors >= 2 and len(set(seen)) < 6  # the cut samples are never seen


def test_only_encoded_shards_are_kept_in_memory(tmp_path):
    write_shard(tmp_path / "00000.tar", image_samples("a", 2))
    with pytest.raises(ValueError, match="memory_mb=8: only encoded shards"):
        TrainLoader(str(tmp_path), batch_size=1, image_size=8, memory_mb=8)
    with pytest.raises(ValueError, match="memory_mb must be >= 0"):
        TrainLoader(str(tmp_path), batch_size=1, image_size=8, memory_mb=-1)


# ---------------------------------------------------------------------- trimmed text states


def text_states(rng, length: int, dim: int, real: int):
    """T5-like states [L, D] of ``real`` tokens: zero past them, as T5TextEncoder writes."""
    mask = np.arange(length) < real
    return rng.standard_normal((length, dim)).astype(np.float32) * mask[:, None], mask


def old_padded_sample(key, tokens, hidden, mask) -> dict:
    """A sample as `fluid preprocess` wrote them before trimming: [L, D] float16 states."""

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    return {
        "__key__": key,
        "tokens.npy": npy(tokens.astype(np.int32)),
        "text.npy": npy(hidden.astype(np.float16)),
        "text_mask.npy": npy(mask),
    }


def test_trimmed_and_padded_shards_give_identical_batches(tmp_path):
    rng = np.random.default_rng(0)
    length, dim = 7, 6
    layouts = {"trimmed": [], "padded": [], "old": [], "bf16": []}
    for s in range(3):
        for name in layouts:
            layouts[name].append([])
        for i in range(5):
            key, tokens = f"{s}{i:04d}", np.array([5 * s + i, 1, 2, 3])
            hidden, mask = text_states(rng, length, dim, real=1 + (3 * s + i) % length)
            for name, storage in (("trimmed", "trimmed"), ("padded", "padded")):
                layouts[name][s].append(encoded_sample(
                    key, tokens=tokens, text_hidden=hidden, text_mask=mask, text_storage=storage
                ))  # fmt: skip
            layouts["old"][s].append(old_padded_sample(key, tokens, hidden, mask))
            layouts["bf16"][s].append(encoded_sample(
                key, tokens=tokens, text_hidden=hidden, text_mask=mask, text_dtype="bfloat16"
            ))  # fmt: skip
    urls = {}
    for name, shards in layouts.items():
        urls[name] = [str(tmp_path / name / f"{s:05d}.tar") for s in range(len(shards))]
        for url, samples in zip(urls[name], shards, strict=True):
            write_shard(url, samples)
    rows = lambda name: [  # noqa: E731  (text rows stored per sample)
        np.load(io.BytesIO(s["text.npy"])).shape[0] for shard in layouts[name] for s in shard
    ]
    assert rows("padded") == [length] * 15
    assert (
        rows("trimmed")
        == rows("bf16")
        == [1 + (3 * s + i) % length for s in range(3) for i in range(5)]
    )

    def batches(name, **kwargs):
        loader = TrainLoader(
            urls[name], batch_size=4, image_size=8, seed=3, shuffle_buffer=4,
            expected={"tokens": (4,), "text_hidden": (-1, dim)}, **kwargs,
        )  # fmt: skip
        iterator = iter(loader)
        return [next(iterator).tensors for _ in range(8)]  # two epochs and a bit

    reference = batches("old")  # shards written before trimming still load
    assert reference[0]["text_hidden"].shape == (4, length, dim)
    for name, kwargs in (("padded", {}), ("trimmed", {}), ("trimmed", {"memory_mb": 1})):
        for got, want in zip(batches(name, **kwargs), reference, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (name, kwargs, key)
    # bfloat16 stored as its bits (uint16): the float32 states rounded to bfloat16.
    for got, want in zip(batches("bf16"), reference, strict=True):
        assert torch.equal(got["tokens"], want["tokens"])
        padding = got["text_hidden"][~got["text_mask"]]  # [rows, D] past the real tokens
        assert torch.equal(padding, torch.zeros_like(padding))
        torch.testing.assert_close(got["text_hidden"], want["text_hidden"], rtol=8e-3, atol=1e-6)


def test_trimmed_states_need_a_prefix_mask():
    hidden = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="not a prefix of real tokens"):
        encoded_sample("k", tokens=np.arange(4), text_hidden=hidden, text_mask=[1, 0, 1])
    raw = encoded_sample("k", tokens=np.arange(4), text_hidden=hidden, text_mask=[1, 1, 0])
    assert np.load(io.BytesIO(raw["text.npy"])).shape == (2, 2)  # trimmed to the real rows
    out = decode_encoded_sample(raw)
    assert out["text_hidden"].shape == (3, 2) and out["text_hidden"][2].abs().sum() == 0
    assert decode_encoded_sample(raw, pad=False)["text_hidden"].shape == (2, 2)
    bad = dict(raw, **{"text_mask.npy": encoded_sample(  # 2 rows stored, mask says 1 real
        "k", tokens=np.arange(4), text_hidden=hidden, text_mask=[1, 0, 0], text_storage="padded"
    )["text_mask.npy"]})  # fmt: skip
    with pytest.raises(SkipSample, match="trimmed to 2 rows but the mask is not 2 x True"):
        decode_encoded_sample(bad)
