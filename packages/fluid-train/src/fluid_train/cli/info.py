"""``fluid info PRESET``: parameters, frozen T5 parameters and GFLOPs per image of a preset."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fluid_eval.cli import _run as exit_2_on_bad_input


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter counts and GFLOPs of a model preset",
        description=(
            "Trainable parameters (text aligner + trunk + head; counted on the meta device, "
            "nothing allocated), the frozen T5 encoder's parameters, and GFLOPs per image for "
            "a training step (forward x3) and for sampling (the preset's steps, CFG on). "
            "Without PRESET, lists every preset."
        ),
    )
    parser.add_argument(
        "preset", nargs="?", metavar="PRESET", help="preset name (omit to list all)"
    )
    parser.add_argument("--tokens", choices=("discrete", "continuous"), help="token kind (variant)")
    parser.add_argument("--order", choices=("raster", "random"), help="generation order (variant)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=exit_2_on_bad_input(run))  # an unknown preset: a clear error


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def format_summary(summary: dict[str, Any]) -> str:
    """The readable table of one :func:`fluid_train.flops.model_summary`."""
    lines = [
        f"preset                 {summary['preset']}  ({summary['variant']}"
        f"{', Fluid' if summary['variant'] == 'random-continuous' else ''})",
        f"trunk                  {summary['depth']} blocks, width {summary['width']}, "
        f"{summary['num_heads']} heads, {summary['num_tokens']} tokens",
        f"trainable_params       {summary['trainable_params']:>15,}  ({_fmt_count(summary['trainable_params'])})",
    ]
    for name, count in summary["components"].items():
        lines.append(f"  {name:<20} {count:>15,}")
    if "table2_params" in summary:
        lines.append(
            f"  Table 2              {summary['table2_params']:>15,}  "
            f"({summary['table2_rel_diff']:+.1%})"
        )
    lines += [
        f"frozen_params          {summary['frozen_params']:>15,}  "
        f"({_fmt_count(summary['frozen_params'])}, {summary['text_encoder']} encoder)",
        f"train_gflops_per_image {summary['train_gflops_per_image']:>15,.1f}  (forward x3)",
        f"sample_gflops_per_image{summary['sample_gflops_per_image']:>16,.1f}  "
        f"({summary['sample_steps']} steps, CFG on)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fluid_train.flops import model_summary
    from fluid_train.presets import get_preset, list_presets

    overrides = {k: v for k, v in (("tokens", args.tokens), ("order", args.order)) if v}
    names = [args.preset] if args.preset else list_presets()
    summaries = [model_summary(get_preset(name, **overrides), preset=name) for name in names]
    if args.json:
        print(json.dumps(summaries[0] if args.preset else summaries, indent=2))
    elif args.preset:
        print(format_summary(summaries[0]))
    else:
        print(
            f"{'preset':<12} {'variant':<18} {'trainable':>10} {'frozen':>8} {'train GF/img':>13} {'sample GF/img':>14}"
        )
        for s in summaries:
            print(
                f"{s['preset']:<12} {s['variant']:<18} {_fmt_count(s['trainable_params']):>10} "
                f"{_fmt_count(s['frozen_params']):>8} {s['train_gflops_per_image']:>13,.1f} "
                f"{s['sample_gflops_per_image']:>14,.1f}"
            )
    return 0
