"""Metrics, reports and plots of trl_micro.evaluation, checked against hand-computed cases."""

import importlib.util
import itertools
import json
import math
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset

from trl_micro import evaluation
from trl_micro.evaluation import (
    adaptation_curve,
    gap_closed,
    head_accuracy,
    head_usage,
    match_heads_to_subpopulations,
    mean_usage_entropy,
    pairwise_accuracy,
    per_context_accuracy,
    per_context_accuracy_from_table,
    plot_accuracy_per_context,
    plot_adaptation_curves,
    plot_head_usage_heatmap,
    router_entropy,
    summarize_methods,
    to_jsonable,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Context "a": +, +, -        -> 2/3
# Context "b": +, -, -, -, 0  -> (1 + 0.5) / 5 = 0.3
DELTAS = [1.0, 2.0, -1.0, 0.5, -0.5, -2.0, -0.1, 0.0]
CONTEXTS = ["a", "a", "a", "b", "b", "b", "b", "b"]


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([1.0, -1.0, 0.0, 2.0]) == pytest.approx(0.625)
    assert pairwise_accuracy(torch.tensor([0.3, 0.1], dtype=torch.bfloat16)) == 1.0
    assert pairwise_accuracy(np.zeros(4)) == 0.5
    with pytest.raises(ValueError, match="empty"):
        pairwise_accuracy([])
    with pytest.raises(ValueError, match="NaN"):
        pairwise_accuracy([1.0, float("nan")])
    with pytest.raises(ValueError, match="dimension"):
        pairwise_accuracy([[1.0, 2.0]])


def test_per_context_accuracy_macro_micro_worst():
    result = per_context_accuracy(torch.tensor(DELTAS), np.array(CONTEXTS))
    assert result["accuracy"] == pytest.approx({"a": 2 / 3, "b": 0.3})
    assert result["count"] == {"a": 3, "b": 5}
    assert result["macro"] == pytest.approx((2 / 3 + 0.3) / 2)
    assert result["micro"] == pytest.approx(3.5 / 8)
    assert result["worst"] == pytest.approx(0.3)
    assert result["worst_context"] == "b"
    assert result["num_pairs"] == 8
    with pytest.raises(ValueError, match="one label per pair"):
        per_context_accuracy(DELTAS, CONTEXTS[:-1])


def test_per_context_accuracy_from_table_and_missing_context_column():
    table = {"delta": DELTAS, "context_id": CONTEXTS}
    assert per_context_accuracy_from_table(table)["macro"] == pytest.approx((2 / 3 + 0.3) / 2)
    dataset = Dataset.from_dict({"margin": DELTAS, "persona": CONTEXTS})
    assert per_context_accuracy_from_table(dataset, "margin", "persona")["worst_context"] == "b"
    with pytest.raises(ValueError) as error:
        per_context_accuracy_from_table(dataset, "margin", "context_id")
    assert "'context_id'" in str(error.value) and "persona" in str(error.value) and "margin" in str(error.value)


def test_head_accuracy_table():
    head_deltas = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 1.0]])
    result = head_accuracy(head_deltas, ["x", "x", "y", "y"])
    assert result["contexts"] == ["x", "y"]
    np.testing.assert_allclose(result["accuracy"], [[1.0, 0.25], [0.0, 1.0]])
    np.testing.assert_allclose(result["overall"], [0.625, 0.5])
    assert result["count"] == {"x": 2, "y": 2}


# ---------------------------------------------------------------------------------------------------------------------
# Router analysis
# ---------------------------------------------------------------------------------------------------------------------


def test_head_usage_and_entropies():
    one_hot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    usage = head_usage(one_hot, ["helpful", "helpful", "harmless", "harmless"])
    assert usage["contexts"] == ["harmless", "helpful"]
    np.testing.assert_allclose(usage["usage"], [[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(usage["overall"], [0.5, 0.5])
    assert router_entropy(one_hot) == pytest.approx(0.0)
    assert mean_usage_entropy(one_hot) == pytest.approx(math.log(2))

    uniform = torch.full((5, 4), 0.25)
    assert router_entropy(uniform) == pytest.approx(math.log(4))
    assert mean_usage_entropy(uniform) == pytest.approx(math.log(4))

    with pytest.raises(ValueError, match="sum to 1"):
        router_entropy(torch.tensor([[0.5, 0.2]]))
    with pytest.raises(ValueError, match="non-negative"):
        head_usage(torch.tensor([[1.5, -0.5]]), ["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Heads versus subpopulations
# ---------------------------------------------------------------------------------------------------------------------


def _heads_from_ground_truth(labels: np.ndarray, permutation: list[int], flip_rate: float, seed: int) -> np.ndarray:
    """Head k follows subpopulation permutation[k] (or is noise when permutation[k] is None), with a few flips."""
    rng = np.random.default_rng(seed)
    num_pairs = labels.shape[0]
    columns = []
    for subpopulation in permutation:
        if subpopulation is None:
            columns.append(rng.normal(size=num_pairs))
            continue
        signs = 2.0 * labels[:, subpopulation] - 1.0
        flips = np.where(rng.random(num_pairs) < flip_rate, -1.0, 1.0)
        columns.append(signs * flips * rng.uniform(0.1, 2.0, size=num_pairs))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("hide_scipy", [False, True])
def test_head_matching_recovers_a_permutation(hide_scipy, monkeypatch):
    if hide_scipy:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails: exact search fallback
    use_scipy = not hide_scipy and importlib.util.find_spec("scipy") is not None
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 3)) < 0.5).astype(np.int64)
    permutation = [2, None, 0, 1]  # head 0 follows subpopulation 2, head 1 is noise, ...
    head_deltas = _heads_from_ground_truth(labels, permutation, flip_rate=0.1, seed=1)

    result = match_heads_to_subpopulations(torch.tensor(head_deltas), labels)
    assert result["accuracy"].shape == (4, 3)
    assert result["best_head"].tolist() == [2, 3, 0]
    assert result["assigned_head"].tolist() == [2, 3, 0]
    assert sorted(result["assignment"]) == [(0, 2), (2, 0), (3, 1)]
    assert 0.85 < result["assignment_accuracy"] < 0.95
    np.testing.assert_allclose(result["best_head_accuracy"], result["accuracy"].max(axis=0))
    assert result["assignment_method"] == ("hungarian" if use_scipy else "exact")


def test_one_to_one_assignment_beats_greedy_and_leaves_extra_subpopulations_unmatched(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    # Greedy would take (0, 0) = 0.9 and then (1, 1) = 0.1; the best matching is (0, 1) + (1, 0) = 1.6.
    scores = np.array([[0.9, 0.8], [0.8, 0.1]])
    pairs, method = evaluation._best_assignment(scores)
    assert (pairs, method) == ([(0, 1), (1, 0)], "exact")
    rng = np.random.default_rng(3)
    for shape in [(3, 5), (5, 3), (4, 4)]:
        scores = rng.random(shape)
        pairs, _ = evaluation._best_assignment(scores)
        small, large = min(shape), max(shape)
        brute = max(
            sum(scores[r, c] if shape[0] <= shape[1] else scores[c, r] for r, c in zip(range(small), columns))
            for columns in itertools.permutations(range(large), small)
        )
        assert sum(scores[r, c] for r, c in pairs) == pytest.approx(brute)

    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    head_deltas = 2.0 * labels[:, :2] - 1.0  # two heads, three subpopulations
    result = match_heads_to_subpopulations(head_deltas, labels)
    assert result["assigned_head"].tolist() == [0, 1, -1]
    assert result["assignment_accuracy"] == 1.0
    with pytest.raises(ValueError, match="only 0 and 1"):
        match_heads_to_subpopulations(head_deltas, labels * 2)


# ---------------------------------------------------------------------------------------------------------------------
# Curves and summaries
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def test_to_jsonable_converts_tensors_and_nan():
    value = {1: torch.tensor([1.0, 2.0]), "n": np.int64(3), "x": np.array([[0.5]]), "nan": float("nan"), "t": (1, 2)}
    assert to_jsonable(value) == {"1": [1.0, 2.0], "n": 3, "x": [[0.5]], "nan": None, "t": [1, 2]}


def test_write_report_writes_json_and_markdown(tmp_path):
    deltas = torch.tensor(DELTAS)
    results = {
        "title": "Toy evaluation",
        "methods": {
            "SingleReward": per_context_accuracy(deltas, CONTEXTS),
            "MiCRo": [per_context_accuracy(deltas + 0.2, CONTEXTS), per_context_accuracy(deltas + 0.7, CONTEXTS)],
            "Oracle": per_context_accuracy(deltas + 1.5, CONTEXTS),
        },
        "reference_methods": {"single": "SingleReward", "oracle": "Oracle"},
        "adaptation_curves": adaptation_curve({8: _result(0.5, 0.7), 32: _result(0.6, 0.8)}, method="MiCRo"),
        "head_usage": head_usage(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"]),
        "head_deltas": deltas.reshape(4, 2),
        "gap": float("nan"),
    }
    json_path, markdown_path = write_report(results, tmp_path / "reports" / "toy")
    assert json_path == tmp_path / "reports" / "toy.json" and markdown_path.suffix == ".md"

    payload = json.loads(json_path.read_text())
    assert payload["methods"]["SingleReward"]["count"] == {"a": 3, "b": 5}
    assert payload["head_deltas"] == deltas.reshape(4, 2).tolist()
    assert payload["gap"] is None
    assert payload["summary"]["num_seeds"]["MiCRo"] == 2

    markdown = markdown_path.read_text()
    assert markdown.startswith("# Toy evaluation")
    assert "| method | a | b | macro | worst | seeds | gap closed (macro) |" in markdown
    assert "| SingleReward | 66.7 | 30.0 | 48.3 | 30.0 | 1 | 0.00 |" in markdown
    assert "±" in markdown
    assert "| MiCRo | a | 50.0 | 60.0 |" in markdown
    assert "| a | 0.90 | 0.10 |" in markdown


def test_write_report_unwritable_path_fails_before_writing(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError) as error:
        write_report({"methods": {"m": _result(0.6, 0.7)}}, blocker / "report")
    assert str(blocker / "report.json") in str(error.value)

    with pytest.raises(ValueError, match="'methods'"):
        write_report({"heads": 4}, tmp_path / "no_methods")
    with pytest.raises(ValueError, match="per-context"):
        write_report({"methods": {"m": {"macro": 0.5}}}, tmp_path / "no_contexts")


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def test_plots_write_png_files(tmp_path):
    methods = {"SingleReward": _result(0.6, 0.65), "MiCRo": [_result(0.7, 0.8), _result(0.75, 0.78)]}
    _assert_png(plot_accuracy_per_context(methods, tmp_path / "accuracy.png"))
    summary = summarize_methods(methods)
    _assert_png(plot_accuracy_per_context(summary["mean"], tmp_path / "table.png", std=summary["std"]))

    curves = {
        "MiCRo": adaptation_curve({n: [_result(0.6 + n / 1000, 0.7), _result(0.62, 0.71)] for n in (8, 32, 128)}),
        "HyRe": adaptation_curve({n: _result(0.55 + n / 2000, 0.6) for n in (8, 32, 128)}),
    }
    references = {"SingleReward": 0.6, "Oracle": {"a": 0.8, "b": 0.85}}
    _assert_png(plot_adaptation_curves(curves, tmp_path / "curves.png", references=references))

    usage = head_usage(torch.softmax(torch.randn(20, 3), dim=-1), ["a", "b"] * 10)
    _assert_png(plot_head_usage_heatmap(usage["usage"], usage["contexts"], tmp_path / "usage.png"))


def test_plot_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="usage.png"):
        plot_head_usage_heatmap(np.eye(2), ["a", "b"], blocker / "usage.png")
    with pytest.raises(ValueError, match="2 rows but 3 context names"):
        plot_head_usage_heatmap(np.eye(2), ["a", "b", "c"], tmp_path / "usage.png")
    with pytest.raises(ValueError, match="lack the keys"):
        plot_adaptation_curves([{"num_pairs": 8, "accuracy": 0.6}], tmp_path / "curves.png")
