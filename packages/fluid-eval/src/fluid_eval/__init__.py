"""fluid-eval: validation loss, FID, GenEval, CLIP score, scaling fits and the shapes world.

Imports no other fluid package: models are reached through small protocols (a ``Generator``
has ``generate(prompts)``, a ``Detector`` has ``detect(image)``, a loss is a callable). Every
submodule loads on first use (the torch-based ones — fid, loss, clip_score — only when named),
so the command line's parsing imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .__about__ import __version__

if TYPE_CHECKING:
    from .clip_score import ClipBundle, ClipScoreResult, load_open_clip
    from .detector import ShapesDetector, ShapesDetectorConfig
    from .fid import CocoPair, FIDResult, ShapesFeatureNet, compute_fid, make_fid, sample_coco_pairs
    from .geneval import (
        TASKS,
        Detection,
        Detector,
        Generator,
        GenEvalConfig,
        GenEvalReport,
        ImageResult,
        evaluate,
        evaluate_image,
        load_metadata,
        relative_position,
        score_folder,
        summarize,
        write_generations,
        write_results,
        write_sample_folder,
    )
    from .loss import ValidationLoss, validation_loss
    from .scaling import (
        Correlation,
        PowerLawFit,
        ScalingPoint,
        ScalingReport,
        fit_power_law,
        pearson,
        plot_geneval_families,
        scaling_report,
    )
    from .shapes import (
        COLORS,
        PALETTE,
        SHAPES,
        LayoutConfig,
        Scene,
        ShapeObject,
        TrainingPair,
        evaluation_metadata,
        render,
        render_image,
        render_metadata,
        sample_training_pair,
        scene_from_prompt,
        write_prompts,
        write_shards,
    )

_LAZY = {
    "detector": (
        "ShapesDetector",
        "ShapesDetectorConfig",
    ),
    "geneval": (
        "TASKS",
        "Detection",
        "Detector",
        "Generator",
        "GenEvalConfig",
        "GenEvalReport",
        "ImageResult",
        "evaluate",
        "evaluate_image",
        "load_metadata",
        "relative_position",
        "score_folder",
        "summarize",
        "write_generations",
        "write_results",
        "write_sample_folder",
    ),
    "shapes": (
        "COLORS",
        "PALETTE",
        "SHAPES",
        "LayoutConfig",
        "Scene",
        "ShapeObject",
        "TrainingPair",
        "evaluation_metadata",
        "render",
        "render_image",
        "render_metadata",
        "sample_training_pair",
        "scene_from_prompt",
        "write_prompts",
        "write_shards",
    ),
    # The function ``clip_score`` stays in its module: the module's name would shadow it here.
    "clip_score": ("ClipBundle", "ClipScoreResult", "load_open_clip"),
    "fid": (
        "CocoPair",
        "FIDResult",
        "ShapesFeatureNet",
        "compute_fid",
        "make_fid",
        "sample_coco_pairs",
    ),
    "loss": ("ValidationLoss", "validation_loss"),
    "scaling": (
        "Correlation",
        "PowerLawFit",
        "ScalingPoint",
        "ScalingReport",
        "fit_power_law",
        "pearson",
        "plot_geneval_families",
        "scaling_report",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


# Submodules reachable as attributes (``fluid_eval.shapes``), loaded on first access too.
_SUBMODULES = ("clip_score", "detector", "fid", "geneval", "loss", "scaling", "shapes")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'fluid_eval' has no attribute {name!r}")


__all__ = [
    "COLORS",
    "PALETTE",
    "SHAPES",
    "TASKS",
    "Detection",
    "Detector",
    "GenEvalConfig",
    "GenEvalReport",
    "Generator",
    "ImageResult",
    "LayoutConfig",
    "Scene",
    "ShapeObject",
    "ShapesDetector",
    "ShapesDetectorConfig",
    "TrainingPair",
    "__version__",
    "evaluate",
    "evaluate_image",
    "evaluation_metadata",
    "load_metadata",
    "relative_position",
    "render",
    "render_image",
    "render_metadata",
    "sample_training_pair",
    "scene_from_prompt",
    "score_folder",
    "summarize",
    "write_generations",
    "write_prompts",
    "write_results",
    "write_sample_folder",
    "write_shards",
    # loaded on first use
    "ClipBundle",
    "ClipScoreResult",
    "CocoPair",
    "Correlation",
    "FIDResult",
    "PowerLawFit",
    "ScalingPoint",
    "ScalingReport",
    "ShapesFeatureNet",
    "ValidationLoss",
    "compute_fid",
    "fit_power_law",
    "load_open_clip",
    "make_fid",
    "pearson",
    "plot_geneval_families",
    "sample_coco_pairs",
    "scaling_report",
    "validation_loss",
]
