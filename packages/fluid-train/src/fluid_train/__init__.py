"""fluid_train: the full Fluid system — four variants, presets, generation, pipeline, trainer.

from fluid_train import FluidPipeline
pipe = FluidPipeline.from_pretrained("runs/shapes-s")   # a pipeline or run directory
images = pipe(["a photo of a red circle"], seed=0)    # list[PIL.Image]
"""

from __future__ import annotations

from .__about__ import __version__

# Training: data, recipe, backends, checkpoints.
from .data import TrainLoader

# Model, presets, generation and the pipeline.
from .flops import FlopsBreakdown, model_summary, sample_flops, train_flops, training_compute
from .generation import generate
from .masking import reveal_schedule, training_mask
from .model import (
    DiffLossConfig,
    FluidConfig,
    FluidModel,
    GenerationConfig,
    LossOutput,
    ParamCounts,
    TrainBatch,
)
from .pipeline import FluidPipeline, PipelineSampler, contact_sheet, find_pipeline, to_pil
from .preprocess import preprocess
from .presets import PAPER_SIZES, get_preset, list_presets
from .recipe import TrainConfig
from .trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = [
    "PAPER_SIZES",
    "DiffLossConfig",
    "FlopsBreakdown",
    "FluidConfig",
    "FluidModel",
    "FluidPipeline",
    "GenerationConfig",
    "LossOutput",
    "ParamCounts",
    "PipelineSampler",
    "TrainBatch",
    "__version__",
    "contact_sheet",
    "find_pipeline",
    "generate",
    "get_preset",
    "list_presets",
    "model_summary",
    "reveal_schedule",
    "sample_flops",
    "to_pil",
    "train_flops",
    "training_compute",
    "training_mask",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainLoader",
    "TrainResult",
    "Trainer",
    "preprocess",
    "train",
]
