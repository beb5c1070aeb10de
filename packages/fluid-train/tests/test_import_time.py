"""Import time is part of the interface (STYLE.md 12): the command line parses its arguments
before it imports torch, and the component packages import transformers/diffusers only when the
caller uses a class that needs them. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "diffusers", "torch_xla", "numpy")


def _modules_after(code: str) -> set[str]:
    """The heavy modules loaded after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_parses_without_importing_torch():
    loaded = _modules_after(
        "import fluid_train.cli as cli\n"
        "parser = cli.build_parser()\n"
        "for argv in (['train', '--steps', '3', '--out', 'x'], ['generate', '--model', 'm', '--prompt', 'a', '--out', 'o'],"
        " ['demo'], ['study', '--steps', '2'], ['info', 'debug']):\n"
        "    parser.parse_args(argv)\n"
    )
    assert loaded == set()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--no-such-flag"]])
def test_help_and_argument_errors_answer_before_torch(argv):
    loaded = _modules_after(
        "import contextlib, io\n"
        "from fluid_train.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass\n"
    )
    assert loaded == set()


def test_info_sizes_a_model_without_transformers():
    """`fluid info` counts on the meta device (torch) but reads the frozen T5's size from its
    record: the 4.7B T5-XXL count needs no transformers."""
    loaded = _modules_after(
        "import contextlib, io\n"
        "from fluid_train.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['info', 'fluid-3.1b']) == 0\n"
        "assert '4,762,310,656' in out.getvalue()\n"
    )
    assert "transformers" not in loaded and "diffusers" not in loaded and "torch_xla" not in loaded


def test_packages_import_without_transformers_or_diffusers():
    loaded = _modules_after(
        "import fluid_heads, fluid_backbone, fluid_tokenizers, fluid_text, fluid_eval, fluid_train\n"
        "from fluid_tokenizers import SDVAETokenizer, VQTokenizer, TokenizerSpec\n"
        "from fluid_text import TextAligner, AlignerConfig\n"
        "from fluid_train import FluidModel, get_preset\n"
    )
    assert "transformers" not in loaded and "diffusers" not in loaded
    assert "torch_xla" not in loaded


def test_lazy_names_resolve_to_their_modules():
    import fluid_eval
    import fluid_text
    import fluid_tokenizers
    import fluid_train

    for package in (fluid_train, fluid_text, fluid_tokenizers, fluid_eval):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    with pytest.raises(AttributeError, match="no_such_name"):
        fluid_train.no_such_name  # noqa: B018


def test_configs_and_presets_need_no_torch():
    loaded = _modules_after(
        "from fluid_train.config import TrainConfig\n"
        "config = TrainConfig.from_dict({'out': 'r', 'preset': 'shapes-s', 'model': {'backbone.depth': 2}})\n"
        "assert config.model.backbone.depth == 2\n"
    )
    assert loaded == set()


def test_train_flags_are_the_config_fields_with_their_defaults():
    import argparse
    import dataclasses

    from fluid_train.cli import build_parser
    from fluid_train.config import OptimizerConfig, TrainConfig

    parser = build_parser()
    train = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]
    flags = {a.dest: a for a in train._actions}
    documented = [f.name for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]
    assert set(documented) <= set(flags)  # every documented field has its flag
    assert flags["optim.lr"].option_strings == ["--lr"]
    assert f"(default: {OptimizerConfig().lr})" in flags["optim.lr"].help
    assert flags["precision"].choices == ("auto", "fp32", "bf16")  # from the Literal
    assert flags["progress"].option_strings == ["--no-progress"]
