"""The one atomic-write helper of fluid-train: a target is complete or untouched."""

from __future__ import annotations

import json

import pytest

from fluid_train.atomic import atomic_directory, atomic_file, move_into_place, write_json_atomic


def test_a_failed_file_write_leaves_the_target_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"fid": 1.0})
    with pytest.raises(RuntimeError), atomic_file(target, "w") as f:
        f.write('{"fid": 2')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"fid": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left
    write_json_atomic(target, {"fid": 2.0})
    assert json.loads(target.read_text()) == {"fid": 2.0}


def test_a_directory_is_swapped_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as build:
        (build / "weights").write_text("v1")
        assert not target.exists()  # nothing visible while it is being built
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(OSError), atomic_directory(target) as build:
        (build / "weights").write_text("v2 (partial)")
        raise OSError(28, "No space left on device")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target) as build:
        (build / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp-/.old- left


def test_move_into_place_refuses_to_merge_into_an_existing_folder(tmp_path):
    built, target = tmp_path / "built", tmp_path / "00001"
    built.mkdir()
    (built / "metadata.jsonl").write_text("{}\n")
    move_into_place(built, target)
    assert (target / "metadata.jsonl").is_file() and not built.exists()
    again = tmp_path / "again"
    again.mkdir()
    (again / "x").write_text("")
    with pytest.raises(OSError):
        move_into_place(again, target)
