"""Distributed, resumable generation (``fluid_train.sampling``, ``fluid generate``).

The 1-vs-2-process check runs ``torchrun --nproc-per-node 2`` (gloo on CPU) in a subprocess
and compares its PNGs byte for byte with a run of this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fluid_train.cli import generate as generate_cli
from fluid_train.sampling import (
    Chunk,
    EagerSampler,
    GenEvalFolders,
    Processes,
    PromptFiles,
    chunk_seed,
    deal,
    host_prompts,
    padded_rows,
    plan_chunks,
    run_generation,
    settings_record,
)

PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares",
    "a photo of a green triangle",
    "a photo of three white squares",
    "a photo of a purple circle above a red triangle",
]
OPTIONS = {"num_steps": 2, "cfg": 2.0}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*.png"))
        if p.name != "grid.png"
    }


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*.png")
        if p.name != "grid.png"
    }


# ---------------------------------------------------------------------- the plan


def test_plan_covers_every_image_once_whatever_the_process_count():
    chunks = plan_chunks(11, images_per_prompt=4, batch_size=10)  # 2 prompts per chunk
    assert [c.prompts for c in chunks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10,)]
    assert chunks[0].rows(2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # More images per prompt than the batch holds: one prompt per chunk.
    assert [c.prompts for c in plan_chunks(3, images_per_prompt=8, batch_size=4)] == [
        (0,),
        (1,),
        (2,),
    ]
    for world in (1, 2, 3, 4, 7):
        dealt = [deal(chunks, rank, world) for rank in range(world)]
        indices = sorted(c.index for part in dealt for c in part)
        assert indices == list(range(len(chunks)))
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1  # balanced
    with pytest.raises(ValueError, match="rank 2 is outside"):
        deal(chunks, 2, 2)
    with pytest.raises(ValueError, match="batch size"):
        plan_chunks(3, images_per_prompt=1, batch_size=0)


def test_chunk_seeds_depend_on_seed_and_chunk_only():
    seeds = {chunk_seed(s, c) for s in range(4) for c in range(64)}
    assert len(seeds) == 4 * 64  # all distinct
    assert chunk_seed(3, 5) == chunk_seed(3, 5) and 0 <= chunk_seed(3, 5) < 2**63


def test_spmd_host_shares_partition_the_chunk():
    chunk = Chunk(0, tuple(range(10, 17)))  # 7 prompts over 3 hosts
    shares = [host_prompts(chunk, h, 3) for h in range(3)]
    assert shares == [(10, 11, 12), (13, 14), (15, 16)]
    assert host_prompts(chunk, 0, 1) == chunk.prompts
    assert [host_prompts(Chunk(0, (4,)), h, 2) for h in range(2)] == [(4,), ()]
    assert [padded_rows(r, 8) for r in (1, 8, 9, 16)] == [8, 8, 16, 16]


# ---------------------------------------------------------------------- end to end


def _run_generate(argv):
    parser = argparse.ArgumentParser(prog="fluid")
    generate_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", *argv])
    return args.func(args)


def test_one_and_two_processes_write_identical_files(tmp_path, tiny_pipeline, capsys, child_env):
    from fluid_eval import write_prompts
    from fluid_eval.geneval import read_layout

    tiny_pipeline("continuous", "random").save_pretrained(tmp_path / "run" / "pipeline")
    metadata = tmp_path / "evaluation_metadata.jsonl"
    entries = write_prompts(metadata, num=5)
    # 3 chunks of 2 prompts x 2 images: rank 0 makes chunks 0 and 2, rank 1 chunk 1.
    argv = ["--model", str(tmp_path / "run"), "--metadata", str(metadata), "--steps", "2",
            "--cfg", "2", "--images-per-prompt", "2", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert _run_generate([*argv, "--out", str(tmp_path / "one")]) == 0
    env = child_env
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "fluid_train.cli", "generate", *argv, "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 5 * 2 and one.keys() == two.keys()
    assert all(one[name] == two[name] for name in one)
    # Different prompts and samples got different images.
    assert len(set(one.values())) == len(one)
    layout = read_layout(tmp_path / "two")
    assert [(n, meta) for n, meta, _ in layout.folders] == list(enumerate(entries))
    assert all(len(samples) == 2 for _, _, samples in layout.folders)
    assert not (tmp_path / "two" / ".partial").exists()
    assert json.loads((tmp_path / "two" / "generation.json").read_text())["backend"] == "eager"
    # The same folder with another seed: refused, naming the change, nothing rewritten.
    capsys.readouterr()
    assert _run_generate([*argv, "--out", str(tmp_path / "two"), "--seed", "1"]) == 2
    assert "seed 0 -> 1" in capsys.readouterr().err
    assert _files(tmp_path / "two") == two


class _Interrupt(Exception):
    pass


def test_interrupted_generation_resumes_without_rewriting(tmp_path, tiny_pipeline):
    from fluid_eval import write_prompts

    pipe = tiny_pipeline("continuous", "random")
    entries = write_prompts(tmp_path / "meta.jsonl", num=5)
    sampler = EagerSampler(pipe, batch_size=4, options=OPTIONS)
    common = dict(images_per_prompt=2, batch_size=4, seed=7, progress=False)
    record = settings_record([str(e["prompt"]) for e in entries], model=None, seed=7,
                             images_per_prompt=2, batch_size=4, options=OPTIONS, backend="eager")  # fmt: skip

    def run(out: Path, **kwargs):
        layout = GenEvalFolders(out, entries, images_per_prompt=2)
        return run_generation(layout, sampler, record=record, **common, **kwargs)

    run(tmp_path / "reference")
    calls = []

    def stop_after_two(chunk):
        calls.append(chunk.index)
        if len(calls) == 2:
            raise _Interrupt

    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        run(out, on_chunk=stop_after_two)
    assert sorted(p.name for p in out.iterdir() if p.name.isdigit()) == [
        f"{n:05}" for n in range(4)
    ]
    # A folder half-written when the process died: never visible as a prompt folder.
    (out / ".partial" / "00004" / "samples").mkdir(parents=True)
    (out / ".partial" / "00004" / "samples" / "0000.png").write_bytes(b"truncated")
    before = _stats(out)
    made = []
    stats = run(out, on_chunk=lambda chunk: made.append(chunk.index))
    assert made == [2] and stats.prompts_skipped == 4 and stats.images_generated == 2
    after = _stats(out)
    assert {k: after[k] for k in before if not k.startswith(".partial")} == {
        k: v for k, v in before.items() if not k.startswith(".partial")
    }  # the finished prompts' files were not touched
    assert _files(out) == _files(tmp_path / "reference")
    assert not (out / ".partial").exists()
    # Resuming with other settings is refused, naming what changed.
    with pytest.raises(ValueError, match="seed 7 -> 8"):
        run_generation(GenEvalFolders(out, entries, images_per_prompt=2), sampler,
                       record={**record, "seed": 8}, **common)  # fmt: skip


def test_prompt_files_resume_fills_only_missing_samples(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline("discrete", "random")
    sampler = EagerSampler(pipe, batch_size=3, options=OPTIONS)
    record = settings_record(PROMPTS, model=None, seed=0, images_per_prompt=3, batch_size=3,
                             options=OPTIONS, backend="eager")  # fmt: skip
    layout = PromptFiles(tmp_path, PROMPTS, images_per_prompt=3)
    kwargs = dict(images_per_prompt=3, batch_size=3, seed=0, record=record, progress=False)
    run_generation(layout, sampler, **kwargs)
    reference = _files(tmp_path)
    assert len(reference) == 15
    (tmp_path / "00003_01.png").unlink()
    (tmp_path / "index.jsonl").unlink()
    before = _stats(tmp_path)
    made = []
    run_generation(layout, sampler, on_chunk=lambda c: made.append(c.prompts), **kwargs)
    assert made == [(3,)]
    after = _stats(tmp_path)
    assert {k: after[k] for k in before} == before
    assert _files(tmp_path) == reference
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [(e["prompt_index"], e["sample"]) for e in index] == [
        (i, k) for i in range(5) for k in range(3)
    ]
    assert np.asarray(__import__("PIL.Image").Image.open(tmp_path / "grid.png")).shape[0] > 16


# ---------------------------------------------------------------------- SPMD plumbing

SPMD_SCRIPT = """
import json, sys
import torch, torch_xla, torch_xla.runtime as xr
from fluid_text import TextStates
from fluid_train.parallelize import build_mesh
from fluid_train.sampling import SpmdSampler

xr.use_spmd()
device = torch_xla.device()
seen = {}

class Model:
    def generate(self, hidden, mask, generator=None, **options):
        seen["hidden"] = torch_xla._XLAC._get_xla_sharding_spec(hidden)
        seen["options"] = options
        # XLA draws from a CPU generator (generation_xla); the sampler seeds it per chunk
        assert generator is not None and generator.device.type == "cpu"
        noise = torch.rand(hidden.shape[0], generator=generator).to(hidden.device)  # [R]
        return hidden[:, 0, 0] + noise  # [R]: the prompt's code + noise

class Pipeline:
    model = Model()
    device = device

    def encode_prompts(self, prompts):
        codes = torch.tensor([float(p) for p in prompts]).view(-1, 1, 1)  # [R, 1, 1]
        return TextStates(hidden=codes.to(device), mask=torch.ones(len(prompts), 1, dtype=torch.bool).to(device))

    def decode(self, tokens):  # [R] -> images [R, 3, 2, 2] in [-1, 1]
        seen["decode_rows"] = int(tokens.shape[0])
        return (tokens / 100).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

sampler = SpmdSampler(Pipeline(), build_mesh(), batch_size=6, options={"num_steps": 3})
prompts = ["10", "20", "30", "40", "50"]  # 5 rows of a batch of 6 -> padded to 8 over 4 devices
a, b, c = sampler(prompts, 1), sampler(prompts, 1), sampler(prompts, 2)
seen["last_chunk_rows"] = (sampler(prompts[:2], 3).shape[0], seen["decode_rows"])
print("REPORT " + json.dumps({"shape": list(a.shape), "dtype": str(a.dtype),
      "values": a[:, 0, 0, 0].tolist(), "same_seed": bool((a == b).all()),
      "other_seed": bool((a != c).any()), **seen}))
"""


@pytest.mark.xla
def test_spmd_sampler_shards_the_padded_batch_and_gathers_rows(tmp_path, run_script, xla_env):
    report = run_script(SPMD_SCRIPT, tmp_path / "spmd.py", env=xla_env(4), timeout=300).report
    assert report["hidden"].startswith("{devices=[4,1,1]")  # batch over the 4 devices
    assert report["decode_rows"] == 8 and report["options"] == {"num_steps": 3}
    assert report["last_chunk_rows"] == [2, 8]  # a short chunk keeps the batch's shape
    assert report["shape"] == [5, 2, 2, 3] and report["dtype"] == "uint8"  # padding dropped
    # Row i is prompt i's: (code + noise in [0, 1)) / 100 -> pixel (x + 1) * 127.5.
    for code, value in zip((10, 20, 30, 40, 50), report["values"], strict=True):
        low, high = ((code / 100 + 1) * 127.5), ((code + 1) / 100 + 1) * 127.5
        assert low - 0.5 <= value <= high + 0.5
    assert report["same_seed"] and report["other_seed"]


# ---------------------------------------------------------------------- who writes what


class _Alone(Processes):
    """One of ``count`` processes, run alone: collectives see only this process's part."""

    def barrier(self) -> None:
        pass

    def union(self, values: set[int]) -> set[int]:
        return set(values)


class _CodeSampler:
    """Rows that encode their prompt (no model): pixel = prompt's first digit * 20."""

    def __init__(self, spmd: bool):
        self.spmd, self.calls = spmd, []

    def __call__(self, prompts, seed):
        self.calls.append(seed)
        return np.stack([np.full((2, 2, 3), 20 * int(p[0]), np.uint8) for p in prompts])


@pytest.mark.parametrize("spmd", [False, True], ids=["ranks", "spmd-hosts"])
def test_each_process_writes_its_share(tmp_path, spmd):
    prompts = [f"{i} things" for i in range(7)]  # 4 chunks of 2 prompts x 2 images
    kwargs = dict(images_per_prompt=2, batch_size=4, seed=0, progress=False)
    record = settings_record(prompts, model=None, seed=0, images_per_prompt=2, batch_size=4,
                             options={}, backend="test")  # fmt: skip
    written = {}
    for index in (0, 1):
        sampler = _CodeSampler(spmd)
        out = tmp_path / f"process{index}"
        run_generation(PromptFiles(out, prompts, images_per_prompt=2), sampler, record=record,
                       processes=_Alone(index=index, count=2), **kwargs)  # fmt: skip
        written[index] = sorted(p.name for p in out.glob("0*.png"))
        # ranks: chunks dealt round-robin; SPMD hosts: every host runs every chunk.
        expected_chunks = range(4) if spmd else range(index, 4, 2)
        assert sampler.calls == [chunk_seed(0, c) for c in expected_chunks]
        assert (out / "index.jsonl").is_file() == (index == 0)  # the writer finishes
    prompts_of = {i: sorted({int(n[:5]) for n in written[i]}) for i in (0, 1)}
    if spmd:  # each chunk's first prompt on host 0, second on host 1
        assert prompts_of == {0: [0, 2, 4, 6], 1: [1, 3, 5]}
    else:
        assert prompts_of == {0: [0, 1, 4, 5], 1: [2, 3, 6]}
    assert len(written[0]) + len(written[1]) == 14


def test_progress_bar_counts_images_with_a_rate(tmp_path, capsys):
    prompts = [f"{i} things" for i in range(5)]
    record = settings_record(prompts, model=None, seed=0, images_per_prompt=2, batch_size=4,
                             options={}, backend="test")  # fmt: skip
    run_generation(PromptFiles(tmp_path, prompts, images_per_prompt=2), _CodeSampler(False),
                   images_per_prompt=2, batch_size=4, seed=0, record=record, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "images" in err and "10/10" in err and "img/s" in err
