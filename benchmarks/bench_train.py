"""Training benchmark: images/s and model FLOP/s against the machine's measured matmul peak.

    python benchmarks/bench_train.py --preset debug --batch 8 --steps 10
    python benchmarks/bench_train.py --preset fluid-166m --batch 64 --steps 20 --device cuda
    PJRT_DEVICE=TPU python benchmarks/bench_train.py --preset fluid-1.1b --batch 256 --backend xla
    torchrun --nproc-per-node 8 benchmarks/bench_train.py --preset fluid-1.1b --batch 256 \
        --backend fsdp

Times the trainer's own step (``Trainer.train_step`` through the backend: forward under
autocast, backward, clipping, AdamW, EMA) on one fixed batch already on the device, so data
loading is not part of the figure. The batch has the preset's shapes (random posterior means
and stds, or ids, and random T5 states of the preset's text length); speed does not depend on
the values. Model FLOPs per image are ``fluid_train.flops.train_flops`` (matmuls of aligner,
trunk and head, forward × 3, as the paper counts). The peak is measured in the same run: the
best of several large matmuls on the same device and dtype as the step (bf16 on accelerators,
fp32 on CPU). MFU here = model FLOP/s / that measured peak (not the vendor's datasheet number).

With ``--backend fsdp`` (under torchrun) ``--batch`` is the global batch, every rank times its
part, images/s count all ranks, and the peak is rank 0's measured matmul peak x the rank count;
rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fluid_train import get_preset, process_group, train_flops
from fluid_train.data import write_shard
from fluid_train.preprocess import encoded_sample
from fluid_train.recipe import DataConfig, ScheduleConfig, TrainConfig
from fluid_train.trainer import Trainer


def write_random_shard(root: Path, config, batch: int, shards: int = 1) -> Path:
    """``shards`` encoded shards (one per rank) of ``batch`` random samples in the layout of
    ``config``."""
    rng = np.random.default_rng(0)
    n, length = config.num_tokens, config.text_length
    samples = []
    for i in range(batch):
        continuous = config.tokens == "continuous"
        samples.append(
            encoded_sample(
                f"{i:06d}",
                tokens=rng.standard_normal((n, config.token_dim)).astype(np.float32)
                if continuous
                else rng.integers(0, config.vocab_size, n),
                token_std=0.1 * rng.random((n, config.token_dim)) if continuous else None,
                text_hidden=rng.standard_normal((length, config.text_dim)).astype(np.float32),
                text_mask=np.arange(length) < 1 + i % length,
            )
        )
    for s in range(shards):
        write_shard(root / f"{s:05d}.tar", samples)
    return root


def wait(device: torch.device, tensor: torch.Tensor | None = None) -> None:
    """Block until the device has finished the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla

        torch_xla.sync(wait=True)
    if tensor is not None:
        float(tensor)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of ``size``² × ``size``² matmuls on ``device`` (the achievable peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    for trial in range(repeats + 1):
        wait(device)
        start = time.perf_counter()
        c = a @ b
        for _ in range(3):
            c = (c * 1e-3) @ b  # a chain, so lazy backends cannot skip any product
        wait(device, c[0, 0])
        seconds = time.perf_counter() - start
        if trial:  # the first trial warms up (allocation, compilation)
            best = max(best, 4 * 2.0 * size**3 / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--tokens", choices=("discrete", "continuous"))
    parser.add_argument("--order", choices=("raster", "random"))
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--backend", choices=("eager", "xla", "fsdp"), default="eager")
    parser.add_argument("--compile", action="store_true", help="fsdp: torch.compile each block")
    parser.add_argument("--device", help="eager: cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--activation-checkpointing", choices=("none", "block"), default="none")
    parser.add_argument("--matmul-size", type=int, help="peak matmul size (default 4096, CPU 1024)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("tokens", args.tokens), ("order", args.order)) if v}
    model_config = get_preset(args.preset, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = int(os.environ.get("WORLD_SIZE", "1")) if args.backend == "fsdp" else 1
        if args.batch % ranks:
            parser.error(f"--batch {args.batch} must divide over the {ranks} ranks")
        data = write_random_shard(Path(tmp) / "data", model_config, args.batch // ranks, ranks)
        config = TrainConfig(
            out=str(Path(tmp) / "run"),
            preset=args.preset,
            model=overrides,
            data=DataConfig(shards=[str(data)], shuffle_buffer=0),
            batch_size=args.batch,
            steps=args.warmup + args.steps,
            schedule=ScheduleConfig(warmup_steps=1),
            precision=args.precision,
            backend=args.backend,
            device=args.device,
            progress=False,
            export=False,
        )
        config.parallel.activation_checkpointing = args.activation_checkpointing
        config.parallel.compile = args.compile
        trainer = Trainer(config)
        backend = trainer.backend
        device = backend.device
        _, batch = next(iter(backend.device_batches(trainer.loader, trainer._encode)))
        trainer.model.train()
        out = None
        for _ in range(args.warmup):
            out = backend.run_step(trainer.train_step, batch, None)
        wait(device, None if out is None else out.loss)
        start = time.perf_counter()
        for _ in range(args.steps):
            out = backend.run_step(trainer.train_step, batch, None)
        wait(device, out.loss)
        seconds = time.perf_counter() - start
        trainer.close()

    images_per_s = args.batch * args.steps / seconds
    gflops_per_image = train_flops(model_config).total
    model_flops = gflops_per_image * 1e9 * images_per_s
    dtype = trainer.autocast_dtype or torch.float32
    size = args.matmul_size or (1024 if device.type == "cpu" else 4096)
    peak = matmul_peak(device, dtype, size, repeats=3) * ranks  # every rank's device
    if not backend.is_writer:
        return
    report = {
        "preset": args.preset,
        "variant": model_config.variant,
        "backend": backend.name,
        "device": str(device) if ranks == 1 else f"{ranks} x {device.type}",
        "ranks": ranks,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "steps": args.steps,
        "seconds_per_step": seconds / args.steps,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * model_config.num_tokens,
        "train_gflops_per_image": gflops_per_image,
        "model_tflops": model_flops / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu_vs_measured_peak": model_flops / peak,
        "loss": float(out.loss),
        "compiles": backend.compiles(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['preset']} ({report['variant']}) on {report['device']} [{report['backend']}, "
        f"{report['dtype']}], batch {args.batch}, {args.steps} steps"
    )
    print(f"  {report['seconds_per_step'] * 1e3:.1f} ms/step   {images_per_s:,.1f} images/s   "
          f"{report['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    print(
        f"  model: {gflops_per_image:.3f} GFLOP/image (fwd x3) -> {model_flops / 1e12:.4f} TFLOP/s"
    )
    ranks_note = f" ({ranks} ranks x rank 0's)" if ranks > 1 else ""
    print(f"  measured {size}x{size} matmul peak{ranks_note}: {peak / 1e12:.4f} TFLOP/s")
    print(f"  MFU vs measured peak: {report['mfu_vs_measured_peak']:.1%}")


if __name__ == "__main__":
    main()
    process_group.leave()  # under torchrun: a gloo group left alive can abort the exit
