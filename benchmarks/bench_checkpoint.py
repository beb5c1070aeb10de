"""Checkpoint verification cost: the manifest (sizes + SHA-256 of every file) and ``verify``
against the write itself, in the same run.

    python benchmarks/bench_checkpoint.py             # a 256 MiB state
    python benchmarks/bench_checkpoint.py --mib 1024

Writes a float32 state of ``--mib`` MiB with ``save_torch`` (torch.save + fsync, as the eager
backend does) into a temp directory under ``--dir``, then times ``manifest`` (what a save adds)
and ``verify`` (what a resume adds). Prints seconds, GB/s and the ratios to the write; the
file is in the page cache when it is hashed, as it is right after a real save.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fluid_train.checkpoint import META, manifest, save_torch, verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (default 256)")
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    args = parser.parse_args()
    state = {"weight": torch.randn(args.mib * 2**20 // 4)}
    best = {"write": float("inf"), "manifest": float("inf"), "verify": float("inf")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        for _ in range(args.repeat):
            t = time.perf_counter()
            save_torch(directory, state)
            best["write"] = min(best["write"], time.perf_counter() - t)
            t = time.perf_counter()
            files = manifest(directory)
            best["manifest"] = min(best["manifest"], time.perf_counter() - t)
            (directory / META).write_text(json.dumps({"step": 0, "files": files}))
            t = time.perf_counter()
            assert verify(directory).ok
            best["verify"] = min(best["verify"], time.perf_counter() - t)
    size = args.mib * 2**20
    for name, seconds in best.items():
        print(f"{name:9s} {seconds:7.3f} s  {size / seconds / 1e9:6.2f} GB/s")
    ratios = {k: best[k] / best["write"] for k in ("manifest", "verify")}
    print(f"manifest / write = {ratios['manifest']:.2f}   verify / write = {ratios['verify']:.2f}")
    print(json.dumps({"mib": args.mib, **{f"{k}_s": v for k, v in best.items()}, **ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
