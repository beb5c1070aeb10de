"""The fsdp backend (FSDP2) under torchrun with gloo on the CPU, against the eager backend.

Four torchrun launches (2, 2, 1 and 4 processes) each run a script of several training jobs;
the eager references run here. Loss comparisons use the raster-discrete variant with caption
dropout off, whose loss is a deterministic function of weights and batch (as in test_xla), so
the ranks' own RNG streams do not enter. The eager reference sees the same global batches: a
loader here concatenates the parts ``TrainLoader(host=r, num_hosts=N)`` gives each rank.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fluid_train import process_group
from fluid_train.backends import resolve_backend
from fluid_train.data import HostBatch, TrainLoader
from fluid_train.model import FluidConfig
from fluid_train.recipe import TrainConfig
from fluid_train.trainer import Trainer, train

STEPS = 20
LOSS_RTOL = 1e-4  # FSDP2 over gloo vs eager, float32, 20 steps of AdamW

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from fluid_train import process_group
    from fluid_train.model import FluidConfig, FluidModel
    from fluid_train.recipe import TrainConfig, clean_name
    from fluid_train.trainer import NonFiniteLossError, Trainer

    spec = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ["RANK"])
    report = {}

    def local_and_total(tensors):
        tensors = [t for t in tensors if t.ndim > 0]
        local = sum(t.to_local().numel() if hasattr(t, "to_local") else t.numel() for t in tensors)
        return local, sum(t.numel() for t in tensors)

    for job in spec["jobs"]:
        model = FluidConfig.from_dict(spec["models"][job.get("model", "discrete")])
        trainer = Trainer(TrainConfig.from_dict(job["values"]), model_config=model)
        name = job["name"]
        if job.get("probe"):
            params = list(trainer.model.parameters())
            moments = [t for s in trainer.optimizer.state.values() for t in s.values()]
            torch.manual_seed(job["values"].get("seed", 0))
            eager = dict(FluidModel(model).named_parameters())
            init = max(
                float((p.full_tensor() - eager[clean_name(n)]).abs().max())
                for n, p in trainer.model.named_parameters()
            )
            report[name] = {
                "mesh": list(trainer.backend.mesh.shape),
                "params": local_and_total(params),
                "moments": local_and_total(moments),
                "ema": local_and_total(trainer.ema.shadow),
                "init_max_diff": init,
                "all_dtensor": all(hasattr(p, "to_local") for p in params),
                "checkpointed": sum(isinstance(m, CheckpointWrapper) for m in trainer.model.modules()),
                "any_process": [
                    trainer.backend.any_process(rank == trainer.backend.process_count - 1),
                    trainer.backend.any_process(False),
                ],
            }
        if job.get("fail_at"):
            step_fn = trainer.train_step
            def failing(batch, trainer=trainer, step_fn=step_fn):
                if rank == job["fail_rank"] and trainer.step + 1 == job["fail_at"]:
                    print(f"FAILING_AT {time.time()}", flush=True)
                    raise RuntimeError(f"injected failure on rank {rank}")
                return step_fn(batch)
            trainer.train_step = failing
        if job.get("nan_at"):
            step_fn = trainer.train_step
            def poisoned(batch, trainer=trainer, step_fn=step_fn):
                if rank == job["nan_rank"] and trainer.step + 1 == job["nan_at"]:
                    batch = {**batch, "text_hidden": batch["text_hidden"] * float("nan")}
                return step_fn(batch)
            trainer.train_step = poisoned
        try:
            trainer.fit()
        except NonFiniteLossError as error:
            print(f"NONFINITE rank {rank} step {error.step}", flush=True)
        if rank == 0:
            print("REPORT " + json.dumps(report), flush=True)
    # Left alive, a gloo group can abort the interpreter's exit (SIGABRT).
    assert process_group.leave()
    """
)


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def values(run_values):
    """``values(out, data, **overrides)``: the comparison runs' values on the fsdp backend."""
    return functools.partial(run_values, steps=STEPS, backend="fsdp", device="cpu")


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture
def torchrun(tmp_path, run_script, child_env):
    """``torchrun(name, nproc, jobs, models) -> ScriptRun``: the jobs run by SCRIPT under
    ``torchrun --nproc-per-node nproc``; its exit status unchecked (a rank may fail on purpose)."""

    def launch(name: str, nproc: int, jobs: list[dict], models: dict):
        spec = tmp_path / f"{name}.json"
        spec.write_text(json.dumps({"jobs": jobs, "models": models}))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                    str(nproc), "--master-port", str(free_port())]  # fmt: skip
        env = child_env
        script = tmp_path / "fsdp_jobs.py"
        return run_script(
            SCRIPT, script, spec, env=env, timeout=240, launcher=launcher, check=False
        )

    return launch


class RankParts:
    """The global batches an N-rank run trains on, in one process: the concatenation of what
    ``TrainLoader(host=r, num_hosts=N)`` yields for r = 0..N-1 (each rank's part, in rank order).
    """

    def __init__(self, trainer: Trainer, ranks: int) -> None:
        config = trainer.config
        self.parts = [
            TrainLoader(
                config.data.shards,
                batch_size=config.batch_size // ranks,
                image_size=trainer.model_config.image_size,
                seed=config.seed,
                shuffle_buffer=config.data.shuffle_buffer,
                host=r,
                num_hosts=ranks,
            )
            for r in range(ranks)
        ]
        self.kind = "encoded"
        self.urls = self.parts[0].urls

    def __iter__(self):
        for parts in zip(*self.parts, strict=False):
            tensors = {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors}
            yield HostBatch(tensors, None, 0, parts, [])

    def commit(self, batch: HostBatch) -> None:
        for loader, part in zip(self.parts, batch.state, strict=True):
            loader.commit(part)

    @property
    def states(self):
        return {i: s for i, p in enumerate(self.parts) for s in p.states.values()}

    def skip_totals(self):
        return self.parts[0].skip_totals()

    def state_dict(self):
        """Every rank's stream, as the N ranks' host files together describe them."""
        state = self.parts[0].state_dict()
        for part in self.parts[1:]:
            state["streams"].update(part.state_dict()["streams"])
        return state


def at_step_10(run: Path, copy: Path) -> None:
    """``run`` copied as it stood after its step-10 checkpoint (later checkpoints removed)."""
    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if later.name > "step_00000010":
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text("step_00000010\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def one_rank_group():
    """torchrun's variables for a world of one in this process; the group destroyed after."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        process_group.leave()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def eager_reference(values):
    """``eager_reference(out, data, model, ranks, **overrides)``: the run on the eager backend,
    trained on the global batches of ``ranks`` ranks."""

    def fit(out: Path, data: Path, model: FluidConfig, ranks: int, **overrides):
        trainer = Trainer(
            TrainConfig.from_dict(values(out, data, backend="eager", **overrides)),
            model_config=model,
        )
        trainer.loader = RankParts(trainer, ranks)
        return trainer.fit()

    return fit


# ---------------------------------------------------------------------- tests


def test_auto_picks_fsdp_under_torchrun_with_several_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_backend("auto") == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_backend("auto") == "eager"
    assert resolve_backend("fsdp") == "fsdp"


def test_the_fluid_command_destroys_the_process_group_when_it_finishes(capsys, monkeypatch):
    # A gloo group left alive can abort the interpreter's exit (SIGABRT), so the command that
    # joined one leaves it: join() makes the group once, main() destroys it after a command
    # returned, whatever its status; an exception leaves it alone (a peer may be mid-collective).
    import torch.distributed as dist

    import fluid_train.cli.info
    from fluid_train.cli import main

    assert process_group.leave() is False  # no group: nothing to do
    process_group.barrier()  # no group: no one to wait for
    assert [process_group.any_true(f) for f in (True, False)] == [True, False]
    with one_rank_group():
        process_group.join()
        group = dist.group.WORLD
        process_group.join()  # a group exists already: it is kept
        assert dist.group.WORLD is group and dist.get_world_size() == 1
        process_group.barrier()
        assert [process_group.any_true(f) for f in (True, False)] == [True, False]  # all-reduced
        assert main(["info", "debug"]) == 0
        assert not dist.is_initialized()
        assert "debug" in capsys.readouterr().out
        process_group.join()
        assert main(["info", "no-such-preset"]) == 2  # refused: still destroyed
        assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
        assert not dist.is_initialized()

        class Crash(Exception):
            pass

        def crash(args):
            raise Crash

        process_group.join()
        monkeypatch.setattr(fluid_train.cli.info, "run", crash)
        with pytest.raises(Crash):
            main(["info", "debug"])
        assert dist.is_initialized()  # left for the exit to handle


def test_fsdp_outside_torchrun_is_a_clear_error(
    tmp_path, tiny_config, monkeypatch, encoded_shards, values
):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    model = tiny_config("discrete", "raster")
    data = encoded_shards(tmp_path / "data", model, shards=1, per_shard=2)
    with pytest.raises(RuntimeError, match="runs under torchrun"):
        Trainer(TrainConfig.from_dict(values(tmp_path / "x", data)), model_config=model)


def test_grad_accum_matches_one_larger_batch_on_eager(
    tmp_path, tiny_config, encoded_shards, values
):
    model = tiny_config("discrete", "raster", text_drop_prob=0.0)
    data = encoded_shards(tmp_path / "data", model, shards=1, per_shard=24)
    common = dict(backend="eager", steps=4, ckpt_every=100, export=False)
    for name, batch in (("k2", {"batch_size": 8, "grad_accum": 2}), ("b16", {"batch_size": 16})):
        config = TrainConfig.from_dict(values(tmp_path / name, data, **common, **batch))
        train(config, model_config=model)
    accum, big = losses(tmp_path / "k2"), losses(tmp_path / "b16")
    assert len(accum) == 4
    np.testing.assert_allclose(accum, big, rtol=1e-4)
    metrics = [json.loads(x) for x in (tmp_path / "k2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples"] == 4 * 16


@pytest.mark.slow
def test_fsdp_on_2_ranks_matches_eager_shards_and_resumes_anywhere(
    tmp_path, tiny_config, encoded_shards, values, torchrun, eager_reference
):
    discrete = tiny_config("discrete", "raster", text_drop_prob=0.0)
    models = {"discrete": discrete.to_dict()}
    data = encoded_shards(tmp_path / "data", discrete, shards=4, per_shard=24)

    # The eager reference on the same global batches; its step-10 checkpoint resumes below on
    # 2 ranks (eager checkpoint -> fsdp).
    eager_a = eager_reference(tmp_path / "ref_a", data, discrete, ranks=2)
    at_step_10(tmp_path / "ref_a", tmp_path / "e2f")

    # One launch, 2 ranks: the straight run (probed), grad-accum, eager -> fsdp, and a run
    # stopped after its step-10 checkpoint, then resumed to 20.
    jobs = [
        {"name": "a", "values": values(tmp_path / "a", data), "probe": True},
        {
            "name": "k2",
            "values": values(tmp_path / "k2", data, steps=4, grad_accum=2, export=False),
        },
        {
            "name": "b16",
            "values": values(tmp_path / "b16", data, steps=4, batch_size=16, export=False),
        },
        {"name": "e2f", "values": values(tmp_path / "e2f", data, steps=10, resume=True)},
        {"name": "b", "values": values(tmp_path / "b", data, steps=10, export=False)},
        {"name": "c", "values": values(tmp_path / "b", data, resume=True, export=False)},
    ]
    launch = torchrun("launch", 2, jobs, models)
    assert launch.returncode == 0 and launch.report, launch.output[-3000:]
    report = launch.report

    # Initial weights equal eager's; every parameter is an FSDP2 shard; ~1/2 per rank.
    probe = report["a"]
    assert probe["mesh"] == [2] and probe["all_dtensor"] and probe["checkpointed"] == 0
    assert probe["any_process"] == [True, False]
    assert probe["init_max_diff"] == 0.0
    for key in ("params", "moments", "ema"):
        local, total = probe[key]
        assert 0.45 <= local / total <= 0.55, (key, local, total)

    # 2 ranks == eager on the same global batches, 20 steps; the same EMA export (rank 0's).
    fsdp_losses, eager_losses = losses(tmp_path / "a"), losses(tmp_path / "ref_a")
    assert len(fsdp_losses) == len(eager_losses) == STEPS
    np.testing.assert_allclose(fsdp_losses, eager_losses, rtol=LOSS_RTOL)
    assert fsdp_losses[-1] < fsdp_losses[0]
    fsdp_ema = load_file(tmp_path / "a" / "model" / "model.safetensors")
    eager_ema = load_file(Path(eager_a.pipeline) / "model.safetensors")
    assert fsdp_ema.keys() == eager_ema.keys()
    for name, value in eager_ema.items():
        np.testing.assert_allclose(fsdp_ema[name].numpy(), value.numpy(), atol=5e-4)

    # grad accum 2 on batch 8 == batch 16, on 2 ranks.
    np.testing.assert_allclose(losses(tmp_path / "k2"), losses(tmp_path / "b16"), rtol=1e-4)

    # The eager checkpoint resumed on 2 ranks: its EMA weights exported as they were saved.
    e2f = load_file(tmp_path / "e2f" / "model" / "model.safetensors")
    saved = torch.load(
        tmp_path / "e2f" / "checkpoints" / "step_00000010" / "state.pt", weights_only=True
    )
    for name, value in saved["ema"].items():
        np.testing.assert_array_equal(e2f[name].numpy(), value.numpy())

    # 10 steps, stop, resume: steps 11-20 as in the straight run.
    np.testing.assert_allclose(losses(tmp_path / "b"), fsdp_losses, rtol=1e-6)

    # The 2-rank DCP checkpoint of step 10: shards plus every rank's host state.
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000010"
    assert (ckpt / ".metadata").is_file()
    assert (ckpt / "host_0.pt").is_file() and (ckpt / "host_1.pt").is_file()
    for copy in ("b_one", "b_eager"):
        at_step_10(tmp_path / "b", tmp_path / copy)

    # ... resumed on eager: exactly the saved state (read independently, by DCP's converter).
    resumed = Trainer(
        TrainConfig.from_dict(
            values(tmp_path / "b_eager", data, backend="eager", steps=12, resume=True)
        ),
        model_config=discrete,
    )
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert resumed.step == 10
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full["model"][name], rtol=0, atol=0)
    for name, value in resumed.ema.state_dict().items():
        torch.testing.assert_close(value, full["ema"][name], rtol=0, atol=0)
    names = {id(p): n for n, p in resumed.model.named_parameters()}
    for param, state in resumed.optimizer.state.items():
        saved = full["optimizer"][names[id(param)]]
        torch.testing.assert_close(state["exp_avg"], saved["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], saved["exp_avg_sq"], rtol=0, atol=0)
        assert float(state["step"]) == 10
    resumed.fit()

    # ... and on 1 fsdp rank (a process group of one, in this process): the same steps 11-12
    # as eager (both read one data stream, restarted at the next epoch).
    with one_rank_group():
        train(
            TrainConfig.from_dict(values(tmp_path / "b_one", data, steps=12, resume=True)),
            model_config=discrete,
        )
    one, eager_b = losses(tmp_path / "b_one"), losses(tmp_path / "b_eager")
    assert len(one) == len(eager_b) == 12
    np.testing.assert_allclose(one, eager_b, rtol=LOSS_RTOL)
    np.testing.assert_allclose(one[:10], fsdp_losses[:10], rtol=1e-6)  # metrics kept to step 10


@pytest.mark.slow
def test_hsdp_2x2_with_4_processes_and_checkpointed_blocks_matches_eager_a_failing_rank_stops_all(
    tmp_path, tiny_config, encoded_shards, values, torchrun, eager_reference
):
    discrete = tiny_config("discrete", "raster", text_drop_prob=0.0)
    data = encoded_shards(tmp_path / "data", discrete, shards=4, per_shard=24)
    parallel = {"dcn_data_parallelism": 2, "activation_checkpointing": "block"}
    run = values(tmp_path / "h", data, steps=6, export=False, parallel=parallel)
    failing = values(tmp_path / "f", data, steps=6, export=False)
    nan = values(tmp_path / "n", data, steps=6, export=False)
    jobs = [
        {"name": "h", "values": run, "probe": True},
        {"name": "n", "values": nan, "nan_at": 2, "nan_rank": 1},
        {"name": "f", "values": failing, "fail_at": 3, "fail_rank": 3},
    ]
    launch = torchrun("hsdp", 4, jobs, {"discrete": discrete.to_dict()})
    end = time.time()
    code, output, report = launch.returncode, launch.output, launch.report
    assert report, output[-3000:]
    probe = report["h"]
    assert probe["mesh"] == [2, 2]
    assert probe["checkpointed"] == discrete.backbone.depth + discrete.aligner.depth
    assert probe["any_process"] == [True, False]  # rank 3's True reaches rank 0
    local, total = probe["params"]
    assert 0.45 <= local / total <= 0.55  # sharded over 2, replicated over 2
    eager_reference(tmp_path / "ref_h", data, discrete, ranks=4, steps=6, export=False)
    np.testing.assert_allclose(losses(tmp_path / "h"), losses(tmp_path / "ref_h"), rtol=LOSS_RTOL)

    # A NaN loss on rank 1 alone at step 2: every rank stopped there (the global loss is NaN).
    stops = sorted(re.findall(r"NONFINITE rank (\d) step (\d+)", output))  # lines may interleave
    assert stops == [(str(r), "2") for r in range(4)], stops
    assert not (tmp_path / "n" / "checkpoints" / "step_00000002").exists()

    # Rank 3 raised at step 3 while the others waited in a collective: all stopped, with its
    # error in the output.
    assert code != 0
    assert "injected failure on rank 3" in output
    failed_at = float(output.split("FAILING_AT ")[1].split()[0])
    print(f"\nfsdp: the 4-process job ended {end - failed_at:.1f} s after rank 3 raised")
    assert end - failed_at < 60, f"the job took {end - failed_at:.1f} s to stop after the error"
