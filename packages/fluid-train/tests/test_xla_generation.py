"""Generation on the CPU PJRT device: a fixed set of graphs, none new for a second batch, and
samples distributed as eager generation's.

torch_xla runs in a subprocess (PJRT_DEVICE=CPU, one device, no SPMD) so this process keeps a
plain PyTorch state. Graphs are counted with torch_xla's ``CompileTime`` metric, as test_xla.py
counts the training step's. The tiny model has an 8x8 grid (64 tokens) so that both 16- and
64-step random-order schedules exist; raster always takes the 64 steps.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

MAX_GRAPHS = 16  # issue 14: a 64-step random-order run compiles at most 16 graphs in all

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])  # this test directory: conftest's tiny config and text
    import torch, torch_xla
    import torch_xla.debug.metrics as met
    from conftest import make_text, make_tiny_config
    from fluid_train.model import FluidModel, TrainBatch

    def compiles():
        data = met.metric_data("CompileTime")
        return 0 if data is None else data[0]

    device = torch_xla.device()
    # 8x8 tokens; 6 diffusion steps in graphs of 4 (a steady chunk and a remainder) keep the
    # host loop short while exercising every kind of diffusion graph.
    import fluid_train.generation_xla as generation_xla
    generation_xla.DIFFUSION_STEPS_PER_GRAPH = 4
    grid = {"backbone.grid": (8, 8), "diffloss.sample_steps": 6}
    batch = 32
    hidden, mask = make_text(batch, seed=3)
    report = {"seconds": {}}
    clock = time.perf_counter()

    def xla_runs(name, model, batches, **options):
        # Compiles of the first batch (from this process's state) and of each later batch.
        counts, outs = [], []
        for i in range(batches):
            before = compiles()
            g = torch.Generator().manual_seed(100 + i)
            out = model.generate(hidden.to(device), mask.to(device), generator=g, **options)
            outs.append(out.cpu())
            counts.append(compiles() - before)
        report[name] = counts
        report["seconds"][name] = round(time.perf_counter() - clock, 1)
        return outs

    def build(tokens, order):
        torch.manual_seed(0)
        return FluidModel(make_tiny_config(tokens, order, **grid))

    # 1. Fluid (continuous, MAR order), 64 steps, from a fresh process: graphs "in all".
    fluid = build("continuous", "random")
    # Briefly trained on a coherent world: every image is s * pattern (+ noise), s = +-1,
    # so a sample's statistics (its sign coherence, its spread) tell a working sampler.
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(64, 4, generator=g).sign() * 0.8  # [N, C]
    optimizer = torch.optim.Adam(fluid.parameters(), lr=3e-3)
    fluid.train()
    for step in range(60):
        s = torch.randint(0, 2, (16, 1, 1), generator=g) * 2.0 - 1.0
        tokens = s * pattern + 0.1 * torch.randn(16, 64, 4, generator=g)
        text_hidden, text_mask = make_text(16, seed=step)
        loss = fluid.training_loss(TrainBatch(tokens=tokens, text_hidden=text_hidden,
                                              text_mask=text_mask)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fluid.eval()
    eager = fluid.generate(hidden, mask, num_steps=16, cfg=3.0,
                           generator=torch.Generator().manual_seed(200))
    report["seconds"]["train+eager"] = round(time.perf_counter() - clock, 1)
    fluid.to(device)
    xla_runs("continuous-random-64", fluid, 2, num_steps=64, cfg=3.0)
    outs = xla_runs("continuous-random-16", fluid, 2, num_steps=16, cfg=3.0)
    torch.save({"eager": eager, "xla": outs[1], "pattern": pattern}, sys.argv[2])

    # 2. The other orders and token kinds, 64 steps (raster: N = 64 steps), CFG on.
    xla_runs("continuous-raster", build("continuous", "raster").to(device), 2, cfg=3.0)
    xla_runs("discrete-random-64", build("discrete", "random").to(device), 2, num_steps=64,
             cfg=3.0)
    discrete = build("discrete", "random").to(device)
    outs = xla_runs("discrete-confidence-16", discrete, 2, num_steps=16, cfg=3.0,
                    order_policy="confidence")
    again = discrete.generate(hidden.to(device), mask.to(device), num_steps=16, cfg=3.0,
                              order_policy="confidence",
                              generator=torch.Generator().manual_seed(101)).cpu()
    report["same_seed_same_tokens"] = bool(torch.equal(again, outs[1]))
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("REPORT " + json.dumps(report))
    """
)


def _image_stats(x: np.ndarray, pattern: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics [B] of tokens x [B, N, C]: mean, mean square, sign coherence."""
    return {
        "mean": x.mean(axis=(1, 2)),
        "mean_square": (x**2).mean(axis=(1, 2)),
        "coherence": np.abs((x * pattern).mean(axis=(1, 2))),  # |<x, s·pattern>| per image
    }


@pytest.mark.xla
@pytest.mark.slow
def test_xla_generation_compiles_a_fixed_set_of_graphs_and_matches_eager(
    tmp_path, run_script, xla_env
):
    samples = tmp_path / "samples.pt"
    script = tmp_path / "xla_generation.py"
    here = Path(__file__).parent
    report = run_script(SCRIPT, script, here, samples, env=xla_env(None), timeout=600).report

    # The 64-step run started from a fresh process: its first batch is every graph it needs.
    first, *later = report["continuous-random-64"]
    assert 0 < first <= MAX_GRAPHS, report
    # 16 steps reveal up to 11 tokens a step instead of 1: new shapes, but as few graphs, and
    # a steady state that compiles nothing; likewise every other order and token kind.
    for name in [
        "continuous-random-16",
        "continuous-raster",
        "discrete-random-64",
        "discrete-confidence-16",
    ]:
        counts = report[name]
        assert counts[0] <= MAX_GRAPHS and counts[0] > 0, (name, report)
        later += counts[1:]
    assert later == [0] * len(later), report  # no batch after the first compiles a graph
    assert report["same_seed_same_tokens"]

    # XLA's RNG is not PyTorch's: compare the distributions. Each statistic is a mean over 32
    # images per side (tokens left unwritten or written to the wrong place would fail); the bound is 4 standard errors of the difference.
    import torch

    data = torch.load(samples)
    pattern = data["pattern"].numpy()
    eager = _image_stats(data["eager"].numpy(), pattern)
    xla = _image_stats(data["xla"].numpy(), pattern)
    assert data["eager"].shape == data["xla"].shape == (32, 64, 4)
    for name in eager:
        e, x = eager[name], xla[name]
        se = np.sqrt(e.var(ddof=1) / len(e) + x.var(ddof=1) / len(x))
        assert abs(e.mean() - x.mean()) <= 4 * se + 1e-3, (name, e.mean(), x.mean(), se)
