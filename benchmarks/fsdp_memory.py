"""Sharded training state per GPU under the fsdp backend, for the paper's Table 2 presets.

    python benchmarks/fsdp_memory.py [--ranks 8 64]

Computed, not measured: parameters counted with ``FluidModel.count_params`` (built on the meta
device, nothing allocated). FSDP2 keeps, per rank, 1/N of: the fp32 master weights (4 B), their
fp32 gradients (4 B), AdamW's two fp32 moments (8 B) and the fp32 EMA (4 B) = 20 B per
parameter / N. Not included: activations (batch-dependent; see --activation-checkpointing), the
transient bf16 copy of the one or two blocks being gathered, and the CUDA/NCCL workspace.
"""

from __future__ import annotations

import argparse

from fluid_train.model import FluidModel
from fluid_train.presets import get_preset

PRESETS = ("fluid-166m", "fluid-369m", "fluid-665m", "fluid-1.1b", "fluid-3.1b", "fluid-10.5b")
BYTES = {"params": 4, "grads": 4, "adamw": 8, "ema": 4}  # fp32 each, per parameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    per_param = sum(BYTES.values())
    head = " | ".join(f"N = {n}" for n in args.ranks)
    print(f"| preset | parameters | full state (20 B/param) | {head} |")
    print("|---|---|---|" + "---|" * len(args.ranks))
    for name in PRESETS:
        count = FluidModel.count_params(get_preset(name)).total
        full = count * per_param
        cells = " | ".join(f"{full / n / 2**30:.2f} GiB" for n in args.ranks)
        print(f"| {name} | {count / 1e6:,.1f}M | {full / 2**30:.1f} GiB | {cells} |")


if __name__ == "__main__":
    main()
