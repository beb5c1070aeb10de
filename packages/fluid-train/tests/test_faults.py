"""Fault injection on the eager trainer: crashes inside the checkpoint protocol, SIGTERM/SIGINT,
full disks and I/O errors, corrupted checkpoint files.

Every run is ``fluid train`` on the ``debug`` preset (12 steps, a checkpoint every 4, a metrics
line every step), called in-process through ``fluid_train.cli.main`` except one real
``python -m fluid_train.cli train`` stopped by SIGTERM from outside. The reference is one
uninterrupted run (module-scoped); each test asserts that the faulty run loses nothing beyond
its last complete checkpoint, that the resumed run logs exactly the reference losses, and that
messages name the checkpoint and the file.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluid_train import checkpoint
from fluid_train.checkpoint import CheckpointManager, verify
from fluid_train.cli import main
from fluid_train.cli.train import EXIT_PREEMPTED, EXIT_WRITE_ERROR
from fluid_train.presets import get_preset
from fluid_train.trainer import Trainer

STEPS, EVERY = 12, 4


class Crash(BaseException):
    """A simulated kill: not an OSError, so nothing cleans up after it."""


def train_argv(run: Path, data: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "train", "--preset", "debug", "--data", str(data), "--out", str(run),
        "--steps", str(steps), "--batch-size", "2", "--log-every", "1",
        "--ckpt-every", str(EVERY), "--keep-checkpoints", "5", "--warmup", "3",
        "--shuffle-buffer", "4", "--no-progress", "--no-export", "--backend", "eager",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def resumed_step(caplog) -> int:
    """The step the last resume started from (the trainer logs it)."""
    records = [
        r
        for r in caplog.records
        if r.getMessage().startswith("resumed ") and " at step " in r.getMessage()
    ]
    assert records, "no resume happened"
    return int(records[-1].getMessage().rsplit(" ", 1)[1])


def names_latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoded_shards):
    """Data, the uninterrupted reference run, and a run killed while starting its step-12
    checkpoint (complete checkpoints at 4 and 8, ``latest`` = step 8) to copy and damage."""
    root = tmp_path_factory.mktemp("faults")
    # 12 samples: 12 steps of 2 cross two epochs
    data = encoded_shards(root / "data", get_preset("debug"), shards=2, per_shard=6)
    assert main(train_argv(root / "reference", data)) == 0
    reference = losses(root / "reference")
    assert [step for step, _ in reference] == list(range(1, STEPS + 1))

    def crash_at_12(point, step):
        if point == "tmp_created" and step == 12:
            raise Crash

    checkpoint.fault_hook = crash_at_12
    try:
        with pytest.raises(Crash):
            main(train_argv(root / "killed", data))
    finally:
        checkpoint.fault_hook = None
    assert names_latest(root / "killed") == "step_00000008"
    return {"root": root, "data": data, "reference": reference, "killed": root / "killed"}


def copy_killed(world, dest: Path) -> Path:
    shutil.copytree(world["killed"], dest)
    return dest


# ---------------------------------------------------------------------- crashes in the protocol


@pytest.mark.parametrize(
    ("point", "newest"),
    [
        ("tmp_created", 4),
        ("after_file:state.pt", 4),
        ("after_file:meta.json", 4),
        ("before_rename", 4),
        ("before_latest", 8),  # step_8 is complete and verifies; only the pointer lags
    ],
)
def test_crash_at_each_point_of_the_protocol_resumes_exactly(
    world, tmp_path, caplog, point, newest
):
    run = tmp_path / "run"
    seen = []

    def hook(at, step):
        seen.append((at, step))
        if at == point and step == 8:
            raise Crash

    checkpoint.fault_hook = hook
    try:
        with pytest.raises(Crash):
            main(train_argv(run, world["data"]))
    finally:
        checkpoint.fault_hook = None
    assert (point, 8) in seen
    assert names_latest(run) == "step_00000004"  # the pointer never names a torn checkpoint
    newest_ok = next(p for p in CheckpointManager(run / "checkpoints").candidates() if verify(p).ok)
    assert newest_ok.name == f"step_{newest:08d}"  # nothing lost beyond the last complete one

    caplog.set_level("INFO", logger="fluid_train")
    assert main(train_argv(run, world["data"], "--resume")) == 0
    assert resumed_step(caplog) == newest
    assert losses(run) == world["reference"]  # every step, bit-identical
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the leftover was cleared
    if newest == 8:
        assert "`latest` names step_00000004" in caplog.text


def test_injected_crash_env_var_exits_at_that_point(world, tmp_path, monkeypatch):
    """FLUID_CHECKPOINT_FAULT=POINT@STEP calls os._exit(FAULT_EXIT) there (no cleanup at all);
    os._exit is replaced by a Crash carrying the status so the test process survives it."""
    statuses = []

    def exit_(status):
        statuses.append(status)
        raise Crash

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "after_file:state.*@8")
    run = tmp_path / "run"
    with pytest.raises(Crash):
        main(train_argv(run, world["data"]))
    assert statuses == [checkpoint.FAULT_EXIT]
    assert names_latest(run) == "step_00000004"
    assert (run / "checkpoints" / ".tmp-step_00000008" / "state.pt").is_file()  # torn, left
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert main(train_argv(run, world["data"], "--resume")) == 0
    assert losses(run) == world["reference"]


# ---------------------------------------------------------------------- preemption


def test_sigterm_and_sigint_stop_after_a_checkpoint_and_resume_exactly(
    world, tmp_path, monkeypatch
):
    rng = random.Random(16)
    first, second = sorted(rng.sample([s for s in range(1, STEPS) if s % EVERY], 2))
    run = tmp_path / "run"
    plan = {first: signal.SIGTERM, second: signal.SIGINT}
    original = Trainer.train_step

    def step_then_signal(self, batch):
        out = original(self, batch)
        signum = plan.get(self.step + 1)  # self.step counts completed steps
        if signum is not None:
            os.kill(os.getpid(), signum)  # arrives mid-step, as a cluster's would
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    assert main(train_argv(run, world["data"])) == EXIT_PREEMPTED
    assert names_latest(run) == f"step_{first:08d}"  # a checkpoint at the stop step
    assert [s for s, _ in losses(run)] == list(range(1, first + 1))  # flushed up to it
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert main(train_argv(run, world["data"], "--resume")) == EXIT_PREEMPTED
    assert names_latest(run) == f"step_{second:08d}"
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(train_argv(run, world["data"], "--resume")) == 0
    assert losses(run) == world["reference"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


@pytest.mark.slow
def test_sigterm_from_outside_at_a_random_step(world, tmp_path, child_env):
    """A real ``python -m fluid_train.cli train`` process with a data-loading worker; SIGTERM to
    its whole process group (as ``scancel`` or a terminal does) once it has logged k steps."""
    steps, workers = 60, ("--num-workers", "1")
    reference = tmp_path / "reference"
    assert main(train_argv(reference, world["data"], *workers, steps=steps)) == 0
    k = random.randrange(3, 30)
    run = tmp_path / "run"
    env = child_env
    argv = train_argv(run, world["data"], *workers, steps=steps)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluid_train.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the test can signal all of it
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= k:
            os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its worker
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, (k, err[-3000:])
    stopped = losses(run)[-1][0]
    assert k <= stopped < steps, (k, stopped)
    assert f"stopped by SIGTERM after step {stopped}" in err
    assert names_latest(run) == f"step_{stopped:08d}"
    assert verify(run / "checkpoints" / f"step_{stopped:08d}").ok
    assert main(train_argv(run, world["data"], *workers, "--resume", steps=steps)) == 0
    assert losses(run) == losses(reference), k


# ---------------------------------------------------------------------- full disk, I/O errors


def test_full_disk_while_checkpointing_keeps_the_previous_one(world, tmp_path, monkeypatch, capsys):
    from fluid_train.backends import eager

    real_save = eager.save_torch

    def filling_save(directory, state, **kwargs):
        if state["host"]["step"] == 8:
            (directory / "state.pt").write_bytes(b"\0" * 1000)  # what fit before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(directory, state, **kwargs)

    monkeypatch.setattr(eager, "save_torch", filling_save)
    run = tmp_path / "run"
    assert main(train_argv(run, world["data"])) == EXIT_WRITE_ERROR
    err = capsys.readouterr().err
    assert f"could not write checkpoint {run / 'checkpoints' / '.tmp-step_00000008'}" in err
    assert "No space left on device (ENOSPC)" in err and "free on that filesystem" in err
    assert "step_00000004 and `latest` are intact" in err
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial directory is gone
    assert names_latest(run) == "step_00000004" and verify(run / "checkpoints" / "step_00000004").ok

    monkeypatch.setattr(eager, "save_torch", real_save)
    assert main(train_argv(run, world["data"], "--resume")) == 0
    assert losses(run) == world["reference"]


def test_io_error_during_the_export_keeps_the_checkpoint(world, tmp_path, monkeypatch, capsys):
    from fluid_train.model import FluidModel

    real_save = FluidModel.save_pretrained

    def failing_save(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(FluidModel, "save_pretrained", failing_save)
    run = tmp_path / "run"
    argv = [a for a in train_argv(run, world["data"], steps=4) if a != "--no-export"]
    assert main(argv) == EXIT_WRITE_ERROR
    err = capsys.readouterr().err
    assert f"could not write the export {run / '.tmp-model'}" in err
    assert "Input/output error (EIO)" in err and "step_00000004 is intact" in err
    assert not (run / ".tmp-model").exists() and not (run / "model").exists()
    assert verify(run / "checkpoints" / "step_00000004").ok

    monkeypatch.setattr(FluidModel, "save_pretrained", real_save)
    assert main([*argv, "--resume"]) == 0  # nothing left to train: the export alone
    assert (run / "model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- corrupted checkpoints


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_recorded_checksum(path: Path) -> None:
    """One hex digit of state.pt's checksum in meta.json changed (meta.json itself corrupt)."""
    meta = json.loads(path.read_text())
    digest = meta["files"]["state.pt"]["sha256"]
    meta["files"]["state.pt"]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(meta))


DAMAGE = {
    "flip": flip_byte,
    "truncate": truncate,
    "delete": Path.unlink,
    "checksum": corrupt_recorded_checksum,
}


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("state.pt", "flip", "state.pt fails the sha256 checksum meta.json records"),
        ("state.pt", "truncate", "state.pt has {half} bytes; meta.json records {full}"),
        ("state.pt", "delete", "state.pt is missing"),
        ("meta.json", "truncate", "meta.json is unreadable"),
        ("meta.json", "checksum", "state.pt fails the sha256 checksum meta.json records"),
        ("meta.json", "delete", "incomplete: no meta.json"),
    ],
)
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(
    world, tmp_path, caplog, file, damage, message
):
    run = copy_killed(world, tmp_path / "run")
    bad = run / "checkpoints" / "step_00000008"
    full = (bad / file).stat().st_size
    DAMAGE[damage](bad / file)
    message = message.format(half=full // 2, full=full)
    assert message in verify(bad).describe()

    caplog.set_level("INFO", logger="fluid_train")
    assert main(train_argv(run, world["data"], "--resume")) == 0
    warning = next(r for r in caplog.records if "cannot resume from" in r.getMessage())
    assert warning.levelname == "WARNING"
    assert str(bad) in warning.getMessage() and message in warning.getMessage()
    assert resumed_step(caplog) == 4  # the newest checkpoint that verifies
    assert losses(run) == world["reference"]


def test_no_checkpoint_verifies_is_a_clear_error_and_the_listing_says_why(world, tmp_path, capsys):
    run = copy_killed(world, tmp_path / "run")
    flip_byte(run / "checkpoints" / "step_00000008" / "state.pt")
    truncate(run / "checkpoints" / "step_00000004" / "state.pt")

    assert main(["checkpoints", str(run)]) == 1  # the newest does not verify
    out = capsys.readouterr().out
    row8 = next(line for line in out.splitlines()[1:] if "step_00000008" in line)
    row4 = next(line for line in out.splitlines()[1:] if "step_00000004" in line)
    assert "BAD" in row8 and "state.pt fails the sha256" in row8 and "<- latest" in row8
    assert "BAD" in row4 and "state.pt has" in row4
    assert main(["checkpoints", str(run), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["latest"] == "step_00000008"
    assert [(c["step"], c["verified"]) for c in report["checkpoints"]] == [(8, False), (4, False)]

    assert main(train_argv(run, world["data"], "--resume")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "verifies (none was deleted)" in err
    assert "step_00000008: state.pt fails" in err and "step_00000004: state.pt has" in err
    assert (run / "checkpoints" / "step_00000008" / "state.pt").is_file()  # never deleted


def test_the_listing_of_a_healthy_run(world, capsys):
    assert main(["checkpoints", str(world["killed"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(latest -> step_00000008)")
    assert [line.split()[0] for line in lines[1:]] == ["step_00000008", "step_00000004"]
    for line in lines[1:]:
        assert " ok " in line and "1 file(s) match their size and sha256" in line
    assert lines[1].endswith("<- latest") and not lines[2].endswith("<- latest")
    size = (world["killed"] / "checkpoints" / "step_00000008" / "state.pt").stat().st_size
    assert f"{size / 2**20:.1f} MiB" in lines[1]  # the files meta.json lists


def test_checkpoints_without_checksums_still_load(world, tmp_path, caplog):
    """A checkpoint written before this change (meta.json without ``files``) resumes exactly;
    a damaged one is caught by the load and the resume falls back to the previous one."""
    run = copy_killed(world, tmp_path / "run")
    for step_dir in CheckpointManager(run / "checkpoints").candidates():
        meta = json.loads((step_dir / "meta.json").read_text())
        del meta["files"], meta["checksum"]
        (step_dir / "meta.json").write_text(json.dumps(meta))
    assert verify(run / "checkpoints" / "step_00000008").legacy
    damaged = copy_killed({"killed": run}, tmp_path / "damaged")

    caplog.set_level("INFO", logger="fluid_train")
    assert main(train_argv(run, world["data"], "--resume")) == 0
    assert "no checksums (written before verified checkpoints)" in caplog.text
    assert resumed_step(caplog) == 8
    assert losses(run) == world["reference"]

    caplog.clear()
    truncate(damaged / "checkpoints" / "step_00000008" / "state.pt")
    assert main(train_argv(damaged, world["data"], "--resume")) == 0
    state = damaged / "checkpoints" / "step_00000008" / "state.pt"
    assert f"could not read checkpoint file {state}" in caplog.text
    assert resumed_step(caplog) == 4
    assert losses(damaged) == world["reference"]
