"""The xla backend under SPMD FSDPv2 on a 4-device CPU PJRT mesh, against the eager backend.

``xr.use_spmd()`` is process-global and irreversible, so the xla runs happen in a subprocess
(PJRT_DEVICE=CPU, CPU_NUM_DEVICES=4). The eager reference runs here.

Loss comparison: the raster-discrete variant with caption dropout off has a loss that is a
deterministic function of weights and batch (teacher forcing, softmax cross-entropy; no masks,
no diffusion noise), so XLA's and PyTorch's different RNG streams do not enter. The two
backends then differ only by float32 rounding (other op order, sharded reductions): losses
must agree to 1e-4 relative over 20 steps of AdamW. The random-order variant (masks and caption
dropout drawn from the device RNG every step) is run for the graph-count check too.
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fluid_train.recipe import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from fluid_train.trainer import train

STEPS = 20
LOSS_RTOL = 1e-4  # xla (4-device SPMD) vs eager CPU, float32, 20 steps
DEFAULT_LR = OptimizerConfig().lr  # these runs use the recipe's learning rate


@pytest.fixture
def train_values(run_values):
    """``train_values(out, data, **overrides)``: the comparison runs' values, STEPS steps."""
    return functools.partial(run_values, steps=STEPS)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch_xla
    from fluid_train.model import FluidConfig
    from fluid_train.recipe import TrainConfig
    from fluid_train.trainer import Trainer

    spec = json.loads(open(sys.argv[1]).read())
    report = {}

    def run(name, values, model, probe=False):
        trainer = Trainer(TrainConfig.from_dict(values), model_config=FluidConfig.from_dict(model))
        if probe:
            from torch_xla.experimental.spmd_fully_sharded_data_parallel import (
                SpmdFullyShardedDataParallel as FSDPv2)
            seen = {}
            step = trainer.train_step
            def probing_step(batch):
                seen.setdefault("tokens", torch_xla._XLAC._get_xla_sharding_spec(batch["tokens"]))
                return step(batch)
            trainer.train_step = probing_step
            model_ = trainer.model
            report["mesh"] = dict(trainer.backend.mesh.shape())
            report["blocks_wrapped"] = all(isinstance(b, FSDPv2) for b in model_.trunk.blocks) and all(
                isinstance(b, FSDPv2) for b in model_.text_aligner.blocks)
            specs = [torch_xla._XLAC._get_xla_sharding_spec(p) for p in model_.parameters()]
            report["params"] = len(specs)
            report["sharded_params"] = sum(1 for s in specs if s)
            report["ema_sharded"] = sum(
                1 for a in trainer.ema.shadow if torch_xla._XLAC._get_xla_sharding_spec(a))
        result = trainer.fit()
        if probe:
            report["input_sharding"] = seen["tokens"]
        report[name] = str(result.checkpoint)

    run("a", spec["a"], spec["discrete"], probe=True)
    run("b", spec["b"], spec["discrete"])
    run("c", spec["c"], spec["discrete"])  # resumes b
    run("d", spec["d"], spec["masked"])
    print("REPORT " + json.dumps(report))
    """
)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.xla
@pytest.mark.slow
def test_spmd_fsdp_matches_eager_compiles_once_and_resumes(
    tmp_path, tiny_config, encoded_shards, run_script, xla_env, train_values
):
    discrete = tiny_config("discrete", "raster", text_drop_prob=0.0)
    masked = tiny_config("continuous", "random")  # Fluid itself
    data_d = encoded_shards(tmp_path / "data_d", discrete, per_shard=24)
    data_m = encoded_shards(tmp_path / "data_m", masked, per_shard=24)
    xla = dict(backend="xla")
    spec = {
        "discrete": discrete.to_dict(),
        "masked": masked.to_dict(),
        "a": train_values(tmp_path / "a", data_d, **xla),
        "b": train_values(tmp_path / "b", data_d, steps=10, **xla),
        "c": train_values(tmp_path / "b", data_d, resume=True, **xla),
        "d": train_values(tmp_path / "d", data_m, ckpt_every=100, **xla),
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    script = tmp_path / "xla_runs.py"
    report = run_script(SCRIPT, script, spec_file, env=xla_env(4), timeout=600).report

    # SPMD layout: ('data', 'fsdp') = (1, 4); FSDPv2 on every block; everything sharded.
    assert report["mesh"] == {"data": 1, "fsdp": 4}
    assert report["blocks_wrapped"]
    assert report["sharded_params"] == report["params"] > 0
    assert report["ema_sharded"] > 0
    assert report["input_sharding"].startswith("{devices=[4,1]")  # batch over the 4 devices

    # One step graph, compiled for step 1 and reused by every later step (the optimizer state
    # is primed before step 1, so step 1 is already the steady-state graph).
    for run in ("a", "d"):
        compiles = {r["step"]: r["compiles"] for r in metrics(tmp_path / run)}
        assert compiles[1] == compiles[3] == compiles[STEPS] > 0, compiles

    # The same training, eager on one CPU device: same seed, data, order and weights.
    eager = train(
        TrainConfig.from_dict(
            train_values(tmp_path / "eager", data_d, backend="eager", device="cpu")
        ),
        model_config=discrete,
    )
    xla_losses = [r["loss"] for r in metrics(tmp_path / "a")]
    eager_losses = [r["loss"] for r in metrics(tmp_path / "eager")]
    assert len(xla_losses) == len(eager_losses) == STEPS
    np.testing.assert_allclose(xla_losses, eager_losses, rtol=LOSS_RTOL)
    assert eager_losses[-1] < eager_losses[0]  # it trains

    # Resume on xla (DCP checkpoint with the SPMD planners): steps 11-20 as in the straight run.
    assert (tmp_path / "b" / "checkpoints" / "step_00000010" / ".metadata").is_file()
    resumed = [r["loss"] for r in metrics(tmp_path / "b")]
    np.testing.assert_allclose(resumed, xla_losses, rtol=1e-6)
    straight_ema = load_file(tmp_path / "a" / "model" / "model.safetensors")
    resumed_ema = load_file(tmp_path / "b" / "model" / "model.safetensors")
    eager_ema = load_file(Path(eager.pipeline) / "model.safetensors")
    close = []
    for name, value in straight_ema.items():
        np.testing.assert_allclose(resumed_ema[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-7)
        # Eager vs SPMD: Adam moves a weight whose gradient is ~0 by up to lr in either
        # direction, so float rounding may flip a rare element by O(lr); the bulk must agree.
        diff = np.abs(eager_ema[name].numpy() - value.numpy())
        assert diff.max() <= 2 * DEFAULT_LR, (name, diff.max())
        close.append((diff <= 1e-5 + 1e-3 * np.abs(value.numpy())).ravel())
    assert np.concatenate(close).mean() >= 0.99


def test_train_config_round_trips_for_the_subprocess(tmp_path, train_values):
    values = train_values(tmp_path / "a", tmp_path, backend="xla")
    config = TrainConfig.from_dict(values)
    assert config.data == DataConfig(shards=[str(tmp_path)], shuffle_buffer=8)
    assert config.schedule == ScheduleConfig(warmup_steps=5) and config.backend == "xla"
