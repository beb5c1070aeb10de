"""Scaling laws: power-law fits of validation loss against model size, correlations of loss
with FID and GenEval, and PNG plots in the style of the paper's Figures 5, 6, 8 and 9.

A power law ``loss = coefficient * params ** exponent`` is a straight line in log-log space;
the fit is ordinary least squares of ``log loss`` on ``log params``; the exponent's standard
error and two-sided p-value (against no slope, Student's t with n - 2 degrees of freedom) are
the slope's, as ``scipy.stats.linregress`` gives them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats

Metric = Literal["fid", "geneval"]
METRIC_LABELS = {"fid": "FID (lower is better)", "geneval": "GenEval overall (higher is better)"}


@dataclass(frozen=True, slots=True)
class ScalingPoint:
    """One trained model: its variant (e.g. 'random-continuous'), trainable parameters,
    validation loss and, where measured, FID and GenEval overall score."""

    variant: str
    params: float
    loss: float
    fid: float | None = None
    geneval: float | None = None


@dataclass(frozen=True, slots=True)
class PowerLawFit:
    exponent: float  # slope in log-log space (negative when loss falls with size)
    coefficient: float  # loss at params = 1
    exponent_stderr: float  # nan with two points
    p_value: float  # two-sided, against exponent 0 (t with n - 2 dof); nan with two points
    r_squared: float
    num_points: int

    def predict(self, params: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(params, dtype=np.float64) ** self.exponent


@dataclass(frozen=True, slots=True)
class Correlation:
    r: float  # Pearson correlation coefficient
    p_value: float  # two-sided, against no correlation
    num_points: int


def fit_power_law(params: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of ``log loss = log coefficient + exponent * log params``."""
    x, y = np.asarray(params, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"params and losses must be 1-D of equal length; got {x.shape} and {y.shape}"
        )
    if len(x) < 2 or len(np.unique(x)) < 2:
        raise ValueError(
            f"a power-law fit needs at least two distinct model sizes; got {x.tolist()}"
        )
    if np.any(x <= 0) or np.any(y <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("params and losses must be finite and > 0 for a log-log fit")
    lx, ly = np.log(x), np.log(y)
    xc = lx - lx.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (ly - ly.mean()) / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    residuals = ly - (intercept + slope * lx)
    ss_res, ss_tot = float(residuals @ residuals), float(((ly - ly.mean()) ** 2).sum())
    n = len(x)
    stderr = p_value = float("nan")
    if n > 2:
        stderr = math.sqrt(ss_res / (n - 2) / sxx)
        if stderr > 0:
            p_value = float(2 * stats.t.sf(abs(slope) / stderr, n - 2))
        else:  # an exact line: any slope is certain, a flat one is no slope
            p_value = 0.0 if slope != 0 else 1.0
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(slope, math.exp(intercept), stderr, p_value, r2, n)


def pearson(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson's r with its two-sided p-value (scipy)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 3:
        raise ValueError(
            f"Pearson correlation needs two 1-D series of >= 3 equal-length values; got {a.shape}, {b.shape}"
        )
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("Pearson correlation is undefined when a series is constant")
    result = stats.pearsonr(a, b)
    return Correlation(float(result.statistic), float(result.pvalue), len(a))


def load_points(path: str | os.PathLike[str]) -> list[ScalingPoint]:
    """Scaling points from a JSON list or a JSONL file of {variant, params, loss, fid?, geneval?}."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"scaling points file {file} does not exist")
    text = file.read_text()
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        return [
            ScalingPoint(
                variant=str(r["variant"]), params=float(r["params"]), loss=float(r["loss"]),
                fid=None if r.get("fid") is None else float(r["fid"]),
                geneval=None if r.get("geneval") is None else float(r["geneval"]),
            )
            for r in rows
        ]  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{file}: expected a JSON list (or JSONL) of objects with 'variant', 'params', 'loss' "
            f"and optional 'fid', 'geneval' ({error!r})"
        ) from error


def _correlatable(points: Sequence[ScalingPoint], metric: Metric) -> bool:
    """Pearson's r exists: >= 3 points and neither series constant."""
    if len(points) < 3:
        return False
    return np.ptp([p.loss for p in points]) > 0 and np.ptp([getattr(p, metric) for p in points]) > 0


def _by_variant(points: Iterable[ScalingPoint]) -> dict[str, list[ScalingPoint]]:
    groups: dict[str, list[ScalingPoint]] = {}
    for p in sorted(points, key=lambda p: p.params):
        groups.setdefault(p.variant, []).append(p)
    if not groups:
        raise ValueError("no scaling points given")
    return groups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    _pyplot().close(fig)
    return out


def _log_axes(ax: Any, *, y: bool) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # crowded 2x10^8 3x10^8 ... labels otherwise
    if y:
        # Losses often span less than a decade: label minor ticks too, as plain numbers.
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def plot_loss_vs_params(points: Iterable[ScalingPoint], path: str | os.PathLike[str]) -> Path:
    """Figure 5: validation loss against parameters, log-log, one panel per variant (the
    losses of discrete and continuous tokens are on different scales), with power-law fits."""
    plt = _pyplot()
    groups = _by_variant(points)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.4), squeeze=False)
    for ax, (variant, group), color in zip(
        axes[0], groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False
    ):
        n, loss = [p.params for p in group], [p.loss for p in group]
        ax.plot(n, loss, "o", color=color)
        if len(set(n)) >= 2:
            fit = fit_power_law(n, loss)
            grid = np.geomspace(min(n), max(n), 50)
            label = f"L = {fit.coefficient:.3g} N^{fit.exponent:.4f}"
            ax.plot(grid, fit.predict(grid), "--", color=color, label=label)
            ax.legend(fontsize=7)
        _log_axes(ax, y=True)
        ax.set(xlabel="Parameters N", ylabel="Validation loss L", title=variant)
        ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_metrics_vs_params(points: Iterable[ScalingPoint], path: str | os.PathLike[str]) -> Path:
    """Figure 6: FID and GenEval against parameters per variant (log x), one panel each."""
    plt = _pyplot()
    groups = _by_variant(points)
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for ax, metric in zip(axes, ("fid", "geneval"), strict=True):
        for variant, group in groups.items():
            pts = [(p.params, getattr(p, metric)) for p in group if getattr(p, metric) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=variant)
        _log_axes(ax, y=False)
        ax.set(xlabel="Parameters", ylabel=METRIC_LABELS[metric])
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
    return _save(fig, path)


def plot_loss_vs_metric(
    points: Iterable[ScalingPoint], metric: Metric, path: str | os.PathLike[str]
) -> Path:
    """Figures 8 (FID) and 9 (GenEval): the metric against validation loss, per variant, with
    a least-squares line and Pearson's r over all points."""
    plt = _pyplot()
    pts = [p for p in points if getattr(p, metric) is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for variant, group in _by_variant(pts).items():
        ax.plot([p.loss for p in group], [getattr(p, metric) for p in group], "o", label=variant)
    title = f"{metric.upper() if metric == 'fid' else 'GenEval'} vs validation loss"
    if _correlatable(pts, metric):
        corr = pearson([p.loss for p in pts], [getattr(p, metric) for p in pts])
        slope, intercept = np.polyfit([p.loss for p in pts], [getattr(p, metric) for p in pts], 1)
        grid = np.linspace(min(p.loss for p in pts), max(p.loss for p in pts), 50)
        ax.plot(grid, slope * grid + intercept, "k--", linewidth=1)
        title += f" (Pearson r = {corr.r:.3f})"
    ax.set(xlabel="Validation loss", ylabel=METRIC_LABELS[metric], title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_geneval_families(
    scores: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "GenEval per family",
) -> Path:
    """Figure 13: GenEval per task family, one bar per variant (``scores``: variant -> family ->
    score), with ``errors`` (the same layout: standard errors) as error bars."""
    plt = _pyplot()
    if not scores:
        raise ValueError("no GenEval scores given")
    families = list(dict.fromkeys(f for tasks in scores.values() for f in tasks))
    width = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(families)), 3.8))
    x = np.arange(len(families))
    for i, (variant, tasks) in enumerate(scores.items()):
        heights = [tasks.get(f, np.nan) for f in families]
        err = None
        if errors is not None and variant in errors:
            err = [errors[variant].get(f, 0.0) for f in families]
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, heights, width, yerr=err, capsize=2,
               label=variant)  # fmt: skip
    ax.set_xticks(x, [f.replace("_", " ") for f in families], fontsize=8)
    ax.set(ylabel="GenEval score", ylim=(0, 1), title=title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


@dataclass(frozen=True, slots=True)
class ScalingReport:
    fits: dict[str, PowerLawFit]  # variant -> loss-vs-params fit (variants with >= 2 sizes)
    correlations: dict[str, Correlation]  # 'fid' / 'geneval' -> loss correlation over all points
    plots: dict[str, Path]  # figure name -> PNG

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": {k: asdict(v) for k, v in self.fits.items()},
            "correlations": {k: asdict(v) for k, v in self.correlations.items()},
            "plots": {k: str(v) for k, v in self.plots.items()},
        }


def scaling_report(
    points: Sequence[ScalingPoint],
    out_dir: str | os.PathLike[str],
    *,
    along: Sequence[ScalingPoint] | None = None,
) -> ScalingReport:
    """Fits, correlations and the four figures (``fig5_loss_vs_params.png``,
    ``fig6_metrics_vs_params.png``, ``fig8_loss_vs_fid.png``, ``fig9_loss_vs_geneval.png``;
    a figure is left out when its metric was not measured). Fits and Figures 5, 6 use
    ``points`` (one per trained model); the correlations and Figures 8, 9 use ``along`` when
    given (e.g. checkpoints along training, as the paper's Figures 8 and 9), else ``points``."""
    out = Path(out_dir)
    correlated = points if along is None else along
    fits = {
        variant: fit_power_law([p.params for p in group], [p.loss for p in group])
        for variant, group in _by_variant(points).items()
        if len({p.params for p in group}) >= 2
    }
    correlations: dict[str, Correlation] = {}
    plots = {"fig5": plot_loss_vs_params(points, out / "fig5_loss_vs_params.png")}
    if any(p.fid is not None or p.geneval is not None for p in points):
        plots["fig6"] = plot_metrics_vs_params(points, out / "fig6_metrics_vs_params.png")
    for metric, fig in (("fid", "fig8"), ("geneval", "fig9")):
        pts = [p for p in correlated if getattr(p, metric) is not None]
        if not pts:
            continue
        plots[fig] = plot_loss_vs_metric(pts, metric, out / f"{fig}_loss_vs_{metric}.png")
        if _correlatable(pts, metric):
            correlations[metric] = pearson([p.loss for p in pts], [getattr(p, metric) for p in pts])
    return ScalingReport(fits, correlations, plots)
