"""Fault injection on the xla backend's checkpoints (torch.distributed.checkpoint files written
by the SPMD planners) on a 4-device CPU PJRT mesh.

As in test_xla.py, ``xr.use_spmd()`` is process-global, so everything runs in one subprocess
that reports back: a reference run (8 steps, checkpoints at 4 and 8), a run killed after the
first DCP data file of its step-8 checkpoint, a run stopped by SIGTERM at step 6 (not a
checkpoint step: the stop writes one), and resumes from copies whose step-8 checkpoint has one
file corrupted (each file in turn). The model is Fluid itself (random order, continuous tokens),
so masks, noise and caption dropout come from the device RNG: the resumed runs must log the
reference losses exactly, which needs the checkpoint's syncs not to advance torch_xla's seed.
"""

from __future__ import annotations

import json
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import fnmatch, json, logging, os, shutil, signal, sys
    from pathlib import Path
    import torch_xla  # noqa: F401
    from fluid_train import checkpoint
    from fluid_train.model import FluidConfig
    from fluid_train.recipe import TrainConfig
    from fluid_train.trainer import Trainer

    spec = json.loads(open(sys.argv[1]).read())
    root = Path(spec["root"])
    model = FluidConfig.from_dict(spec["model"])
    report = {}
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("fluid_train").addHandler(Keep(logging.WARNING))

    class Crash(BaseException):
        pass

    def values(name, **kw):
        return {**spec["values"], "out": str(root / name), **kw}

    def losses(name):
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        return [[r["step"], r["loss"]] for r in map(json.loads, lines)]

    import time
    start = time.perf_counter()

    def fit(config, signal_at=None):
        print(f"TIME {time.perf_counter() - start:.1f} {config['out']}", file=sys.stderr, flush=True)
        trainer = Trainer(TrainConfig.from_dict(config), model_config=model)
        if signal_at is not None:
            step_fn = trainer.train_step
            def signalling(batch):
                out = step_fn(batch)
                if trainer.step + 1 == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out
            trainer.train_step = signalling
        return trainer.fit()

    def latest(name):
        return (root / name / "checkpoints" / "latest").read_text().strip()

    fit(values("a"))
    report["reference"] = losses("a")
    report["files"] = sorted(checkpoint.manifest(root / "a" / "checkpoints" / "step_00000008"))

    # b: killed right after the first DCP data file of step 8 was recorded
    def crash(point, step):
        if step == 8 and fnmatch.fnmatchcase(point, "after_file:*.distcp"):
            raise Crash
    checkpoint.fault_hook = crash
    try:
        fit(values("b"))
        report["b_crashed"] = False
    except Crash:
        report["b_crashed"] = True
    checkpoint.fault_hook = None
    report["b_latest"] = latest("b")
    fit(values("b", resume=True))
    report["b"] = losses("b")

    # c: SIGTERM during step 6
    result = fit(values("c"), signal_at=6)
    report["c_stop"] = [result.preempted, result.step, latest("c")]
    fit(values("c", resume=True))
    report["c"] = losses("c")

    # d_*: the step-8 checkpoint of a finished run, one file corrupted; resume from it
    report["corrupt"] = {}
    for rel in report["files"] + ["meta.json"]:
        name = "d_" + rel.replace(".", "_").replace("/", "_")
        shutil.copytree(root / "a", root / name)
        ckpts = root / name / "checkpoints"
        target = ckpts / "step_00000008" / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        messages.clear()
        fit(values(name, resume=True))
        report["corrupt"][rel] = {"losses": losses(name), "warnings": list(messages)}
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.xla
@pytest.mark.slow
def test_xla_dcp_checkpoints_survive_crashes_preemption_and_corruption(
    tmp_path, tiny_config, encoded_shards, run_script, xla_env
):
    model = tiny_config("continuous", "random")  # masks, noise and dropout from the device RNG
    data = encoded_shards(tmp_path / "data", model, per_shard=16)
    spec = {
        "root": str(tmp_path),
        "model": model.to_dict(),
        "values": {
            "data": {"shards": [str(data)], "shuffle_buffer": 8},
            "batch_size": 8,  # 2 samples per device on the 4-device mesh
            "steps": 8,
            "log_every": 1,
            "ckpt_every": 4,
            "schedule": {"warmup_steps": 3},
            "ema_decay": 0.9,
            "progress": False,
            "precision": "fp32",
            "backend": "xla",
            "export": False,
        },
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    report = run_script(SCRIPT, tmp_path / "runs.py", spec_file, env=xla_env(4), timeout=600).report
    reference = report["reference"]
    assert [step for step, _ in reference] == list(range(1, 9))

    # The manifest covers DCP's files and the per-host file.
    files = report["files"]
    assert ".metadata" in files and "host_0.pt" in files
    assert any(name.endswith(".distcp") for name in files)

    assert report["b_crashed"] and report["b_latest"] == "step_00000004"
    assert report["b"] == reference  # resumed from step 4, bit-identical
    assert report["c_stop"] == ["SIGTERM", 6, "step_00000006"]
    assert report["c"] == reference

    for rel, outcome in report["corrupt"].items():
        named = [w for w in outcome["warnings"] if "cannot resume from" in w]
        assert named and "step_00000008" in named[0], (rel, outcome["warnings"])
        assert rel in named[0], (rel, named[0])  # meta.json flipped: "meta.json is unreadable"
        assert outcome["losses"] == reference, rel  # resumed from step 4
