"""The paper's four findings, tested on a study's results: each with the paper's claim, the
miniature's numbers, their noise and a verdict (reproduced / partly / not reproduced / not
measurable).

A difference of two means counts as beyond noise when it exceeds twice its standard error
(the errors of the two sides combined in quadrature): validation loss from the held-out
batches, FID from the bootstrap over images, GenEval from the binomial error of each family's
images. A fit over a few points (the power law's slope, a correlation) counts when its
two-sided p-value is below ``ALPHA``: with three sizes the slope's t has one degree of freedom,
where twice the standard error would be a 70% interval, not a 95% one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["findings", "format_findings"]

Z = 2.0  # standard errors a difference of two means must exceed
ALPHA = 0.05  # the p-value a fitted slope or correlation must fall below

PAPER = {
    "a": "Validation loss falls as a power law of model size for all four variants: a straight "
    "line in log-log (Figure 5).",
    "b": "Continuous tokens reach a lower FID than discrete ones at every size, and the gap "
    "widens with size (Figure 6).",
    "c": "Random order beats raster order on GenEval for both token kinds, the most on "
    "position and counting (Figures 6, 13).",
    "d": "For Fluid, validation loss correlates strongly with FID and GenEval across sizes and "
    "training steps (Figures 8, 9).",
}


def _quad(*errors: float | None) -> float:
    return math.sqrt(sum((e or 0.0) ** 2 for e in errors))


def _verdict(conditions: Sequence[bool], *, partial: bool | None = None) -> str:
    """Reproduced when every condition of a finding holds; partly when some of its evidence
    does (``partial``, default: any condition); not measurable without conditions."""
    if not conditions:
        return "not measurable"
    if all(conditions):
        return "reproduced"
    return (
        "partly reproduced"
        if (any(conditions) if partial is None else partial)
        else "not reproduced"
    )


def _by(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["variant"], r["size"]): r for r in results}


def _sizes(results: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["size"] for r in results))


def _power_law(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from fluid_eval.scaling import fit_power_law

    lines, oks, falling = [], [], []
    for variant in dict.fromkeys(r["variant"] for r in results):
        group = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["params"])
        if len(group) < 2:
            continue
        fit = fit_power_law([r["params"] for r in group], [r["val_loss"] for r in group])
        # Each step to a larger size, against the two means' own standard errors. The models
        # are scored on the same held-out batches with the same noise, so this unpaired test
        # is conservative: it cannot resolve differences smaller than the batches' spread.
        falls = [
            a["val_loss"] - b["val_loss"] > Z * _quad(a["val_loss_stderr"], b["val_loss_stderr"])
            for a, b in zip(group, group[1:], strict=False)
        ]
        lower = [b["val_loss"] < a["val_loss"] for a, b in zip(group, group[1:], strict=False)]
        # The finding is the fit: a negative exponent beyond noise (two points: no test), a
        # straight line. Falling at every step without that is evidence, not the finding.
        steep = fit.exponent < 0 and (fit.num_points < 3 or fit.p_value < ALPHA)
        falling.append(all(lower) and fit.exponent < 0)
        ok = falling[-1] and steep and (fit.num_points < 3 or fit.r_squared >= 0.9)
        oks.append(ok)
        se = "" if math.isnan(fit.exponent_stderr) else f" ± {fit.exponent_stderr:.4f}"
        p = "" if math.isnan(fit.p_value) else f" (p {fit.p_value:.2g})"
        lines.append(
            f"{variant}: b = {fit.exponent:.4f}{se}{p}, R² {fit.r_squared:.3f}; "
            f"{sum(lower)}/{len(lower)} size steps lower ({sum(falls)} beyond the unpaired noise)"
        )
    return {
        "miniature": lines,
        "verdict": _verdict(oks, partial=any(falling)),
        "passed": f"{sum(oks)}/{len(oks)} variants fit beyond noise (p < {ALPHA}); the loss "
        f"falls at every size step for {sum(falling)}/{len(falling)}",
    }


def _continuous_vs_discrete(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from fluid_eval.scaling import fit_power_law

    by = _by(results)
    lines, wins, total, slopes_better, slopes_total = [], 0, 0, 0, 0
    for order in ("random", "raster"):
        cont, disc = f"{order}-continuous", f"{order}-discrete"
        pairs = [(by[(cont, s)], by[(disc, s)]) for s in _sizes(results) if (cont, s) in by and (disc, s) in by]  # fmt: skip
        if not pairs:
            continue
        cells = []
        for c, d in pairs:
            diff, se = c["fid"] - d["fid"], _quad(c["fid_stderr"], d["fid_stderr"])
            win = diff < -Z * se
            wins, total = wins + win, total + 1
            cells.append(f"{c['size']} {c['fid']:.2f} vs {d['fid']:.2f} (Δ {diff:+.2f} ± {se:.2f})")
        line = f"{order}: FID continuous vs discrete " + "; ".join(cells)
        if len(pairs) >= 2:
            fc = fit_power_law([c["params"] for c, _ in pairs], [c["fid"] for c, _ in pairs])
            fd = fit_power_law([d["params"] for _, d in pairs], [d["fid"] for _, d in pairs])
            slopes_total += 1
            slopes_better += fc.exponent < fd.exponent
            line += (
                f"; FID ∝ N^b: b {fc.exponent:+.3f} (continuous) vs {fd.exponent:+.3f} (discrete)"
            )
        lines.append(line)
    conditions = [wins == total, slopes_total > 0 and slopes_better == slopes_total]
    return {
        "miniature": lines,
        "verdict": _verdict(conditions if total else [], partial=wins > 0 or slopes_better > 0),
        "passed": f"continuous lower at {wins}/{total} (order, size) pairs; scales better for "
        f"{slopes_better}/{slopes_total} orders",
    }


def _random_vs_raster(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by = _by(results)
    lines, wins, total = [], 0, 0
    gains: dict[str, list[float]] = {}
    for tokens in ("continuous", "discrete"):
        rnd, ras = f"random-{tokens}", f"raster-{tokens}"
        cells = []
        for s in _sizes(results):
            if (rnd, s) not in by or (ras, s) not in by:
                continue
            a, b = by[(rnd, s)], by[(ras, s)]
            diff, se = a["geneval"] - b["geneval"], _quad(a["geneval_stderr"], b["geneval_stderr"])
            wins, total = wins + (diff > Z * se), total + 1
            cells.append(f"{s} {a['geneval']:.3f} vs {b['geneval']:.3f} (Δ {diff:+.3f} ± {se:.3f})")
            for family, score in a["geneval_tasks"].items():
                gains.setdefault(family, []).append(score - b["geneval_tasks"].get(family, 0.0))
        if cells:
            lines.append(f"{tokens}: GenEval random vs raster " + "; ".join(cells))
    mean_gain = {f: sum(v) / len(v) for f, v in gains.items()}
    ranked = sorted(mean_gain, key=mean_gain.get, reverse=True)
    if ranked:
        lines.append(
            "mean gain per family (random − raster, over sizes and token kinds): "
            + ", ".join(f"{f} {mean_gain[f]:+.3f}" for f in ranked)
        )
    most = set(ranked[:2]) == {"position", "counting"}
    return {
        "miniature": lines,
        "verdict": _verdict([wins == total, most] if total else [], partial=wins > 0 or most),
        "passed": f"random higher beyond noise at {wins}/{total} (token kind, size) pairs; "
        f"largest gains: {', '.join(ranked[:2]) or 'none'}",
    }


def _correlation(results: Sequence[dict[str, Any]], correlations: dict[str, Any]) -> dict[str, Any]:
    points = sum(len(r["milestones"]) + 1 for r in results if r["milestones"])
    lines, oks = [], []
    for metric, sign in (("fid", 1), ("geneval", -1)):
        c = correlations.get(metric)
        if c is None:
            continue
        oks.append(sign * c["r"] > 0 and c["p_value"] < ALPHA)
        lines.append(f"val loss vs {metric}: Pearson r {c['r']:+.3f} (p {c['p_value']:.2g})")
    lines.append(f"over {points} checkpoints (sizes x training steps)")
    return {
        "miniature": lines,
        "verdict": _verdict(oks),
        "passed": f"{sum(oks)}/{len(oks)} metrics correlate in the paper's direction (p < {ALPHA})",
    }


def _readout(results: Sequence[dict[str, Any]]) -> list[str]:
    """The readout loss's effect: each variant trained with and without it."""
    by = _by(results)
    lines = []
    for r in results:
        if r["readout"] or (r["variant"].removesuffix("-noreadout"), r["size"]) not in by:
            continue
        w = by[(r["variant"].removesuffix("-noreadout"), r["size"])]
        lines.append(
            f"{w['variant']} {r['size']}: GenEval {w['geneval']:.3f} with the readout loss vs "
            f"{r['geneval']:.3f} without; FID {w['fid']:.2f} vs {r['fid']:.2f}; val loss "
            f"{w['val_loss']:.4f} vs {r['val_loss']:.4f}"
        )
    return lines


def findings(results: Sequence[dict[str, Any]], correlations: dict[str, Any]) -> dict[str, Any]:
    """The four findings (``a``-``d``), each {paper, miniature (lines), passed, verdict}, and
    the readout ablation's lines. Runs trained without the readout loss carry a variant label
    of their own (``random-continuous-noreadout``): (a) fits them as a variant, (b)-(d) look
    up the four variants by name and so use the runs trained with it."""
    measured = {
        "a": _power_law(results),
        "b": _continuous_vs_discrete(results),
        "c": _random_vs_raster(results),
        "d": _correlation(results, correlations),
    }
    return {
        **{k: {"paper": PAPER[k], **v} for k, v in measured.items()},
        "readout": _readout(results),
    }


def format_findings(measured: dict[str, Any]) -> str:
    """The findings as a markdown table (paper vs miniature, verdict)."""
    lines = ["| finding | paper | miniature | verdict |", "|---|---|---|---|"]
    for k in ("a", "b", "c", "d"):
        f = measured[k]
        mini = "<br>".join(f["miniature"] + [f"({f['passed']})"])
        lines.append(f"| ({k}) | {f['paper']} | {mini} | **{f['verdict']}** |")
    if measured.get("readout"):
        lines += ["", "Readout loss (DiffLoss head only), with vs without:", ""]
        lines += [f"- {line}" for line in measured["readout"]]
    return "\n".join(lines) + "\n"
