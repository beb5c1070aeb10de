"""Tiny shared fixtures for fluid-train's tests (model, generation, pipeline and trainer).

Every model here is a few thousand parameters: a 4x4 token grid, width 32, two blocks, so a
training step or a full generation takes milliseconds on one CPU thread. Below them: random
encoded shards, and scripts run in a subprocess (torch_xla, torchrun) that report back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fluid_backbone import TransformerConfig
from fluid_text import AlignerConfig
from fluid_train.data import write_shard
from fluid_train.model import DiffLossConfig, FluidConfig, GenerationConfig, TrainBatch
from fluid_train.preprocess import encoded_sample

TINY_TEXT_DIM = 16  # width of the fake T5 states fed to tiny models
TINY_TEXT_LENGTH = 5

VARIANTS = [
    ("discrete", "raster"),
    ("discrete", "random"),
    ("continuous", "raster"),
    ("continuous", "random"),
]


def make_tiny_config(
    tokens: str = "continuous", order: str = "random", *, text_dim: int = TINY_TEXT_DIM, **overrides
) -> FluidConfig:
    """A tiny FluidConfig: 4x4 tokens (4 channels or 32 ids), width 32, 2 blocks, 4 steps."""
    config = FluidConfig(
        tokens=tokens,
        order=order,
        backbone=TransformerConfig(width=32, depth=2, num_heads=2, grid=(4, 4)),
        aligner=AlignerConfig(text_dim=text_dim, width=32, depth=1, num_heads=2),
        diffloss=DiffLossConfig(depth=1, width=32, train_steps=1000, sample_steps=10),
        generation=GenerationConfig(num_steps=4, cfg=2.0),
        token_dim=4,
        vocab_size=32,
        image_size=16,
        text_encoder="shapes-t5",
        text_length=TINY_TEXT_LENGTH,
    )
    return config.replace(**overrides) if overrides else config


@pytest.fixture(params=VARIANTS, ids=[f"{order}-{tokens}" for tokens, order in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Parametrizes a test over the four variants: ``(tokens, order)``."""
    return request.param


@pytest.fixture
def tiny_config() -> Callable[..., FluidConfig]:
    """``tiny_config(tokens, order, **overrides) -> FluidConfig`` (a factory)."""
    return make_tiny_config


def make_text(
    batch: int, *, length: int = TINY_TEXT_LENGTH, dim: int = TINY_TEXT_DIM, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake T5 states [B, L, D_t] and a padding mask [B, L] (row b has L - b % L real tokens)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g)
    real = length - torch.arange(batch) % length  # [B] real tokens per row, >= 1
    mask = torch.arange(length)[None, :] < real[:, None]  # [B, L]
    return hidden * mask[..., None], mask


@pytest.fixture
def tiny_text() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``tiny_text(batch, length=5, dim=16, seed=0) -> (hidden [B, L, D], mask [B, L])``."""
    return make_text


def make_train_batch(
    config: FluidConfig, batch: int = 4, *, seed: int = 0, with_std: bool = False
) -> TrainBatch:
    """Random tokens of the config's kind plus fake text states."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_tokens
    if config.tokens == "discrete":
        tokens = torch.randint(0, config.vocab_size, (batch, n), generator=g)
        std = None
    else:
        tokens = torch.randn(batch, n, config.token_dim, generator=g)
        std = 0.1 * torch.rand(batch, n, config.token_dim, generator=g) if with_std else None
    hidden, mask = make_text(batch, dim=config.text_dim, seed=seed + 1)
    return TrainBatch(tokens=tokens, text_hidden=hidden, text_mask=mask, token_std=std)


@pytest.fixture
def tiny_train_batch() -> Callable[..., TrainBatch]:
    """``tiny_train_batch(config, batch=4, seed=0, with_std=False) -> TrainBatch``."""
    return make_train_batch


# ---- a tiny pipeline: tokenizer + random T5 + model, built once per session -------------------

TINY_PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle left of a yellow circle",
    "a photo of three white squares",
    "a photo of a purple circle above a red triangle",
]


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny T5 encoder (public layout) with its own SentencePiece model."""
    from fluid_text import build_random_t5, train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_t5")
    texts = [f"{p} number {i}" for i in range(40) for p in TINY_PROMPTS]
    spm = train_sentencepiece(texts, root / "spm", vocab_size=64, vocab_limit="soft")
    return build_random_t5(root / "t5", spiece_model=spm, seed=0)


def make_tiny_model(
    tokens: str = "continuous",
    order: str = "random",
    *,
    seed: int = 0,
    text_dim: int = TINY_TEXT_DIM,
    **overrides,
):
    """A tiny FluidModel whose weights are all perturbed, so every input matters.

    Fresh models have zero-initialised adaLN/output layers (DiffLoss ignores z at first);
    generation tests need a model whose output depends on the text and on every token.
    """
    from fluid_train.model import FluidModel

    torch.manual_seed(seed)
    model = FluidModel(make_tiny_config(tokens, order, text_dim=text_dim, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """``tiny_model(tokens, order, seed=0, **overrides) -> FluidModel`` with perturbed weights."""
    return make_tiny_model


def make_tiny_tokenizer(kind: str = "continuous", *, seed: int = 0):
    """A random 16 px tokenizer on a 4x4 grid: SD-VAE (f=2, 1 latent ch -> 4 ch tokens) or VQ (32 codes)."""
    common = {
        "act_fn": "silu",
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
        "sample_size": 16,
        "scaling_factor": 1.0,
    }
    if kind == "continuous":
        from fluid_tokenizers import SDVAETokenizer

        config = {
            **common,
            "block_out_channels": [8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 1,
        }
        return SDVAETokenizer.from_config(config, image_size=16, seed=seed)
    from fluid_tokenizers import VQTokenizer

    config = {
        **common,
        "block_out_channels": [8, 8, 8],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 4,
        "num_vq_embeddings": 32,
        "vq_embed_dim": 4,
        "lookup_from_codebook": True,
        "force_upcast": False,
        "norm_type": "group",
    }
    return VQTokenizer.from_config(config, image_size=16, seed=seed)


@pytest.fixture
def tiny_pipeline(tiny_t5_dir: Path) -> Callable[..., object]:
    """``tiny_pipeline(tokens, order, seed=0) -> FluidPipeline`` on 16 px images and a tiny T5."""
    from fluid_text import T5TextEncoder
    from fluid_train.pipeline import FluidPipeline

    def build(tokens: str = "continuous", order: str = "random", *, seed: int = 0) -> FluidPipeline:
        text_encoder = T5TextEncoder.from_pretrained(tiny_t5_dir, max_length=32)
        model = make_tiny_model(tokens, order, seed=seed, text_dim=text_encoder.dim)
        return FluidPipeline(
            tokenizer=make_tiny_tokenizer(tokens, seed=seed), text_encoder=text_encoder, model=model
        )

    return build


class SavedEncoders(NamedTuple):
    tokenizer: Path
    text_encoder: Path
    pipeline: object  # the FluidPipeline they were saved from (its model fits them)


@pytest.fixture
def saved_encoders(tmp_path: Path, tiny_pipeline: Callable[..., object]) -> SavedEncoders:
    """The tiny continuous pipeline's tokenizer and T5 saved in tmp_path (for preprocessing and
    training on image shards)."""
    pipe = tiny_pipeline("continuous", "random")
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    pipe.text_encoder.save_pretrained(tmp_path / "text_encoder")
    return SavedEncoders(tmp_path / "tokenizer", tmp_path / "text_encoder", pipe)


# ---- random encoded shards ----------------------------------------------------------------------


def write_encoded_shards(
    root: Path,
    config: FluidConfig,
    *,
    shards: int = 2,
    per_shard: int = 6,
    seed: int = 0,
) -> Path:
    """Random encoded shards ``root/00000.tar, ...`` for ``config``: ids, or means [N, C] with a
    posterior std; fake text states [5, D_t] of which sample i has 1 + i % 5 real tokens."""
    rng = np.random.default_rng(seed)
    n, length = config.num_tokens, 5
    continuous = config.tokens == "continuous"
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            tokens = (
                rng.standard_normal((n, config.token_dim))
                if continuous
                else rng.integers(0, config.vocab_size, n)
            )
            samples.append(
                encoded_sample(
                    f"{s}{i:04d}",
                    tokens=tokens,
                    token_std=0.1 * rng.random((n, config.token_dim)) if continuous else None,
                    text_hidden=rng.standard_normal((length, config.text_dim)),
                    text_mask=np.arange(length) < 1 + i % length,
                )
            )
        write_shard(root / f"{s:05d}.tar", samples)
    return root


@pytest.fixture(scope="session")
def encoded_shards() -> Callable[..., Path]:
    """``encoded_shards(root, config, shards=2, per_shard=6, seed=0) -> root``."""
    return write_encoded_shards


def make_run_values(out: Path, data: Path, *, steps: int, **overrides) -> dict:
    """Plain TrainConfig values (JSON for a subprocess) of the tiny runs that compare backends:
    batches of 8 (2 samples per device on a 4-device mesh), a checkpoint every 10 steps, fp32."""
    values = dict(
        out=str(out),
        data={"shards": [str(data)], "shuffle_buffer": 8},
        batch_size=8,
        steps=steps,
        log_every=1,
        ckpt_every=10,
        schedule={"warmup_steps": 5},
        ema_decay=0.9,
        progress=False,
        precision="fp32",
    )
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def run_values() -> Callable[..., dict]:
    """``run_values(out, data, steps=, **overrides) -> dict`` (TrainConfig.from_dict's input)."""
    return make_run_values


# ---- scripts run in a subprocess that report back -----------------------------------------------
# torch_xla's SPMD mode is process-global and torchrun starts processes of its own, so such runs
# are a script in a subprocess whose results come back as one ``REPORT {json}`` line on stdout.

REPORT = "REPORT "


@dataclasses.dataclass(frozen=True)
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    report: dict | None  # the JSON of the last REPORT line of stdout; None if it printed none

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_reporting_script(
    source: str,
    path: Path,
    *args: object,
    env: Mapping[str, str],
    timeout: float,
    launcher: Sequence[str] = (sys.executable,),
    check: bool = True,
) -> ScriptRun:
    """Write ``source`` to ``path`` and run ``launcher path args`` (this Python by default).

    ``check``: the test fails, with the tail of the script's stderr, unless it exits 0 with a
    report.
    """
    path.write_text(source)
    proc = subprocess.run(
        [*launcher, str(path), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(REPORT)]
    report = json.loads(lines[-1][len(REPORT) :]) if lines else None
    if check:
        assert proc.returncode == 0 and report is not None, proc.stderr[-4000:]
    return ScriptRun(proc.returncode, proc.stdout, proc.stderr, report)


@pytest.fixture(scope="session")
def run_script() -> Callable[..., ScriptRun]:
    """``run_script(source, path, *args, env=, timeout=, launcher=(python,), check=True)``."""
    return run_reporting_script


def make_child_env() -> dict[str, str]:
    """This process's environment for a child process of the tests (a torchrun launch, a
    fluid command): one thread per process (the cores are shared), offline, quiet."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment of a torchrun or fluid subprocess (``make_child_env``)."""
    return make_child_env()


def make_xla_env(num_devices: int | None) -> dict[str, str]:
    """This process's environment for torch_xla on the CPU PJRT device with ``num_devices``
    virtual devices (None: CPU_NUM_DEVICES unset, so PJRT's single device)."""
    env = {**make_child_env(), "PJRT_DEVICE": "CPU"}
    if num_devices is None:
        env.pop("CPU_NUM_DEVICES", None)
    else:
        env["CPU_NUM_DEVICES"] = str(num_devices)
    return env


@pytest.fixture(scope="session")
def xla_env() -> Callable[[int | None], dict[str, str]]:
    """``xla_env(num_devices) -> env`` for a torch_xla subprocess on the CPU PJRT device."""
    return make_xla_env
