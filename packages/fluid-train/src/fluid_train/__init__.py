"""fluid_train: the full Fluid system — four variants, presets, generation, pipeline, trainer.

from fluid_train import FluidPipeline
pipe = FluidPipeline.from_pretrained("runs/shapes-s")   # a pipeline or run directory
images = pipe(["a photo of a red circle"], seed=0)    # list[PIL.Image]

The package imports its submodules on first use: ``import fluid_train`` (and the ``fluid``
command line's parsing) does not import torch, transformers or diffusers.
"""

from __future__ import annotations

from .__about__ import __version__
from ._lazy import lazy_attributes

# name -> submodule: loaded on first access (PEP 562), so importing the package is cheap.
_LAZY = {
    "data": (
        "TrainLoader",
    ),
    "flops": (
        "FlopsBreakdown",
        "model_summary",
        "sample_flops",
        "train_flops",
        "training_compute",
    ),
    "generation": (
        "generate",
    ),
    "masking": (
        "reveal_schedule",
        "training_mask",
    ),
    "config": (
        "DiffLossConfig",
        "FluidConfig",
        "GenerationConfig",
        "TrainConfig",
    ),
    "model": (
        "FluidModel",
        "LossOutput",
        "ParamCounts",
        "TrainBatch",
    ),
    "pipeline": (
        "FluidPipeline",
        "PipelineSampler",
        "contact_sheet",
        "find_pipeline",
        "to_pil",
    ),
    "preprocess": (
        "preprocess",
    ),
    "presets": (
        "PAPER_SIZES",
        "get_preset",
        "list_presets",
    ),
    "trainer": (
        "NonFiniteLossError",
        "Trainer",
        "TrainResult",
        "train",
    ),
}
__getattr__, __dir__, __all__ = lazy_attributes(__name__, _LAZY)
__all__ = ["__version__", *__all__]
