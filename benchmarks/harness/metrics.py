r"""
Metrics, tables and plots of the benchmarks' studies (several seeds, adaptation curves, gap closed), on top of the
library's per-context accuracies (`trl_micro.evaluation`).

Gap closed, per context: (acc_method - acc_SingleReward) / (acc_Oracle - acc_SingleReward); 1 = the oracle, 0 =
SingleReward, undefined when the oracle is not above SingleReward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trl_micro.evaluation import SUMMARY_COLUMNS, head_accuracy, per_context_accuracy
from trl_micro.evaluation_reports import (
    ensure_writable,
    head_usage_lines,
    markdown_table,
    new_figure,
    save_figure,
    write_report,
)


def gap_closed(method_acc: float, single_acc: float, oracle_acc: float) -> float:
    """
    Fraction of the gap between SingleReward and the oracle that a method closes: `(m - s) / (o - s)`.

    1 means the method matches the oracle, 0 SingleReward, negative values are worse than SingleReward. When the
    oracle is not better than SingleReward (`o <= s`) there is no gap to close and the result is NaN (written as
    `null` in JSON reports).
    """
    method_acc, single_acc, oracle_acc = float(method_acc), float(single_acc), float(oracle_acc)
    if oracle_acc <= single_acc:
        return float("nan")
    return (method_acc - single_acc) / (oracle_acc - single_acc)


def _is_per_context_result(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("accuracy"), Mapping)


def _runs(value: Any, name: str) -> list[Mapping]:
    """A method's result as a list of per-context accuracy dicts (one per seed)."""
    runs = [value] if isinstance(value, Mapping) else list(value)
    if not runs or not all(_is_per_context_result(run) for run in runs):
        raise ValueError(
            f"Result of {name!r} must be a per_context_accuracy dict (with an 'accuracy' mapping of context to "
            "accuracy) or a list of them, one per seed; it has no per-context accuracies."
        )
    return runs


def _mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def adaptation_curve(results: Mapping[int, Any], method: str | None = None, include_summary: bool = True) -> list[dict]:
    """
    Tidy rows of an adaptation curve from `{num_pairs: per_context_accuracy dict}`.

    A value may also be a list of per-context dicts (one per seed): its rows then hold the mean over seeds, with
    `accuracy_std` (sample standard deviation, 0 for one seed) and `num_seeds`.

    Returns one row per (num_pairs, context), with keys `num_pairs`, `context`, `accuracy`, `accuracy_std`,
    `num_seeds` (and `method` when given); with `include_summary`, rows whose context is "macro" and "worst" follow.
    Rows are sorted by num_pairs.
    """
    rows = []
    for num_pairs in sorted(results):
        runs = _runs(results[num_pairs], f"{num_pairs} pairs")
        contexts = list(runs[0]["accuracy"])
        columns = contexts + (list(SUMMARY_COLUMNS) if include_summary else [])
        for column in columns:
            values = [run[column] if column in SUMMARY_COLUMNS else run["accuracy"][column] for run in runs]
            mean, std = _mean_and_std(values)
            row = {"num_pairs": int(num_pairs), "context": column, "accuracy": mean, "accuracy_std": std}
            row["num_seeds"] = len(runs)
            if method is not None:
                row = {"method": method, **row}
            rows.append(row)
    return rows


def summarize_methods(methods: Mapping[str, Any]) -> dict:
    """
    Methods × contexts accuracy table from `{method: per_context_accuracy dict or list of them (seeds)}`.

    Returns `{"contexts": [...], "columns": contexts + ["macro", "worst"], "mean": {method: {column: value}},
    "std": {method: {column: value}}, "num_seeds": {method: n}}`. With several seeds, "worst" is the mean over seeds
    of each seed's worst context. Raises `ValueError` when a method has no per-context accuracies.
    """
    if not methods:
        raise ValueError("No methods to summarize.")
    contexts: list[str] = []
    mean, std, num_seeds = {}, {}, {}
    for name, value in methods.items():
        runs = _runs(value, name)
        for context in runs[0]["accuracy"]:
            if context not in contexts:
                contexts.append(context)
        mean[name], std[name] = {}, {}
        for column in [*runs[0]["accuracy"], *SUMMARY_COLUMNS]:
            values = [run[column] if column in SUMMARY_COLUMNS else run["accuracy"][column] for run in runs]
            mean[name][column], std[name][column] = _mean_and_std(values)
        num_seeds[name] = len(runs)
    return {
        "contexts": contexts,
        "columns": [*contexts, *SUMMARY_COLUMNS],
        "mean": mean,
        "std": std,
        "num_seeds": num_seeds,
    }


def format_accuracy_cell(mean: float, std: float, num_seeds: int) -> str:
    """An accuracy in percent, with "± std" over seeds when there are several; "n/a" when undefined."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if num_seeds > 1:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{100 * mean:.1f}"


def accuracy_section(summary: dict, reference_methods: Mapping[str, str] | None) -> list[str]:
    several = any(n > 1 for n in summary["num_seeds"].values())
    header = ["method", *summary["columns"]]
    if several:
        header.append("seeds")
    single = oracle = None
    if reference_methods:
        single, oracle = reference_methods.get("single"), reference_methods.get("oracle")
        if single not in summary["mean"] or oracle not in summary["mean"]:
            single = oracle = None
        else:
            header.append("gap closed (macro)")
    rows = []
    for name, means in summary["mean"].items():
        seeds = summary["num_seeds"][name]
        row = [name]
        for column in summary["columns"]:
            if column in means:
                row.append(format_accuracy_cell(means[column], summary["std"][name][column], seeds))
            else:
                row.append("–")
        if several:
            row.append(str(seeds))
        if single is not None:
            closed = gap_closed(means["macro"], summary["mean"][single]["macro"], summary["mean"][oracle]["macro"])
            row.append("n/a" if math.isnan(closed) else f"{closed:.2f}")
        rows.append(row)
    caption = "Pairwise accuracy (%) per context; macro = mean over contexts, worst = lowest context."
    if several:
        caption += " Mean ± standard deviation over seeds."
    return ["## Accuracy per context", "", caption, "", *markdown_table(header, rows), ""]


def adaptation_section(rows: Sequence[Mapping]) -> list[str]:
    counts = sorted({int(row["num_pairs"]) for row in rows})
    series = list(dict.fromkeys((row.get("method", ""), row["context"]) for row in rows))
    cells = {(row.get("method", ""), row["context"], int(row["num_pairs"])): row for row in rows}
    table = []
    for method, context in series:
        line = [method, context]
        for count in counts:
            row = cells.get((method, context, count))
            line.append(
                "–"
                if row is None
                else format_accuracy_cell(row["accuracy"], row.get("accuracy_std", 0.0), row.get("num_seeds", 1))
            )
        table.append(line)
    header = ["method", "context", *[f"{count} pairs" for count in counts]]
    return [
        "## Adaptation curves",
        "",
        "Accuracy (%) by number of adaptation pairs per context.",
        "",
        *markdown_table(header, table),
        "",
    ]


def write_seeded_report(results: Mapping[str, Any], path_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """
    `trl_micro.evaluation_reports.write_report` for results over several seeds: `methods` maps each method to a
    per_context_accuracy dict or a list of them (one per seed); `reference_methods` `{"single": name, "oracle": name}`
    adds a gap-closed column, `adaptation_curves` (rows of [`adaptation_curve`]) and `head_usage` their sections.
    """
    if "methods" not in results:
        raise ValueError(f"results must have a 'methods' entry; it has {list(results)}.")
    summary = summarize_methods(results["methods"])
    lines = accuracy_section(summary, results.get("reference_methods"))
    if results.get("adaptation_curves"):
        lines += adaptation_section(results["adaptation_curves"])
    if results.get("head_usage"):
        lines += head_usage_lines(results["head_usage"])
    return write_report({**results, "summary": summary}, path_prefix, markdown_lines=lines)


def plot_adaptation_curves(
    curves: Sequence[Mapping] | Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    references: Mapping[str, float | Mapping[str, float]] | None = None,
    title: str = "Accuracy vs number of adaptation pairs",
    contexts: Sequence[str] | None = None,
    xlabel: str = "adaptation pairs per context",
) -> Path:
    """
    Accuracy against the number of adaptation pairs per context (log2 x axis), one panel per context, one line per
    method, shaded ± std when rows carry `accuracy_std`.

    `curves` holds tidy rows from [`adaptation_curve`] (keys `method`, `context`, `num_pairs`, `accuracy`, optional
    `accuracy_std`) or `{method: rows}`. `references` draws horizontal dashed lines for methods that do not adapt,
    e.g. `{"SingleReward": 0.62, "Oracle": {"helpful": 0.70, "harmless": 0.72}}` (one value for every panel, or one
    per context). Returns the PNG path.
    """
    path = ensure_writable(path)
    if isinstance(curves, Mapping):
        rows = [{"method": method, **row} for method, method_rows in curves.items() for row in method_rows]
    else:
        rows = [dict(row) for row in curves]
    if not rows:
        raise ValueError("No adaptation curve rows to plot.")
    missing = {"context", "num_pairs", "accuracy"} - set().union(*rows)
    if missing:
        raise ValueError(
            f"Adaptation curve rows lack the keys {sorted(missing)}; they have {sorted(set().union(*rows))}."
        )
    if contexts is None:
        contexts = list(dict.fromkeys(row["context"] for row in rows))
    methods = list(dict.fromkeys(row.get("method", "method") for row in rows))
    counts = sorted({int(row["num_pairs"]) for row in rows})

    num_rows = math.ceil(len(contexts) / 3)
    num_columns = math.ceil(len(contexts) / num_rows)
    figure = new_figure(4.2 * num_columns + 2.2, 3.6 * num_rows + 0.6)
    grid = figure.subplots(num_rows, num_columns, sharey=True, squeeze=False)
    panels = grid.ravel()
    for unused in panels[len(contexts) :]:
        unused.set_visible(False)
    colors = [f"C{i}" for i in range(10)]
    reference_styles = ["--", "-.", ":"]
    for panel, context in zip(panels, contexts):
        for index, method in enumerate(methods):
            points = sorted(
                (int(r["num_pairs"]), r["accuracy"], r.get("accuracy_std", 0.0) or 0.0)
                for r in rows
                if r["context"] == context and r.get("method", "method") == method
            )
            if not points:
                continue
            x, y, s = (np.asarray(v, dtype=np.float64) for v in zip(*points))
            color = colors[index % len(colors)]
            panel.plot(x, y, marker="o", color=color, label=method)
            if (s > 0).any():
                panel.fill_between(x, y - s, y + s, color=color, alpha=0.15)
        for index, (name, value) in enumerate((references or {}).items()):
            level = value.get(context) if isinstance(value, Mapping) else value
            if level is None:
                continue
            panel.axhline(
                level,
                color=colors[(len(methods) + index) % len(colors)],
                linestyle=reference_styles[index % len(reference_styles)],
                linewidth=1.3,
                label=name,
            )
        panel.set_xscale("log", base=2)
        panel.set_xticks(counts, [str(count) for count in counts])
        panel.minorticks_off()
        panel.set_title(context)
        panel.set_xlabel(xlabel)
        panel.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("pairwise accuracy")
    handles = {}
    for panel in panels:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    # Centred on the right edge: at the top, the legend of a one-panel figure runs into the figure's title.
    figure.legend(list(handles.values()), list(handles), loc="outside right center", frameon=False)
    figure.suptitle(title)
    return save_figure(figure, path)


def best_heads(head_margins: torch.Tensor, contexts: Sequence[str]) -> dict[str, int]:
    """`{context: k}`, the head most accurate on each context's pairs (head margins (N, K), one context per row)."""
    table = head_accuracy(head_margins, contexts)
    return {context: int(np.argmax(table["accuracy"][:, column])) for column, context in enumerate(table["contexts"])}


def best_head_accuracy(
    head_margins: torch.Tensor, contexts: Sequence[str], heads: dict[str, int] | None = None
) -> dict:
    """
    Per-context accuracy of the head that is most accurate on that context's pairs (`per_context_accuracy` keys):
    a ceiling for any routing that gives each context one head. The head is chosen on the scored pairs themselves
    (`best_heads`, or `heads` when already known), so this is a diagnostic, not a method.
    """
    heads = best_heads(head_margins, contexts) if heads is None else heads
    best_margins = torch.stack([head_margins[row, heads[context]] for row, context in enumerate(contexts)])
    return per_context_accuracy(best_margins, contexts)
