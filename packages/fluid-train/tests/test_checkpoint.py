"""Atomic checkpoints: a crash at any point of a write leaves the previous "latest" loadable."""

from __future__ import annotations

import pytest
import torch

from fluid_train.checkpoint import CheckpointManager, WriteError, load_torch, save_torch, verify


def writer(value: float):
    def write(directory):
        save_torch(directory, {"weight": torch.full((3,), value), "step": int(value)})

    return write


def test_save_points_latest_and_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        path = manager.save(step, writer(step), meta={"backend": "eager"})
        assert manager.latest() == path
    assert [p.name for p in manager.list()] == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    assert CheckpointManager.meta(manager.latest())["step"] == 3
    assert load_torch(manager.latest())["weight"].tolist() == [3.0, 3.0, 3.0]
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_while_writing_leaves_the_previous_latest_intact(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    good = manager.save(1, writer(1.0), meta={})
    before = (good / "state.pt").read_bytes()

    def crashing_write(directory):
        (directory / "state.pt").write_bytes(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    with pytest.raises(WriteError, match="simulated.*step_00000001 and `latest` are intact"):
        manager.save(2, crashing_write, meta={})
    assert manager.latest() == good
    assert (good / "state.pt").read_bytes() == before
    assert load_torch(manager.latest())["step"] == 1
    assert [p.name for p in manager.list()] == ["step_00000001"]  # the torn one is not listed
    assert not list(tmp_path.glob(".tmp-*"))  # the partial directory was removed

    (tmp_path / ".tmp-step_00000002").mkdir()  # a crash's leftover: the next save clears it
    manager.save(2, writer(2.0), meta={})
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_torch(manager.latest())["step"] == 2


def test_crash_between_rename_and_pointer_update(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=3)
    good = manager.save(1, writer(1.0), meta={})

    def crash(name):
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(manager, "_point_latest", crash)
    with pytest.raises(WriteError, match="power cut"):
        manager.save(2, writer(2.0), meta={})
    assert manager.latest() == good  # the pointer still names the previous checkpoint
    assert load_torch(manager.latest())["step"] == 1


def test_latest_naming_an_incomplete_checkpoint_does_not_verify(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, writer(1.0), meta={})
    (tmp_path / "latest").write_text("step_00000009\n")
    assert manager.latest() == tmp_path / "step_00000009"
    assert "does not exist" in verify(manager.latest()).describe()
    (tmp_path / "latest").unlink()  # no pointer: the newest complete checkpoint
    assert manager.latest().name == "step_00000001"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(5, writer(1.0), meta={})
    manager.save(5, writer(7.0), meta={})
    assert load_torch(manager.latest())["weight"].tolist() == [7.0, 7.0, 7.0]
    assert [p.name for p in manager.list()] == ["step_00000005"]
