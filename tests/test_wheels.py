"""Each package builds to a wheel that installs alone and works with only its declared dependencies.

The wheel is built in-process by hatchling, installed with uv into a fresh virtual environment
(no access to the workspace's editable installs), and a smoke script runs there. Sibling fluid
packages are available only when declared (fluid-train), from wheels built in the same test.
The already installed torch is reused (pinned through a constraint) so no new torch is fetched,
and torch_xla is never installed: every package must import and work without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizers", "text", "backbone", "heads", "eval", "train")

# What each package must do on its own; every script fails loudly if behaviour is wrong.
SMOKE = {
    "tokenizers": """
        import torch, fluid_tokenizers as ft
        tok = ft.SDVAETokenizer.from_config(ft.shapes_vae_config(), image_size=64).eval()
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        t = tok.encode(x)
        assert t.shape == (2, tok.spec.num_tokens, 16), t.shape
        assert tok.decode(t).shape == x.shape
    """,
    "text": """
        import torch, fluid_text as ftx
        cfg = ftx.AlignerConfig(text_dim=32, width=64, num_heads=4)
        aligner = ftx.TextAligner(cfg)
        assert len(aligner.blocks) == 6
        out = aligner(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))
        assert out.hidden.shape == (2, 5, 64)
    """,
    "backbone": """
        import torch, fluid_backbone as fb
        cfg = fb.TransformerConfig(width=32, depth=2, num_heads=4, grid=(4, 4))
        trunk = fb.MaskedTransformer(cfg)
        h = trunk(torch.randn(2, 16, 32), torch.zeros(2, 16, dtype=torch.bool),
                  torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool))
        assert h.shape == (2, 16, 32)
    """,
    "heads": """
        import torch, fluid_heads as fh
        head = fh.DiffLossHead(token_dim=4, cond_dim=32, sample_steps=10)
        loss = head.loss(torch.randn(8, 4), torch.randn(8, 32))
        loss.backward()
        assert torch.isfinite(loss)
        assert head.sample(torch.randn(3, 32)).shape == (3, 4)
        d = fh.diffusion.create_diffusion(1000, 100)
        assert len(d.timesteps) == 100 and int(d.timesteps[-1]) == 999
    """,
    "eval": """
        import numpy as np, fluid_eval
        from fluid_eval import shapes
        rng = np.random.default_rng(0)
        scene, caption, meta = shapes.sample_training_pair(rng)
        image = shapes.render(scene)
        assert np.asarray(image).shape[-1] == 3 and caption
    """,
    "train": """
        import subprocess, sys, torch
        import fluid_train
        from fluid_train.presets import get_preset
        from fluid_train.model import FluidModel
        cfg = get_preset("debug")
        model = FluidModel(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
        assert "torch_xla" not in sys.modules
        out = subprocess.run([sys.executable, "-m", "fluid_train.cli", "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "train" in out and "generate" in out
    """,
}


def _uv() -> str:
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).exists():
        pytest.fail("uv is not installed in the test environment (declared in pyproject.toml)")
    return uv


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("wheels")
    for name in PACKAGES:
        builder = WheelBuilder(str(ROOT / "packages" / f"fluid-{name}"))
        for _ in builder.build(directory=str(out), versions=["standard"]):
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_wheel_installs_alone_and_works(name: str, wheelhouse: Path, tmp_path: Path) -> None:
    uv = _uv()
    wheels = sorted(wheelhouse.glob(f"fluid_{name}-*.whl"))
    assert len(wheels) == 1, f"expected one wheel for fluid-{name}, found {wheels}"
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={metadata.version('torch').split('+')[0]}\n")
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), "--find-links", str(wheelhouse),
         "--constraint", str(constraints), str(wheels[0])],
        check=True,
        env=env,
    )
    # Only the package's own distribution (and, for fluid-train, its declared siblings) is there.
    listed = subprocess.run(
        [uv, "pip", "list", "--python", str(python)], capture_output=True, text=True, check=True, env=env
    ).stdout
    fluid_dists = {line.split()[0] for line in listed.splitlines() if line.startswith("fluid-")}
    expected = {f"fluid-{p}" for p in PACKAGES} if name == "train" else {f"fluid-{name}"}
    assert fluid_dists == expected
    assert "torch-xla" not in listed and "torch_xla" not in listed
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(SMOKE[name])],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: nothing importable by accident
        env=env,
    )
    assert result.returncode == 0, f"fluid-{name} smoke check failed:\n{result.stderr[-4000:]}"
