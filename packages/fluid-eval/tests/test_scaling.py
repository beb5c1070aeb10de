from __future__ import annotations

import json

import numpy as np
import pytest

from fluid_eval import scaling
from fluid_eval.scaling import ScalingPoint

PARAMS = [166e6, 369e6, 665e6, 1.1e9, 3.1e9, 10.5e9]  # the paper's model sizes


def test_power_law_fit_recovers_a_synthetic_exponent() -> None:
    rng = np.random.default_rng(0)
    losses = 2.7 * np.asarray(PARAMS) ** -0.037 * np.exp(rng.normal(0, 0.002, len(PARAMS)))
    fit = scaling.fit_power_law(PARAMS, losses)
    assert fit.exponent == pytest.approx(-0.037, rel=0.01)
    assert fit.coefficient == pytest.approx(2.7, rel=0.05)
    assert 0 < fit.exponent_stderr < 0.005 and fit.r_squared > 0.95 and fit.num_points == 6
    assert fit.predict(1e9) == pytest.approx(2.7 * 1e9**-0.037, rel=0.01)
    exact = scaling.fit_power_law(PARAMS, 5.0 * np.asarray(PARAMS) ** -0.1)
    assert exact.exponent == pytest.approx(-0.1, rel=1e-9) and exact.exponent_stderr < 1e-9


def test_exponent_stderr_matches_scipy_linregress() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    losses = 3.0 * np.asarray(PARAMS) ** -0.05 * np.exp(rng.normal(0, 0.01, len(PARAMS)))
    fit = scaling.fit_power_law(PARAMS, losses)
    reference = stats.linregress(np.log(PARAMS), np.log(losses))
    assert fit.exponent == pytest.approx(reference.slope) and fit.exponent_stderr == pytest.approx(
        reference.stderr
    )
    assert fit.p_value == pytest.approx(reference.pvalue, rel=1e-9) and 0 < fit.p_value < 1e-3
    # Three sizes leave one degree of freedom: a slope 5.5 standard errors from 0 is not yet
    # significant at 5% (t_0.975,1 = 12.7), which a normal 2-sigma rule would call certain.
    three = scaling.fit_power_law([1e6, 2e6, 4e6], [2.0, 1.9, 1.85])
    assert abs(three.exponent / three.exponent_stderr) > 2 and three.p_value > 0.05
    assert three.p_value == pytest.approx(
        stats.linregress(np.log([1e6, 2e6, 4e6]), np.log([2.0, 1.9, 1.85])).pvalue, rel=1e-9
    )
    assert np.isnan(scaling.fit_power_law([1e6, 2e6], [2.0, 1.9]).p_value)  # two points: no test


def test_pearson_matches_numpy_and_rejects_degenerate_input() -> None:
    x, y = [2.1, 2.0, 1.95, 1.9, 1.85], [14.0, 9.5, 8.0, 7.1, 6.2]
    corr = scaling.pearson(x, y)
    assert (
        corr.r == pytest.approx(np.corrcoef(x, y)[0, 1])
        and 0 < corr.p_value < 0.05
        and corr.num_points == 5
    )
    assert scaling.pearson([1, 2, 3, 4], [4, 3, 2, 1]).r == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=">= 3"):
        scaling.pearson([1, 2], [3, 4])
    with pytest.raises(ValueError, match="constant"):
        scaling.pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="two distinct model sizes"):
        scaling.fit_power_law([1e8, 1e8], [2.0, 1.9])
    with pytest.raises(ValueError, match="> 0"):
        scaling.fit_power_law([1e8, 2e8], [2.0, -1.0])


def _points() -> list[ScalingPoint]:
    points = []
    for variant, (c, a) in {
        "random-continuous": (2.0, -0.04),
        "raster-discrete": (9.0, -0.03),
    }.items():
        for n in PARAMS[:4]:
            loss = c * n**a
            points.append(
                ScalingPoint(
                    variant,
                    n,
                    loss,
                    fid=40 * loss - 10 * (variant == "raster-discrete"),
                    geneval=1.2 - loss / 2,
                )
            )
    return points


def test_scaling_report_writes_the_four_figures(tmp_path) -> None:
    report = scaling.scaling_report(_points(), tmp_path)
    assert set(report.fits) == {"random-continuous", "raster-discrete"}
    assert report.fits["random-continuous"].exponent == pytest.approx(-0.04)
    assert report.correlations["geneval"].r == pytest.approx(-1.0)
    assert report.correlations["fid"].r > 0.9
    assert sorted(report.plots) == ["fig5", "fig6", "fig8", "fig9"]
    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    json.dumps(report.to_dict())  # serialisable for --json
    only_loss = scaling.scaling_report(
        [ScalingPoint(p.variant, p.params, p.loss) for p in _points()], tmp_path / "b"
    )
    assert sorted(only_loss.plots) == ["fig5"] and only_loss.correlations == {}
    # A metric that did not move (every model perfect) is plotted but has no correlation.
    flat = [ScalingPoint(p.variant, p.params, p.loss, geneval=1.0) for p in _points()]
    assert list(scaling.scaling_report(flat, tmp_path / "c").correlations) == []
    # Checkpoints along training feed Figures 8, 9 and the correlations; the fits keep the
    # final models. Here the checkpoints' GenEval rises with the loss, the finals' falls.
    along = [ScalingPoint("fluid s", 1e6, loss, geneval=loss / 10) for loss in (2.0, 1.5, 1.2, 1.1)]
    both = scaling.scaling_report(_points(), tmp_path / "d", along=along)
    assert both.correlations["geneval"].r == pytest.approx(1.0)
    assert both.correlations["geneval"].num_points == 4 and "fid" not in both.correlations
    assert both.fits.keys() == report.fits.keys() and sorted(both.plots) == ["fig5", "fig6", "fig9"]


def test_load_points_reads_json_and_jsonl_and_names_bad_files(tmp_path) -> None:
    rows = [
        {"variant": "v", "params": 1e8, "loss": 2.0, "fid": 30.0},
        {"variant": "v", "params": 2e8, "loss": 1.9},
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = [ScalingPoint("v", 1e8, 2.0, fid=30.0), ScalingPoint("v", 2e8, 1.9)]
    assert (
        scaling.load_points(tmp_path / "p.json")
        == expected
        == scaling.load_points(tmp_path / "p.jsonl")
    )
    (tmp_path / "bad.json").write_text('[{"variant": "v", "loss": 2.0}]')
    with pytest.raises(ValueError, match=r"bad.json: expected .*'params'"):
        scaling.load_points(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        scaling.load_points(tmp_path / "none.json")


def test_geneval_family_bars_are_drawn_per_variant(tmp_path) -> None:
    from fluid_eval.scaling import plot_geneval_families

    scores = {
        "random": {"position": 0.5, "counting": 0.4},
        "raster": {"position": 0.2, "counting": 0.3},
    }
    errors = {"random": {"position": 0.05, "counting": 0.04}}
    path = plot_geneval_families(scores, tmp_path / "fig13.png", errors=errors)
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no GenEval scores"):
        plot_geneval_families({}, tmp_path / "empty.png")
