"""The benchmarks' study metrics (benchmarks/harness/metrics.py): seeds, adaptation curves, gap closed, reports."""

import json
import math

import pytest
import torch

from benchmarks.harness.metrics import (
    adaptation_curve,
    best_head_accuracy,
    gap_closed,
    plot_adaptation_curves,
    summarize_methods,
    write_seeded_report,
)

from .test_evaluation import assert_png, toy_accuracy, toy_head_usage


def test_gap_closed():
    assert gap_closed(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_closed(0.8, 0.6, 0.8) == pytest.approx(1.0)
    assert gap_closed(0.5, 0.6, 0.8) == pytest.approx(-0.5)
    assert math.isnan(gap_closed(0.7, 0.8, 0.8))
    assert math.isnan(gap_closed(0.7, 0.8, 0.6))


def _result(a: float, b: float) -> dict:
    return {"accuracy": {"a": a, "b": b}, "macro": (a + b) / 2, "worst": min(a, b), "micro": (a + b) / 2}


def test_adaptation_curve_rows_with_seeds():
    rows = adaptation_curve({32: [_result(0.6, 0.8), _result(0.8, 0.6)], 8: _result(0.5, 0.7)}, method="MiCRo")
    assert [row["num_pairs"] for row in rows] == [8] * 4 + [32] * 4
    assert [row["context"] for row in rows[:4]] == ["a", "b", "macro", "worst"]
    row_32_a = rows[4]
    assert row_32_a == {
        "method": "MiCRo",
        "num_pairs": 32,
        "context": "a",
        "accuracy": pytest.approx(0.7),
        "accuracy_std": pytest.approx(math.sqrt(0.02)),
        "num_seeds": 2,
    }
    assert rows[7]["accuracy"] == pytest.approx(0.6)  # worst: mean of each seed's worst
    assert rows[0]["accuracy_std"] == 0.0 and rows[0]["num_seeds"] == 1
    assert len(adaptation_curve({8: _result(0.5, 0.7)}, include_summary=False)) == 2


def test_summarize_methods_and_missing_per_context_results():
    summary = summarize_methods({"Single": _result(0.6, 0.7), "MiCRo": [_result(0.7, 0.8), _result(0.9, 0.8)]})
    assert summary["columns"] == ["a", "b", "macro", "worst"]
    assert summary["mean"]["MiCRo"]["a"] == pytest.approx(0.8)
    assert summary["std"]["Single"]["a"] == 0.0
    assert summary["num_seeds"] == {"Single": 1, "MiCRo": 2}
    with pytest.raises(ValueError, match="'Broken'.*per-context"):
        summarize_methods({"Broken": {"macro": 0.6}})


def test_seeded_report_has_spreads_gap_curves_and_usage(tmp_path):
    results = {
        "title": "Toy benchmark",
        "methods": {
            "SingleReward": toy_accuracy(),
            "MiCRo": [toy_accuracy(0.2), toy_accuracy(0.7)],
            "Oracle": toy_accuracy(1.5),
        },
        "reference_methods": {"single": "SingleReward", "oracle": "Oracle"},
        "adaptation_curves": adaptation_curve({8: _result(0.5, 0.7), 32: _result(0.6, 0.8)}, method="MiCRo"),
        "head_usage": toy_head_usage(),
    }
    json_path, markdown_path = write_seeded_report(results, tmp_path / "toy")
    assert json.loads(json_path.read_text())["summary"]["num_seeds"]["MiCRo"] == 2
    markdown = markdown_path.read_text()
    assert "| method | a | b | macro | worst | seeds | gap closed (macro) |" in markdown
    assert "| SingleReward | 66.7 | 30.0 | 48.3 | 30.0 | 1 | 0.00 |" in markdown
    assert "±" in markdown
    assert "| MiCRo | a | 50.0 | 60.0 |" in markdown
    assert "| a | 0.90 | 0.10 |" in markdown
    with pytest.raises(ValueError, match="per-context"):
        write_seeded_report({"methods": {"m": {"macro": 0.5}}}, tmp_path / "no_contexts")


def test_best_head_accuracy_picks_each_contexts_best_head():
    head_margins = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0]])
    result = best_head_accuracy(head_margins, ["x", "x", "y", "y"])
    assert result["accuracy"] == {"x": 1.0, "y": 1.0}


def test_adaptation_curve_plot(tmp_path):
    curves = {
        "MiCRo": adaptation_curve({n: [_result(0.6 + n / 1000, 0.7), _result(0.62, 0.71)] for n in (8, 32, 128)}),
        "HyRe": adaptation_curve({n: _result(0.55 + n / 2000, 0.6) for n in (8, 32, 128)}),
    }
    references = {"SingleReward": 0.6, "Oracle": {"a": 0.8, "b": 0.85}}
    assert_png(plot_adaptation_curves(curves, tmp_path / "curves.png", references=references))
    with pytest.raises(ValueError, match="lack the keys"):
        plot_adaptation_curves([{"num_pairs": 8, "accuracy": 0.6}], tmp_path / "bad.png")
