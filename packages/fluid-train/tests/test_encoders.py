"""The frozen encoders on every device: `fluid preprocess` over 4 SPMD devices (torch_xla's CPU
PJRT device) and over 2 torchrun processes gives the single-process CPU shards; training on
raw image shards on xla runs the tokenizer and T5 on the device with a flat graph count.

The xla runs share one subprocess (``xr.use_spmd()`` is process-global): preprocessing with the
weights replicated, then sharded over the 4 devices, then 6 training steps on image shards.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluid_train.data import iter_raw_samples, write_shard
from fluid_train.preprocess import (
    EncodeRuntime,
    FrozenEncoders,
    encoders_fit,
    load_text_encoder,
    load_tokenizer,
    preprocess,
)

TEXT_LENGTH = 24
# Words the tiny T5's SentencePiece model was trained on (conftest.TINY_PROMPTS).
TINY_PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle left of a yellow circle",
]
XLA_STEPS = 6


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 18), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_shards(root: Path, *, shards: int = 2, per_shard: int = 7) -> Path:
    """Captions of 1 to 7 words (different real lengths); shard 0 holds one broken image."""
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            color = ((37 * i + 90 * s) % 255, (91 * i) % 255, (53 * s + 17 * i) % 255)
            words = TINY_PROMPTS[(s + i) % len(TINY_PROMPTS)].split()
            caption = " ".join(words[: 1 + (3 * s + i) % 7])
            samples.append({"__key__": f"{s}{i:04d}", "png": png(color), "txt": caption})
        if s == 0:
            samples[2]["png"] = b"\x89PNG broken"
        write_shard(root / f"{s:05d}.tar", samples)
    return root


@pytest.fixture
def world(tmp_path, saved_encoders):
    """Saved tiny SD-VAE tokenizer + T5, the matching tiny model config, and image shards."""
    return {
        "tokenizer": str(saved_encoders.tokenizer),
        "text_encoder": str(saved_encoders.text_encoder),
        "model": saved_encoders.pipeline.model.config.replace(text_length=TEXT_LENGTH),
        "images": str(image_shards(tmp_path / "images")),
    }


def read_encoded(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every sample of every shard in ``directory``: key -> entry -> array (captions as str)."""
    samples = {}
    for shard in sorted(directory.glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            entries = {}
            for name, value in raw.items():
                if name.endswith(".npy"):
                    entries[name] = np.load(io.BytesIO(value))
                elif name == "txt":
                    entries[name] = value.decode()
            samples[f"{shard.name}/{raw['__key__']}"] = entries
    return samples


def assert_same_shards(got: Path, want: Path) -> None:
    """Tokens to 1e-5; text states (stored float16) to one float16 step; the rest exactly."""
    a, b = read_encoded(got), read_encoded(want)
    assert sorted(a) == sorted(b) and len(b) == 13  # 14 samples, one broken image skipped
    for key, entries in b.items():
        assert a[key].keys() == entries.keys(), key
        for name, value in entries.items():
            if name in ("tokens.npy", "tokens_std.npy"):
                np.testing.assert_allclose(a[key][name], value, rtol=1e-5, atol=1e-5)
            elif name == "text.npy":
                assert a[key][name].shape == value.shape and value.dtype == np.float16
                np.testing.assert_allclose(
                    a[key][name].astype(np.float32), value.astype(np.float32),
                    rtol=2**-10, atol=2**-10,
                )  # fmt: skip
            else:
                assert (
                    np.array_equal(a[key][name], value) if name != "txt" else a[key][name] == value
                )


def test_trimmed_preprocess_records_its_bytes_and_the_fit_rule(tmp_path, world):
    result = preprocess(
        world["images"], tokenizer=world["tokenizer"], text_encoder=world["text_encoder"],
        out=tmp_path / "cpu", pad_to=TEXT_LENGTH, batch_size=3, device="cpu",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "cpu" / "preprocess.json").read_text())
    samples = read_encoded(tmp_path / "cpu")
    stored = sum(s["text.npy"].shape[0] for s in samples.values())
    real = sum(int(s["text_mask.npy"].sum()) for s in samples.values())
    assert stored == real < TEXT_LENGTH * len(samples)  # only the real tokens are stored
    assert manifest["bytes"]["mean_text_tokens"] == pytest.approx(real / len(samples))
    assert manifest["bytes"]["per_sample"] == pytest.approx(result.bytes_per_sample)
    assert manifest["bytes"]["text_per_sample"] < manifest["bytes"]["text_per_sample_padded"]
    assert manifest["encoders"] == {"device": "cpu", "dtype": "float32", "weights": "replicated"}
    # T5-XXL in bf16 (4.76e9 parameters x 2 bytes) next to one accelerator's memory.
    t5_xxl = 4_762_310_656 * 2
    assert encoders_fit(t5_xxl, 80 * 2**30) and encoders_fit(t5_xxl, 24 * 2**30)
    assert not encoders_fit(t5_xxl, 16 * 2**30) and encoders_fit(t5_xxl, None)
    encoders = FrozenEncoders(
        load_tokenizer(world["tokenizer"]), load_text_encoder(world["text_encoder"]),
        text_length=TEXT_LENGTH,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="GPUs of at least"):  # sharding is xla's only
        EncodeRuntime("cpu", shard_weights=True).place(encoders)


def test_preprocess_options_are_one_object_for_the_flags_and_the_function(
    tmp_path, world, monkeypatch
):
    import fluid_train.preprocess
    from fluid_train.cli import main
    from fluid_train.config import PreprocessOptions

    def flags_to_options(*flags: str) -> PreprocessOptions:
        """The options `fluid preprocess` hands the library for ``flags``."""
        seen = []

        def capture(*args, options, **kwargs):
            seen.append(options)
            raise ValueError("captured")  # the command reports it and stops (exit 2)

        monkeypatch.setattr(fluid_train.preprocess, "preprocess", capture)
        assert main(["preprocess", "--data", "x", "--tokenizer", "t", "--text-encoder", "e",
                     "--out", str(tmp_path / "o"), *flags]) == 2  # fmt: skip
        monkeypatch.undo()
        return seen[0]

    # The flags' defaults are the dataclass's; a flag sets its field (None keeps "decide").
    assert flags_to_options() == PreprocessOptions()
    assert flags_to_options("--no-shard-weights", "--text-storage", "padded", "--pad-to", "7") == (
        PreprocessOptions(shard_weights=False, text_storage="padded", pad_to=7)
    )
    assert flags_to_options("--shard-weights").shard_weights is True
    with pytest.raises(SystemExit):
        flags_to_options("--text-dtype", "int8")  # choices come from the Literal

    # From Python: an options object, with keyword overrides of its fields on top.
    base = PreprocessOptions(pad_to=TEXT_LENGTH, text_storage="trimmed", device="cpu")
    parts = {k: world[k] for k in ("tokenizer", "text_encoder")}
    preprocess(world["images"], **parts, out=tmp_path / "padded", options=base, text_storage="padded")  # fmt: skip
    manifest = json.loads((tmp_path / "padded" / "preprocess.json").read_text())
    assert manifest["text"] == {**manifest["text"], "storage": "padded", "length": TEXT_LENGTH}
    assert read_encoded(tmp_path / "padded")  # shards were written
    with pytest.raises(TypeError, match=r"unknown preprocess option\(s\) \['pad'\]"):
        preprocess(world["images"], **parts, out=tmp_path / "x", pad=3)
    with pytest.raises(ValueError, match="text_storage must be one of"):
        preprocess(world["images"], **parts, out=tmp_path / "x", text_storage="zip")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        PreprocessOptions(batch_size=0)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_two_torchrun_processes_write_the_single_process_shards(tmp_path, world, child_env):
    common = ["--data", world["images"], "--tokenizer", world["tokenizer"], "--text-encoder",
              world["text_encoder"], "--pad-to", str(TEXT_LENGTH), "--batch-size", "3"]  # fmt: skip
    preprocess(
        world["images"], tokenizer=world["tokenizer"], text_encoder=world["text_encoder"],
        out=tmp_path / "cpu", pad_to=TEXT_LENGTH, batch_size=4, device="cpu",
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29531", "-m", "fluid_train.cli", "preprocess", *common,
         "--out", str(tmp_path / "ranks"), "--device", "cpu"],
        env=child_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 0 of 2" in proc.stdout and "part 1 of 2" in proc.stdout
    assert_same_shards(tmp_path / "ranks", tmp_path / "cpu")
    merged = json.loads((tmp_path / "ranks" / "preprocess.json").read_text())
    single = json.loads((tmp_path / "cpu" / "preprocess.json").read_text())
    assert merged["samples"] == single["samples"] == 13 and merged["parts"] == 2
    assert merged["skipped"] == single["skipped"]
    assert merged["bytes"]["total"] == single["bytes"]["total"]


XLA_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch_xla
    from fluid_train.model import FluidConfig
    from fluid_train.preprocess import preprocess
    from fluid_train.recipe import TrainConfig
    from fluid_train.trainer import Trainer

    spec = json.loads(open(sys.argv[1]).read())
    report = {}
    for name, shard_weights in (("xla", False), ("xla_sharded", True)):
        result = preprocess(spec["images"], tokenizer=spec["tokenizer"],
                            text_encoder=spec["text_encoder"], out=spec[name],
                            pad_to=spec["pad_to"], batch_size=3, device="xla",
                            shard_weights=shard_weights)
        report[name] = result.samples
    trainer = Trainer(TrainConfig.from_dict(spec["train"]),
                      model_config=FluidConfig.from_dict(spec["model"]))
    weight = trainer.encoders.text_encoder.model.get_input_embeddings().weight
    report["encoder_device"] = weight.device.type
    report["encoder_dtype"] = str(weight.dtype)
    trainer.fit()
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.xla
@pytest.mark.slow
def test_xla_preprocess_on_4_devices_and_training_on_image_shards(
    tmp_path, world, run_script, xla_env
):
    preprocess(
        world["images"], tokenizer=world["tokenizer"], text_encoder=world["text_encoder"],
        out=tmp_path / "cpu", pad_to=TEXT_LENGTH, batch_size=5, device="cpu",
    )  # fmt: skip
    run = tmp_path / "run"
    spec = {
        **{k: world[k] for k in ("images", "tokenizer", "text_encoder")},
        "pad_to": TEXT_LENGTH,
        "xla": str(tmp_path / "xla"),
        "xla_sharded": str(tmp_path / "xla_sharded"),
        "model": world["model"].to_dict(),
        "train": dict(
            out=str(run),
            backend="xla",
            precision="fp32",
            batch_size=4,
            steps=XLA_STEPS,
            log_every=1,
            ckpt_every=100,
            schedule={"warmup_steps": 2},
            progress=False,
            data={"shards": [world["images"]], "shuffle_buffer": 4, "text_length": TEXT_LENGTH},
            tokenizer=world["tokenizer"],
            text_encoder=world["text_encoder"],
            export=False,
        ),  # fmt: skip
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    xla = xla_env(4)
    report = run_script(
        XLA_SCRIPT, tmp_path / "xla_runs.py", spec_file, env=xla, timeout=600
    ).report

    # Batches of 3 per host become 4 rows (one per device), short batches padded and cut.
    assert report["xla"] == report["xla_sharded"] == 13
    assert_same_shards(tmp_path / "xla", tmp_path / "cpu")
    assert_same_shards(tmp_path / "xla_sharded", tmp_path / "cpu")
    manifest = json.loads((tmp_path / "xla_sharded" / "preprocess.json").read_text())
    assert manifest["encoders"]["weights"] == "sharded"
    assert manifest["encoders"]["device"].startswith("xla")

    # Training on image shards: the encoders on the xla device, their graph and the step's
    # compiled once each — the count after step 1 stays flat.
    assert report["encoder_device"] == "xla" and report["encoder_dtype"] == "torch.float32"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    compiles = {r["step"]: r["compiles"] for r in records}
    assert len(records) == XLA_STEPS and all(np.isfinite(r["loss"]) for r in records)
    assert compiles[1] == compiles[2] == compiles[XLA_STEPS] > 0, compiles


def test_parts_are_read_from_their_folder_or_a_pipeline_and_bad_folders_are_named(tmp_path):
    import re

    from fluid_train.encoders import text_encoder_width

    part = tmp_path / "t5"
    part.mkdir()
    (part / "config.json").write_text(json.dumps({"d_model": 48}))
    assert text_encoder_width(part) == 48
    pipeline = tmp_path / "pipe"
    (pipeline / "text_encoder").mkdir(parents=True)
    (pipeline / "fluid_pipeline.json").write_text("{}")
    (pipeline / "text_encoder" / "config.json").write_text(json.dumps({"d_model": 64}))
    assert text_encoder_width(pipeline) == 64  # a pipeline's text_encoder/, not the pipeline

    missing = re.escape(f"text encoder {tmp_path / 'none'} has no config.json (a saved T5 ")
    with pytest.raises(FileNotFoundError, match=missing):
        text_encoder_width(tmp_path / "none")
    (pipeline / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="text_encoder/config.json has no d_model"):
        text_encoder_width(pipeline)

    missing = re.escape(f"tokenizer {pipeline / 'tokenizer'} has no config.json (a saved tok")
    with pytest.raises(FileNotFoundError, match=missing):
        load_tokenizer(pipeline)
    (pipeline / "tokenizer").mkdir()
    (pipeline / "tokenizer" / "config.json").write_text(json.dumps({"_class_name": "UNet"}))
    with pytest.raises(ValueError, match="config.json names 'UNet'; expected AutoencoderKL"):
        load_tokenizer(pipeline)


def test_a_pipelines_text_encoder_loads_at_its_saved_max_length(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("continuous", "random")
    pipe.text_encoder.max_length = 11  # saved in the manifest, as FluidPipeline reads it back
    pipe.save_pretrained(tmp_path / "pipe")
    assert load_text_encoder(tmp_path / "pipe").max_length == 11
    assert load_text_encoder(tmp_path / "pipe", max_length=7).max_length == 7
    assert load_text_encoder(tmp_path / "pipe" / "text_encoder").max_length != 11  # the default
