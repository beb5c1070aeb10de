"""What the shapes-world experiments depend on: the world, the demo's budgets, the study's grid.

Plain dataclasses, importable without torch (the command line reads its choices and defaults
from here before it imports anything heavy). ``fluid_train.experiments.demo`` and ``.study``
run them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..config import GenerationConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fluid_eval.shapes import LayoutConfig

    from ..config import FluidConfig

__all__ = [
    "BUDGETS",
    "SIZES",
    "TRAIN_SHARE",
    "VARIANTS",
    "DemoSettings",
    "SizeSpec",
    "StudySettings",
    "WorldSettings",
    "demo_settings",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldSettings:
    """The data and frozen parts every model of the shapes world is trained on."""

    num_images: int = 12000  # training scenes (7,000 steps of 64: 37 epochs)
    num_val: int = 512  # held-out scenes (validation loss)
    # 32 px: 4x4 tokens. A CPU run of minutes learns 16 tokens per image far faster than 64
    # (GenEval 0.13 vs 0.04 after the same number of tokens trained on, README); the detector
    # reads 32 px renders as well as 64 px ones.
    image_size: int = 32
    # "cells": every object inside its own token cell, so one object is one token — a run of
    # minutes then draws clean one-colour shapes (GenEval 0.549 at the default budget vs 0.130
    # with objects straddling tokens, README). "free": the shapes world's free placement, as
    # `fluid study` uses.
    layout: Literal["cells", "free"] = "cells"
    shard_size: int = 500
    vae_images: int = 2000  # scenes the tokenizers train on
    vae_steps: int = 1000  # at 32 px: 250/256 held-out scenes reconstructed (300 steps: 24)
    vae_batch_size: int = 16
    vae_lr: float = 4e-3
    vae_kl_weight: float = 1e-4
    vq_steps: int = 300
    spm_vocab_size: int = 256  # at most; the captions' small grammar supports fewer pieces
    text_length: int = 16  # T5 padding length: captions are <= 12 word pieces + </s>

    def __post_init__(self) -> None:
        if self.layout not in ("cells", "free"):
            raise ValueError(f"world layout must be 'cells' or 'free'; got {self.layout!r}")

    def data_key(self) -> dict[str, Any]:
        """What the scenes depend on: the layout by its geometry, not its name, so an entry
        written with other sizes or gaps is never taken for this one."""
        keys = ("num_images", "num_val", "image_size", "shard_size")
        return {**{k: getattr(self, k) for k in keys}, "layout": self.layout_key()}

    def layout_key(self) -> dict[str, Any]:
        return dataclasses.asdict(self.layout_config())

    def layout_config(self) -> LayoutConfig:
        """How the world's scenes are laid out (``cells``: the token grid of this image size)."""
        from fluid_eval.shapes import LayoutConfig

        from ..presets import token_layout

        if self.layout == "free":
            return LayoutConfig()
        return LayoutConfig.in_cells(token_layout(self.image_size)["backbone.grid"][0])


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSettings:
    """Everything a demo run depends on (besides the seed); written into the report."""

    world: WorldSettings = field(default_factory=WorldSettings)
    # At a fixed CPU budget the smallest shapes model, trained for more steps, does best:
    # shapes-s for 5,000 steps beat shapes-m for 3,000 in the same time (README).
    preset: str = "shapes-s"
    # get_preset overrides. One diffusion sample per token and step (the paper: 4) makes a
    # step ~1.8x cheaper; in a run of minutes more steps are worth more than more noise levels.
    # The auxiliary readout loss (DiffLossHead's regression_weight; the paper has none) lets
    # the trunk learn from its context in minutes: without it a linear probe of the trunk
    # finds almost nothing the visible half of an image says about the other half.
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "diffloss.diffusion_batch_mul": 1,
            "diffloss.regression_weight": 1.0,
        }
    )
    # ~10 minutes at the 737 images/s measured with both cores (a host's load moved it
    # between 737 and 910), leaving the 15-minute budget room for the fixed stages. With
    # ``minutes`` set, this is the most the run trains: on a slower machine it trains for the
    # time the budget leaves (``TrainConfig.time_limit_s``) and the report says how far it got.
    steps: int = 7000
    # The wall-clock budget of the whole run (None: no limit, ``steps`` are trained), and the
    # seconds of it kept for what follows training (export, generation, evaluation: ~20 s
    # measured on 2 cores, kept twice over).
    minutes: float | None = None
    after_train_s: float = 45.0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    # The paper's 0.9999 averages over ~10K steps; a short run that kept it would export
    # mostly its initial weights (0.9999**2000 = 0.82). None: a half-life of steps / 10, so
    # the initial weights keep 0.5**10 of the average.
    ema_decay: float | None = None
    num_prompts: int = 96  # balanced over the six GenEval families
    samples_per_prompt: int = 4
    # Sampling: 16 random-order steps, one token per step on the 4x4 grid. Measured on the
    # default model (192 images, +-0.035): temperature 1.2 with CFG 4 scored 0.62, the paper's
    # 1.0 with CFG 3 0.58, 1.5 0.56 (a short run under-disperses its head).
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(num_steps=16, cfg=4.0, temperature=1.2)
    )
    gen_batch_size: int = 64

    def model_overrides(self, **extra: Any) -> dict[str, Any]:
        """``get_preset`` overrides: the world's token layout, then ``model``, then ``extra``."""
        from ..presets import token_layout

        return {**token_layout(self.world.image_size), **self.model, **extra}

    def model_config(self, **extra: Any) -> FluidConfig:
        """The model this run trains (``extra``: e.g. ``tokens=``, ``order=`` of a variant)."""
        from ..presets import get_preset

        return get_preset(self.preset, **self.model_overrides(**extra))

    @property
    def ema(self) -> float:
        """The EMA decay this run uses (``ema_decay``, or a half-life of a tenth of the steps)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 0.5 ** (10.0 / max(self.steps, 10))

    def to_dict(self) -> dict[str, Any]:
        """The settings as the report records them: ``model`` with the world's token layout."""
        return {**dataclasses.asdict(self), "model": self.model_overrides(), "ema_decay": self.ema}


TRAIN_SHARE = 0.8  # of a budget's minutes, spent training

# Measured on the 2-core CPU machine this project is developed on (see the README).
BUDGETS: dict[str, DemoSettings] = {
    "small": DemoSettings(
        world=WorldSettings(num_images=3000, vae_steps=600), steps=2500, minutes=5.0
    ),
    "default": DemoSettings(minutes=15.0),
    "large": DemoSettings(steps=18000, minutes=30.0),
}


def demo_settings(budget: str | float = "default") -> DemoSettings:
    """The settings of a named budget, or of ``budget`` minutes (the largest named budget that
    fits, with its training steps scaled to the extra minutes)."""
    if isinstance(budget, str) and budget in BUDGETS:
        return BUDGETS[budget]
    try:
        minutes = float(budget)
    except (TypeError, ValueError):
        raise ValueError(
            f"budget must be one of {sorted(BUDGETS)} or a number of minutes; got {budget!r}"
        ) from None
    smallest = min(b.minutes for b in BUDGETS.values())
    if not minutes >= smallest / 2:
        raise ValueError(f"budget must be at least {smallest / 2:g} minutes; got {minutes:g}")
    base = max(
        (b for b in BUDGETS.values() if b.minutes <= minutes),
        key=lambda b: b.minutes,
        default=min(BUDGETS.values(), key=lambda b: b.minutes),
    )
    # Training takes about four fifths of a budget; the other stages are fixed costs.
    train_minutes = base.minutes * TRAIN_SHARE + (minutes - base.minutes)
    steps = max(10, round(base.steps * train_minutes / (base.minutes * TRAIN_SHARE)))
    return dataclasses.replace(base, steps=steps, minutes=minutes)


# ---------------------------------------------------------------------------------- study

VARIANTS: tuple[str, ...] = (
    "raster-discrete",
    "random-discrete",
    "raster-continuous",
    "random-continuous",
)


@dataclass(frozen=True, slots=True)
class SizeSpec:
    """One model size of the study: a short name, the preset, and ``get_preset`` overrides that
    resize it (e.g. ``{"backbone.width": 48, "aligner.width": 48}``) without a new preset."""

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, SizeSpec] = {
    "s": SizeSpec("s", "shapes-s"),
    "m": SizeSpec("m", "shapes-m"),
    "l": SizeSpec("l", "shapes-l"),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class StudySettings:
    """The study's grid and the recipe every run shares."""

    # More scenes than the demo's default: twelve runs share the cost of building the world.
    # 64 px (8x8 tokens) with the 300-step VAE: the world the README's study table was measured
    # on, pinned here so it stays reproducible whatever the demo's world becomes.
    world: WorldSettings = field(
        default_factory=lambda: WorldSettings(
            num_images=8000, image_size=64, layout="free", vae_steps=300
        )
    )
    sizes: tuple[SizeSpec, ...] = tuple(SIZES.values())
    variants: tuple[str, ...] = VARIANTS
    steps: int = 300  # the same for every run
    train: DemoSettings = field(
        # The paper's objective and MAR's initialisation for every variant: no auxiliary
        # readout loss (the study compares the variants' own losses) and std-0.02 positions
        # (what the README's study table was measured with), unlike the demo's model.
        default_factory=lambda: DemoSettings(
            batch_size=32,  # the study table's batch, pinned like its world
            # and its sampling: MAR's temperature 1 with CFG 3
            generation=GenerationConfig(num_steps=16, cfg=3.0, temperature=1.0),
            num_prompts=48,
            samples_per_prompt=2,
            model={
                "diffloss.diffusion_batch_mul": 1,
                "diffloss.regression_weight": 0.0,
                "backbone.pos_init": "normal",
            },
        )
    )
    val_batch_size: int = 64

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(
                f"variants must be some of {list(VARIANTS)}; got {list(self.variants)}"
            )
        names = [s.name for s in self.sizes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sizes must be non-empty with unique names; got {names}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")

    def run_settings(self, size: SizeSpec) -> DemoSettings:
        return dataclasses.replace(
            self.train,
            world=self.world,
            preset=size.preset,
            model={**self.train.model, **size.overrides},
            steps=self.steps,
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))
