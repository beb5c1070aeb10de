from __future__ import annotations

import json
import tarfile

import pytest

from fluid_eval.cli import build_parser, main


def _json_out(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out)


def test_shapes_world_end_to_end_from_the_command_line(tmp_path, capsys) -> None:
    assert (
        main(
            [
                "shapes",
                "make",
                "--out",
                str(tmp_path / "shards"),
                "--num",
                "5",
                "--size",
                "32",
                "--shard-size",
                "2",
            ]
        )
        == 0
    )
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[-1]) as tar:
        assert tar.getnames() == ["000020.png", "000020.txt", "000020.json"]
    prompts = tmp_path / "evaluation_metadata.jsonl"
    assert main(["shapes", "prompts", "--out", str(prompts), "--num", "12", "--seed", "3"]) == 0
    assert len(prompts.read_text().splitlines()) == 12
    assert (
        main(
            [
                "shapes",
                "render",
                "--metadata",
                str(prompts),
                "--out",
                str(tmp_path / "gt"),
                "--samples",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    results = tmp_path / "results.jsonl"
    code = main(["eval", "geneval", "--images", str(tmp_path / "gt"), "--metadata", str(prompts),
                 "--results", str(results), "--json"])  # fmt: skip
    report = _json_out(capsys)
    assert (
        code == 0
        and report["overall"] == 1.0
        and report["num_images"] == 24
        and len(report["tasks"]) == 6
    )
    assert len(results.read_text().splitlines()) == 24
    assert (
        main(
            [
                "shapes",
                "render",
                "--metadata",
                str(prompts),
                "--out",
                str(tmp_path / "gt2"),
                "--seed",
                "9",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "fid",
                "--real",
                str(tmp_path / "gt"),
                "--fake",
                str(tmp_path / "gt2"),
                "--json",
            ]
        )
        == 0
    )
    result = _json_out(capsys)
    assert result["num_real"] == 24 and result["num_fake"] == 48 and result["fid"] > 0


def test_scaling_command_writes_figures(tmp_path, capsys) -> None:
    points = [{"variant": v, "params": n, "loss": c * n**-0.05, "fid": 10 * c * n**-0.05, "geneval": 0.1 + n / 1e10}
              for v, c in (("a", 2.0), ("b", 3.0)) for n in (1e8, 3e8, 1e9)]  # fmt: skip
    (tmp_path / "points.json").write_text(json.dumps(points))
    assert (
        main(
            [
                "eval",
                "scaling",
                "--points",
                str(tmp_path / "points.json"),
                "--out",
                str(tmp_path / "figs"),
                "--json",
            ]
        )
        == 0
    )
    out = _json_out(capsys)
    assert out["fits"]["a"]["exponent"] == pytest.approx(-0.05)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "fig5_loss_vs_params.png", "fig6_metrics_vs_params.png", "fig8_loss_vs_fid.png", "fig9_loss_vs_geneval.png",
    ]  # fmt: skip


def test_bad_input_exits_with_code_2_and_names_it(tmp_path, capsys) -> None:
    assert main(["eval", "geneval", "--images", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["shapes", "render", "--metadata", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl line 1: not valid JSON" in capsys.readouterr().err


def test_shapes_make_and_render_lay_objects_out_in_cells(tmp_path, capsys) -> None:
    out = tmp_path / "cells"
    assert main(["shapes", "make", "--out", str(out), "--num", "20", "--size", "32",
                 "--cells", "4"]) == 0  # fmt: skip
    with tarfile.open(out / "00000.tar") as tar:
        records = [
            json.loads(tar.extractfile(m).read())
            for m in tar.getmembers()
            if m.name.endswith(".json")
        ]
    for record in records:
        cells = set()
        for o in record["scene"]["objects"]:
            x, y, half = o["center"][0], o["center"][1], o["size"] / 2
            col, row = int(x * 4), int(y * 4)
            assert int((x - half) * 4) == int((x + half) * 4) == col  # inside its cell
            assert int((y - half) * 4) == int((y + half) * 4) == row
            cells.add((col, row))
        assert len(cells) == len(record["scene"]["objects"])
    prompts = tmp_path / "p.jsonl"
    assert main(["shapes", "prompts", "--out", str(prompts), "--num", "6"]) == 0
    capsys.readouterr()
    assert main(["shapes", "render", "--metadata", str(prompts), "--out", str(tmp_path / "gt"),
                 "--cells", "1"]) == 2  # fmt: skip
    assert "cells must be >= 1 with cells**2 >= max_objects=4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["shapes"],
        ["shapes", "make"],
        ["shapes", "prompts"],
        ["shapes", "render"],
        ["eval"],
        ["eval", "geneval"],
        ["eval", "fid"],
        ["eval", "scaling"],
    ],  # fmt: skip
)
def test_every_command_has_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0 and "usage: fluid-eval" in capsys.readouterr().out


def test_public_names_resolve_and_torch_loads_lazily() -> None:
    import subprocess
    import sys

    import fluid_eval

    assert all(getattr(fluid_eval, name) is not None for name in fluid_eval.__all__)
    assert set(fluid_eval._LAZY_NAMES) <= set(fluid_eval.__all__)
    code = "import sys, fluid_eval; fluid_eval.shapes.sample_training_pair(0); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
