"""Shared fixtures: the detector, a held-out prompt file and its ground-truth renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluid_eval import ShapesDetector, render_metadata, write_prompts


@pytest.fixture(scope="session")
def detector() -> ShapesDetector:
    return ShapesDetector()


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "evaluation_metadata.jsonl"
    write_prompts(path, 60, seed=7)  # 10 per task
    return path


@pytest.fixture(scope="session")
def ground_truth_dir(tmp_path_factory: pytest.TempPathFactory, prompts_file: Path) -> Path:
    out = tmp_path_factory.mktemp("ground_truth")
    render_metadata(prompts_file, out, n_samples=4, seed=1)
    return out
