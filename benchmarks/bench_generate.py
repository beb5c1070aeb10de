"""Generation benchmark: images/s, s/image, where the time goes, and what the text caches save.

    python benchmarks/bench_generate.py --preset debug --batch 4 --steps 16 --cfg 3
    python benchmarks/bench_generate.py --preset fluid-166m --batch 64 --device cuda

Builds the preset's model (random weights: speed does not depend on them) and a tokenizer of
the matching layout (the shapes-world VAE/VQ for ``debug``/``shapes-*``, SD-VAE/aMUSEd VQ for the
paper presets), feeds random T5 states of the preset's text length — the frozen T5 runs once per
prompt, outside the sampling loop, and is not timed — and times:

- sampling + decoding with the caches on (text states and cross-attention K/V computed once per
  batch; for raster also the self-attention KV cache), split into text (aligner + text K/V),
  trunk, head and decoding;
- the same sampling with ``cache="off"`` (everything recomputed at every step), in the same run,
  giving the speed-up the caches buy;
- the DiffLoss head alone (continuous variants): ``sample`` on the fast path (time embedding
  once per diffusion step, condition projection once per call) against the per-row reference
  path of the same math (``path="reference"``, MAR's evaluation), interleaved, at the row
  counts of ``--head-rows`` (CFG stacks twice as many) and the width of ``--head-width``;
- ``--xla``: the same generation on the torch_xla device (the CPU PJRT device here): graphs
  compiled by the first and by the second batch, the second batch's s/image against eager's,
  and the process's peak RSS;
- ``--table2`` (on a device): s/image of every paper preset next to Table 2's TPU v5 figure.

    python benchmarks/bench_generate.py --preset debug --steps 64 --xla
    python benchmarks/bench_generate.py --preset debug --head-width 768 --head-rows 16,128,512
    python benchmarks/bench_generate.py --preset fluid-166m --device cuda --capture --table2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from fluid_heads import DiffLossHead
from fluid_train import PAPER_SIZES, FluidModel, get_preset, sample_flops


class Timers:
    """Accumulates wall time per component; synchronises the device around each timed call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.mode = "on"  # which run the time is booked to
        self.paused = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.paused:
                return fn(*args, **kwargs)
            self.paused = True  # nested timed calls (e.g. trunk -> text_kv) count once, outermost
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[self.mode][name] += time.perf_counter() - start
                self.paused = False

        return timed


def build_tokenizer(config: Any, device: torch.device) -> torch.nn.Module:
    import fluid_tokenizers as ft

    shapes = config.image_size == 64
    if config.tokens == "continuous":
        layout = ft.shapes_vae_config() if shapes else ft.sd_vae_ft_ema_config()
        tokenizer = ft.SDVAETokenizer.from_config(layout, image_size=config.image_size, seed=0)
    else:
        layout = ft.shapes_vq_config() if shapes else ft.amused_vq_config()
        tokenizer = ft.VQTokenizer.from_config(layout, image_size=config.image_size, seed=0)
    spec = tokenizer.spec
    if tuple(spec.grid) != tuple(config.grid):
        raise SystemExit(f"tokenizer grid {spec.grid} does not match the preset's {config.grid}")
    return tokenizer.to(device).eval()


def instrument(model: FluidModel, tokenizer: torch.nn.Module, timers: Timers) -> None:
    trunk, head = model.trunk, model.head
    model.text_aligner.forward = timers.wrap("text", model.text_aligner.forward)
    model.text_aligner.null_text = timers.wrap("text", model.text_aligner.null_text)
    trunk.text_kv = timers.wrap("text", trunk.text_kv)
    trunk.forward = timers.wrap("trunk", trunk.forward)
    if hasattr(trunk, "init_cache"):
        trunk.init_cache = timers.wrap("text", trunk.init_cache)  # text K/V + empty buffers
        trunk.step = timers.wrap("trunk", trunk.step)
    head.sample = timers.wrap("head", head.sample)
    if hasattr(head, "sample_with_logprob"):
        head.sample_with_logprob = timers.wrap("head", head.sample_with_logprob)
    tokenizer.decode = timers.wrap("decode", tokenizer.decode)


def run_once(model, tokenizer, text, args, cache: str, seed: int, timers: Timers) -> float:
    timers.mode = cache
    generator = torch.Generator(device=timers.device).manual_seed(seed)
    timers.sync()
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(
            text[0], text[1], num_steps=args.steps, cfg=args.cfg, generator=generator, cache=cache
        )
        tokenizer.decode(tokens)
    timers.sync()
    return time.perf_counter() - start


def head_speed(config: Any, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """DiffLoss ``sample``: fast path vs the per-row reference, seconds per call, interleaved."""
    width = args.head_width or config.width
    torch.manual_seed(0)
    head = (
        DiffLossHead(
            config.token_dim,
            width,
            depth=config.diffloss.depth,
            sample_steps=config.diffloss.sample_steps,
        )
        .to(device)
        .eval()
    )
    with torch.no_grad():  # random weights: the adaLN layers start at zero (an identity MLP)
        for param in head.net.parameters():
            param.normal_(0.0, 0.02)
    if args.capture:
        head.capture_sampling()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_out = []
    for rows in (int(r) for r in args.head_rows.split(",")):
        z = torch.randn(2 * rows if args.cfg != 1.0 else rows, width, device=device)
        seconds = {"fast": float("inf"), "reference": float("inf")}
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for path in ("fast", "reference"):
                sync()
                start = time.perf_counter()
                head.sample(z, cfg=args.cfg, path=path)
                sync()
                if repeat:  # the best of the repeats: a shared machine only ever adds time
                    seconds[path] = min(seconds[path], time.perf_counter() - start)
        rows_out.append(
            {"rows": rows, **seconds, "speedup": seconds["reference"] / seconds["fast"]}
        )
    return rows_out


def xla_generation(model: FluidModel, text: tuple, args: argparse.Namespace) -> dict:
    """The same generation on the torch_xla device: graphs per batch, s/image, peak RSS."""
    import torch_xla
    import torch_xla.debug.metrics as met

    def compiles() -> int:
        data = met.metric_data("CompileTime")
        return 0 if data is None else int(data[0])

    device = torch_xla.device()
    model = model.to(device)
    hidden, mask = text[0].to(device), text[1].to(device)
    out = {}
    for name in ("first", "second"):
        before, start = compiles(), time.perf_counter()
        generator = torch.Generator().manual_seed(1)
        model.generate(hidden, mask, num_steps=args.steps, cfg=args.cfg, generator=generator).cpu()
        out[name] = {"compiles": compiles() - before, "seconds": time.perf_counter() - start}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def table2(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """s/image of each paper preset (random weights, CFG, 64 steps) next to Table 2's."""
    rows = []
    for name, size in PAPER_SIZES.items():
        config = get_preset(name)
        torch.manual_seed(0)
        model = FluidModel(config).to(device).eval()
        hidden = torch.randn(args.batch, config.text_length, config.text_dim, device=device)
        mask = torch.ones(args.batch, config.text_length, dtype=torch.bool, device=device)
        if args.capture:
            model.head.capture_sampling()
        seconds = []
        for _ in range(2):  # warm-up, then timed
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(hidden, mask, cfg=args.cfg).cpu()
            seconds.append(time.perf_counter() - start)
        rows.append(
            {
                "preset": name,
                "s_per_image": seconds[-1] / args.batch,
                "table2_tpu_v5_s_per_image": size.tpu_v5_sec_per_image,
            }
        )
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--tokens", choices=("discrete", "continuous"))
    parser.add_argument("--order", choices=("raster", "random"))
    parser.add_argument("--batch", type=int, default=4, help="prompts per batch")
    parser.add_argument(
        "--steps", type=int, default=None, help="random-order steps (default: preset's 64)"
    )
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed batches per mode (after one warm-up)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype for the trunk"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--head-rows", default="16,128,512", help="rows per head call for the head timing"
    )
    parser.add_argument(
        "--head-width", type=int, default=None, help="head width (default: the preset's)"
    )
    parser.add_argument(
        "--capture", action="store_true", help="CUDA: capture the diffusion step (CUDA graphs)"
    )
    parser.add_argument("--xla", action="store_true", help="also generate on the torch_xla device")
    parser.add_argument(
        "--table2", action="store_true", help="on a device: s/image of the paper presets"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    overrides = {k: v for k, v in (("tokens", args.tokens), ("order", args.order)) if v}
    config = get_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = FluidModel(config).to(device).eval()
    if args.capture:
        if device.type != "cuda":
            raise SystemExit("--capture needs --device cuda (CUDA graphs)")
        model.head.capture_sampling()
    tokenizer = build_tokenizer(config, device)
    hidden = torch.randn(args.batch, config.text_length, config.text_dim, device=device)
    mask = torch.ones(args.batch, config.text_length, dtype=torch.bool, device=device)
    timers = Timers(device)
    instrument(model, tokenizer, timers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    results: dict[str, Any] = {}
    totals = {"on": 0.0, "off": 0.0}
    with autocast:
        for cache in ("on", "off"):  # warm-up (allocations, kernel selection)
            run_once(model, tokenizer, (hidden, mask), args, cache, seed=0, timers=timers)
        timers.seconds.clear()
        # Interleaved, so a load change on a shared machine hits both modes alike.
        for r in range(args.repeats):
            for cache in ("on", "off"):
                totals[cache] += run_once(
                    model, tokenizer, (hidden, mask), args, cache, seed=r + 1, timers=timers
                )
    images = args.batch * args.repeats
    for cache, total in totals.items():
        results[cache] = {
            "seconds": total,
            "images_per_s": images / total,
            "s_per_image": total / images,
            "share": {k: v / total for k, v in sorted(timers.seconds[cache].items())},
        }

    steps = args.steps or config.generation.num_steps
    flops = sample_flops(config, num_steps=steps, cfg=args.cfg != 1.0)
    on, off = results["on"], results["off"]
    report = {
        "preset": args.preset,
        "variant": config.variant,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": steps if config.order == "random" else config.num_tokens,
        "cfg": args.cfg,
        "images_per_s": on["images_per_s"],
        "s_per_image": on["s_per_image"],
        "share": on["share"],
        "cache_off_s_per_image": off["s_per_image"],
        "cache_speedup": off["s_per_image"] / on["s_per_image"],
        "sample_gflops_per_image": flops.total,
        "achieved_gflops": flops.total * on["images_per_s"],
    }
    if config.tokens == "continuous":
        report["head"] = head_speed(config, args, device)
    if args.xla:
        report["xla"] = xla_generation(model, (hidden.cpu(), mask.cpu()), args)
        report["xla"]["vs_eager"] = (
            report["xla"]["second"]["seconds"] / args.batch / on["s_per_image"]
        )
    if args.table2:
        if device.type == "cpu":
            raise SystemExit("--table2 times the paper presets: give --device cuda")
        report["table2"] = table2(args, device)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.preset} ({config.variant}) on {device}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, {report['steps']} steps, cfg {args.cfg}"
    )
    print(f"  images/s          {on['images_per_s']:10.3f}")
    print(f"  s/image           {on['s_per_image']:10.4f}")
    for name, share in on["share"].items():
        print(f"  share {name:<11} {share:10.1%}")
    other = 1.0 - sum(on["share"].values())
    print(f"  share {'other':<11} {other:10.1%}   (embedding, masks, gathers, Python)")
    print(f"  cache off s/image {off['s_per_image']:10.4f}   (text + K/V recomputed every step)")
    print(f"  cache speed-up    {report['cache_speedup']:10.2f}x")
    print(
        f"  model GFLOPs/img  {flops.total:10.3f}   -> {report['achieved_gflops']:.2f} GFLOP/s achieved"
    )
    for row in report.get("head", []):
        print(
            f"  head {row['rows']:>4} rows    fast {row['fast'] * 1e3:8.1f} ms   per-row reference "
            f"{row['reference'] * 1e3:8.1f} ms   speed-up {row['speedup']:5.2f}x"
        )
    if "xla" in report:
        xla = report["xla"]
        print(
            f"  xla graphs        {xla['first']['compiles']} (first batch), "
            f"{xla['second']['compiles']} (second)   first batch {xla['first']['seconds']:.1f} s"
        )
        print(
            f"  xla s/image       {xla['second']['seconds'] / args.batch:10.4f}   "
            f"({xla['vs_eager']:.2f}x eager's)   peak RSS {xla['peak_rss_mb']:.0f} MB"
        )
    for row in report.get("table2", []):
        print(
            f"  {row['preset']:<12} s/image {row['s_per_image']:8.4f}   "
            f"Table 2 (TPU v5) {row['table2_tpu_v5_s_per_image']:.3f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
