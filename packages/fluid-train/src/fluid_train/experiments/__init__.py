"""The shapes-world experiments: ``fluid demo`` (one model, end to end, in minutes) and ``fluid
study`` (the paper's four variants over model sizes, in miniature).

They use fluid-train's public API only (presets, the trainer, the pipeline, preprocessing):

- ``settings``   the world, the demo's budgets and the study's grid (dataclasses, no torch)
- ``cache``      the stage cache (entries keyed by their settings, built atomically)
- ``world``      stages 1-4: data, tokenizers, text, encoded shards
- ``evaluation`` GenEval, FID and chance levels of a trained pipeline; plots
- ``demo``       ``run_demo``; ``study``: ``run_study``
- ``findings``   the paper's four findings tested on a study's results, with verdicts
- ``workers``    the locks by which several study workers share one directory
- ``machine``    process settings (threads) for the command line's entry
"""

from __future__ import annotations

from .._lazy import lazy_attributes
from . import settings

_LAZY = {
    "settings": tuple(settings.__all__),  # torch-free: read at once
    "cache": ("CacheEntry", "StageCache", "Stages"),
    "world": ("World", "build_world"),
    "evaluation": ("PromptSet", "chance_levels", "evaluate_pipeline", "plot_loss", "read_metrics"),
    "findings": ("findings", "format_findings"),
    "demo": ("DemoReport", "run_demo", "train_model"),
    "study": ("format_table", "run_study", "steps_for_budget"),
    "machine": ("auto_threads", "configure_cpu"),
}
__getattr__, __dir__, __all__ = lazy_attributes(__name__, _LAZY)
