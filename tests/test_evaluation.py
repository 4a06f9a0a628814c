"""Metrics, reports and plots of trl_micro.evaluation (what `trl-micro eval` reports), against hand-computed cases."""

import json

import numpy as np
import pytest
import torch

from trl_micro.evaluation import head_accuracy, head_usage, pairwise_accuracy, per_context_accuracy
from trl_micro.evaluation_reports import plot_accuracy_per_context, plot_head_usage_heatmap, to_jsonable, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Context "a": +, +, -        -> 2/3
# Context "b": +, -, -, -, 0  -> (1 + 0.5) / 5 = 0.3
DELTAS = [1.0, 2.0, -1.0, 0.5, -0.5, -2.0, -0.1, 0.0]
CONTEXTS = ["a", "a", "a", "b", "b", "b", "b", "b"]


def toy_accuracy(shift: float = 0.0) -> dict:
    """Per-context accuracy of the toy margins `DELTAS` moved up by `shift` (contexts `CONTEXTS`)."""
    return per_context_accuracy(torch.tensor(DELTAS) + shift, CONTEXTS)


def toy_head_usage() -> dict:
    """Head usage of two contexts that each lean on their own head (0.9 / 0.1, 0.2 / 0.8)."""
    return head_usage(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


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


def test_head_accuracy_table():
    head_deltas = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 1.0]])
    result = head_accuracy(head_deltas, ["x", "x", "y", "y"])
    assert result["contexts"] == ["x", "y"]
    np.testing.assert_allclose(result["accuracy"], [[1.0, 0.25], [0.0, 1.0]])
    np.testing.assert_allclose(result["overall"], [0.625, 0.5])
    assert result["count"] == {"x": 2, "y": 2}


def test_head_usage_per_context_and_refusals():
    one_hot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    usage = head_usage(one_hot, ["helpful", "helpful", "harmless", "harmless"])
    assert usage["contexts"] == ["harmless", "helpful"]
    np.testing.assert_allclose(usage["usage"], [[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(usage["overall"], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        head_usage(torch.tensor([[0.5, 0.2]]), ["a"])
    with pytest.raises(ValueError, match="non-negative"):
        head_usage(torch.tensor([[1.5, -0.5]]), ["a"])


def test_to_jsonable_converts_tensors_and_nan():
    value = {1: torch.tensor([1.0, 2.0]), "n": np.int64(3), "x": np.array([[0.5]]), "nan": float("nan"), "t": (1, 2)}
    assert to_jsonable(value) == {"1": [1.0, 2.0], "n": 3, "x": [[0.5]], "nan": None, "t": [1, 2]}


def test_write_report_writes_json_and_markdown(tmp_path):
    deltas = torch.tensor(DELTAS)
    results = {
        "title": "Toy evaluation",
        "methods": {"SingleReward": toy_accuracy(), "MiCRo": toy_accuracy(0.7)},
        "head_usage": {"router": toy_head_usage()},
        "head_deltas": deltas.reshape(4, 2),
        "gap": float("nan"),
    }
    json_path, markdown_path = write_report(results, tmp_path / "reports" / "toy")
    assert json_path == tmp_path / "reports" / "toy.json" and markdown_path.suffix == ".md"

    payload = json.loads(json_path.read_text())
    assert payload["methods"]["SingleReward"]["count"] == {"a": 3, "b": 5}
    assert payload["head_deltas"] == deltas.reshape(4, 2).tolist()
    assert payload["gap"] is None

    markdown = markdown_path.read_text()
    assert markdown.startswith("# Toy evaluation")
    assert "| method | a | b | macro | worst |" in markdown
    assert "| SingleReward | 66.7 | 30.0 | 48.3 | 30.0 |" in markdown
    assert "| MiCRo | 66.7 | 80.0 | 73.3 | 66.7 |" in markdown
    assert "### router" in markdown and "| a | 0.90 | 0.10 |" in markdown

    custom = write_report({"title": "Custom", "x": 1}, tmp_path / "custom", markdown_lines=["free text"])[1]
    assert custom.read_text() == "# Custom\n\nfree text\n"


def test_write_report_unwritable_path_fails_before_writing(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError) as error:
        write_report({"methods": {"m": per_context_accuracy(DELTAS, CONTEXTS)}}, blocker / "report")
    assert str(blocker / "report.json") in str(error.value)
    with pytest.raises(ValueError, match="'methods'"):
        write_report({"heads": 4}, tmp_path / "no_methods")


def test_plots_write_png_files(tmp_path):
    methods = {
        "SingleReward": per_context_accuracy(DELTAS, CONTEXTS),
        "MiCRo": per_context_accuracy([1.0] * 8, CONTEXTS),
    }
    assert_png(plot_accuracy_per_context(methods, tmp_path / "accuracy.png"))
    table = {"SingleReward": {"a": 0.6, "macro": 0.6}, "MiCRo": {"a": 0.8, "macro": 0.7}}
    std = {"SingleReward": {"a": 0.01, "macro": 0.02}, "MiCRo": {"a": 0.0, "macro": 0.05}}
    assert_png(plot_accuracy_per_context(table, tmp_path / "table.png", std=std))
    usage = head_usage(torch.softmax(torch.randn(20, 3), dim=-1), ["a", "b"] * 10)
    assert_png(plot_head_usage_heatmap(usage["usage"], usage["contexts"], tmp_path / "usage.png"))


def test_plot_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="usage.png"):
        plot_head_usage_heatmap(np.eye(2), ["a", "b"], blocker / "usage.png")
    with pytest.raises(ValueError, match="2 rows but 3 context names"):
        plot_head_usage_heatmap(np.eye(2), ["a", "b", "c"], tmp_path / "usage.png")
