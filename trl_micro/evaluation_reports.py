"""
The reports of `trl-micro eval` and the benchmarks: JSON + Markdown files (`write_report`) and plots of the metrics in
`trl_micro.evaluation`. Plots (`plot_*`, matplotlib with the Agg renderer, PNG) import matplotlib only when called
(`pip install trl-micro[eval]`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import SUMMARY_COLUMNS, as_numpy

PLOT_DPI = 120


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """
    A JSON-serializable copy: tensors and arrays become (nested) lists, numpy scalars Python numbers, tuples and sets
    lists, paths strings, dataclasses dicts, mapping keys strings, and NaN / infinity `None`.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(item) for item in value), key=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Cannot convert a {type(value).__name__} to JSON.")


def ensure_writable(path: str | os.PathLike) -> Path:
    """
    Make sure a file can be written at `path`: create its folder if needed and write (then delete) a probe file in
    it. Raises `PermissionError` / `NotADirectoryError` / `OSError` naming the path otherwise.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write {str(path)!r}: it is a directory.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(f"Cannot write {str(path)!r}: cannot create its folder {str(folder)!r} ({error}).") from error
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot write {str(path)!r}: {str(folder)!r} is not a directory.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists():
            with open(path, "a"):
                pass
    except OSError as error:
        raise PermissionError(f"Cannot write {str(path)!r}: the location is not writable ({error}).") from error
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def accuracy_lines(methods: Mapping[str, Mapping]) -> list[str]:
    """The Markdown section of `{method: per_context_accuracy dict}`: methods x contexts, with macro and worst."""
    columns = list(dict.fromkeys(context for result in methods.values() for context in result["accuracy"]))
    columns += list(SUMMARY_COLUMNS)
    rows = []
    for name, result in methods.items():
        values = {**result["accuracy"], **{column: result[column] for column in SUMMARY_COLUMNS}}
        rows.append([name, *[f"{100 * values[column]:.1f}" if column in values else "–" for column in columns]])
    caption = "Pairwise accuracy (%) per context; macro = mean over contexts, worst = lowest context."
    return ["## Accuracy per context", "", caption, "", *markdown_table(["method", *columns], rows), ""]


def head_usage_lines(usage: Mapping) -> list[str]:
    entries = {"": usage} if "usage" in usage else dict(usage)
    lines = ["## Head usage", "", "Mean mixture weight per head within each context.", ""]
    for name, entry in entries.items():
        matrix = np.asarray(to_jsonable(entry["usage"]), dtype=np.float64)
        header = ["context", *[f"head {k}" for k in range(matrix.shape[1])]]
        rows = [[context, *[f"{value:.2f}" for value in matrix[c]]] for c, context in enumerate(entry["contexts"])]
        if name:
            lines += [f"### {name}", ""]
        lines += [*markdown_table(header, rows), ""]
    return lines


def write_report(
    results: Mapping[str, Any], path_prefix: str | os.PathLike, markdown_lines: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """
    Write `<path_prefix>.json` (every entry of `results`, converted by [`to_jsonable`]) and `<path_prefix>.md`.

    The Markdown report is `results["title"]` followed by `markdown_lines` when given, else by the sections built
    from `results["methods"]` (`{method: per_context_accuracy dict}`, [`accuracy_lines`]) and, when present,
    `results["head_usage"]` ([`head_usage_lines`]). Both paths are checked for writability before anything is written;
    a path that cannot be written raises an `OSError` naming it. Returns the two paths.
    """
    prefix = os.fspath(path_prefix)
    json_path, markdown_path = Path(prefix + ".json"), Path(prefix + ".md")
    ensure_writable(json_path)
    ensure_writable(markdown_path)
    if markdown_lines is None:
        if "methods" not in results:
            raise ValueError(f"results must have a 'methods' entry; it has {list(results)}.")
        markdown_lines = accuracy_lines(results["methods"])
        if results.get("head_usage"):
            markdown_lines += head_usage_lines(results["head_usage"])
    payload = to_jsonable(results)
    lines = [f"# {results.get('title', 'Reward model evaluation')}", "", *markdown_lines]
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    markdown_path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return json_path, markdown_path


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'trl-micro[eval]'.") from error
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path: Path) -> Path:
    figure.savefig(path, dpi=PLOT_DPI, bbox_inches="tight", format="png")
    return path


def plot_accuracy_per_context(
    table: Mapping[str, Any],
    path: str | os.PathLike,
    std: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "Pairwise accuracy per context",
    columns: Sequence[str] | None = None,
) -> Path:
    """
    Grouped bars: one group per context (and macro / worst when present), one bar per method, error bars from `std`.

    `table` is `{method: {column: accuracy}}` or `{method: per_context_accuracy dict}` (its contexts, macro and
    worst are plotted); `std` (same shape as the first form) draws error bars. A dashed line marks chance (0.5).
    Returns the PNG path.
    """
    path = ensure_writable(path)
    means = {
        name: (
            {**values["accuracy"], **{column: values[column] for column in SUMMARY_COLUMNS}}
            if isinstance(values.get("accuracy"), Mapping)
            else dict(values)
        )
        for name, values in table.items()
    }
    if columns is None:
        columns = list(dict.fromkeys(column for values in means.values() for column in values))
    methods = list(means)

    figure = new_figure(max(6.0, 1.4 * len(columns) + 0.35 * len(columns) * len(methods)), 4.5)
    axes = figure.subplots()
    width = 0.8 / max(1, len(methods))
    positions = np.arange(len(columns))
    for index, method in enumerate(methods):
        heights = [means[method].get(column, np.nan) for column in columns]
        errors = None
        if std is not None and method in std:
            errors = [std[method].get(column, 0.0) for column in columns]
            if not any(errors):
                errors = None  # a single run: no error bar
        offsets = positions - 0.4 + width * (index + 0.5)
        bars = axes.bar(offsets, heights, width, yerr=errors, capsize=3, label=method)
        axes.bar_label(
            bars,
            labels=[f"{h:.2f}" if np.isfinite(h) else "" for h in heights],
            label_type="center",
            fontsize=7,
            color="white",
        )
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(positions, columns)
    axes.set_ylabel("pairwise accuracy")
    finite = [means[m].get(c, np.nan) for m in methods for c in columns]
    finite = [v for v in finite if np.isfinite(v)]
    lowest = min(finite + [0.5]) if finite else 0.5
    axes.set_ylim(max(0.0, math.floor((lowest - 0.1) * 10) / 10), 1.05)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(figure, path)


def plot_head_usage_heatmap(
    usage: Any,
    context_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Mean mixture weight per head",
    head_names: Sequence[str] | None = None,
) -> Path:
    """
    Heatmap of `usage` (contexts × K, e.g. `head_usage(...)["usage"]`) with every value written in its cell.
    Returns the PNG path.
    """
    path = ensure_writable(path)
    matrix = as_numpy(usage, "usage", ndim=2)
    if matrix.shape[0] != len(context_names):
        raise ValueError(f"usage has {matrix.shape[0]} rows but {len(context_names)} context names were given.")
    num_heads = matrix.shape[1]
    head_names = list(head_names) if head_names is not None else [f"head {k}" for k in range(num_heads)]
    figure = new_figure(1.1 * num_heads + 3.0, 0.6 * len(context_names) + 1.8)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(1.0, float(matrix.max())), aspect="auto")
    for row, column in itertools.product(range(matrix.shape[0]), range(num_heads)):
        value = matrix[row, column]
        axes.text(
            column, row, f"{value:.2f}", ha="center", va="center", fontsize=9, color="black" if value > 0.6 else "white"
        )
    axes.set_xticks(range(num_heads), head_names)
    axes.set_yticks(range(len(context_names)), list(context_names))
    axes.set_xlabel("reward head")
    axes.set_ylabel("context")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="mean weight")
    return save_figure(figure, path)
