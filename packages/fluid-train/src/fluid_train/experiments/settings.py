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
    "StudyRun",
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


def _resized(name: str, width: int, depth: int) -> SizeSpec:
    return SizeSpec(
        name, "shapes-s", {"backbone.width": width, "backbone.depth": depth, "aligner.width": width}
    )


# Continuous parameters: xs 0.17M, s 0.36M, m 0.78M (the demo's shapes-s), l 1.63M. A step of
# 64 at 32 px on 2 idle CPU cores: 28 ms (xs), 72 ms (m), 113 ms (l); the default study trains
# xs, s and m (README).
SIZES: dict[str, SizeSpec] = {
    "xs": _resized("xs", 48, 2),
    "s": _resized("s", 64, 3),
    "m": SizeSpec("m", "shapes-s"),
    "l": SizeSpec("l", "shapes-m"),
    "xl": SizeSpec("xl", "shapes-l"),
}


@dataclass(frozen=True, slots=True)
class StudyRun:
    """One trained model of the study: a variant at a size, with or without the DiffLoss head's
    readout loss (continuous variants only), and the steps it is evaluated at on its way."""

    variant: str
    size: SizeSpec
    readout: bool = True
    milestones: tuple[int, ...] = ()  # evaluation steps before the last one

    @property
    def order(self) -> str:
        return self.variant.split("-")[0]

    @property
    def tokens(self) -> str:
        return self.variant.split("-")[1]

    @property
    def label(self) -> str:
        """The variant as results and figures name it (``random-continuous-noreadout``)."""
        return self.variant if self.readout else f"{self.variant}-noreadout"

    @property
    def name(self) -> str:
        return f"{self.label}-{self.size.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class StudySettings:
    """The study's grid and the recipe every run shares.

    Every variant trains on the demo's world (one object per token cell, 32 px, 4x4 tokens)
    with the demo's recipe (sin-cos positions, batch 64, lr 1e-3, one diffusion sample per
    token): the setting in which a CPU run of minutes learns the world. The DiffLoss readout
    loss exists for the continuous head only, so the variants in ``no_readout`` are also
    trained without it. Inference settings (CFG, temperature) are tuned per run and metric on
    a second prompt set (``tune_*``, drawn with another seed; the grammar is small, so many of
    its prompts also stand in the evaluation set) before the evaluation set is generated.
    """

    world: WorldSettings = field(default_factory=WorldSettings)
    sizes: tuple[SizeSpec, ...] = (SIZES["xs"], SIZES["s"], SIZES["m"])
    variants: tuple[str, ...] = VARIANTS
    no_readout: tuple[str, ...] = ("random-continuous",)
    # The same for every run. 6,000 steps of 64: Fluid m reached GenEval 0.539; the 15 runs took
    # 97 min on 2 cores (README).
    steps: int = 6000
    # Fractions of ``steps`` at which ``milestone_variants`` are also evaluated (Figures 8, 9:
    # validation loss against FID and GenEval across sizes and training steps).
    milestones: tuple[float, ...] = (0.25, 0.5)
    milestone_variants: tuple[str, ...] = ("random-continuous",)
    train: DemoSettings = field(
        default_factory=lambda: DemoSettings(num_prompts=96, samples_per_prompt=4)
    )
    # The tuning prompts (another seed than the evaluation prompts; not disjoint from them:
    # the world has 3 single-object and 6 two-object prompts) and the grid.
    tune_prompts: int = 48
    tune_samples: int = 2
    tune_cfg: tuple[float, ...] = (3.0, 5.0)
    tune_temperature: tuple[float, ...] = (1.0, 1.3)
    fid_resamples: int = 50  # bootstrap redraws for FID's standard error
    val_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("variants", "no_readout", "milestone_variants"):
            chosen = getattr(self, name)
            unknown = sorted(set(chosen) - set(VARIANTS))
            if unknown or (name == "variants" and not chosen):
                raise ValueError(f"{name} must be some of {list(VARIANTS)}; got {list(chosen)}")
        discrete = [v for v in self.no_readout if v.endswith("-discrete")]
        if discrete:
            raise ValueError(f"no_readout: the readout loss is the DiffLoss head's; got {discrete}")
        names = [s.name for s in self.sizes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sizes must be non-empty with unique names; got {names}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if any(not 0 < f < 1 for f in self.milestones):
            raise ValueError(f"milestones must be fractions in (0, 1); got {list(self.milestones)}")
        if not self.tune_cfg or not self.tune_temperature:
            raise ValueError("tune_cfg and tune_temperature need at least one value each")

    def runs(self) -> list[StudyRun]:
        """Every run, smallest size first (the order of the table and of training)."""
        milestones = tuple(sorted({max(1, round(f * self.steps)) for f in self.milestones} - {self.steps}))  # fmt: skip
        out = []
        for size in self.sizes:
            for variant in self.variants:
                steps = milestones if variant in self.milestone_variants else ()
                out.append(StudyRun(variant, size, milestones=steps))
                if variant in self.no_readout:
                    out.append(StudyRun(variant, size, readout=False))
        return out

    def tuning_grid(self) -> list[GenerationConfig]:
        base = self.train.generation
        return [
            dataclasses.replace(base, cfg=cfg, temperature=t)
            for cfg in self.tune_cfg
            for t in self.tune_temperature
        ]

    def run_settings(self, size: SizeSpec, *, readout: bool = True) -> DemoSettings:
        model = {**self.train.model, **size.overrides}
        if not readout:
            model["diffloss.regression_weight"] = 0.0
        return dataclasses.replace(self.train, world=self.world, preset=size.preset, model=model, steps=self.steps)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))
