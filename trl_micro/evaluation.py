r"""
Evaluation of personalized reward models: per-context accuracy, head analysis, adaptation curves, reports and plots.

Everything here is a pure function of per-pair arrays (torch tensors, numpy arrays or lists):

    head_deltas      (N, K)  r_k(x, y_chosen) - r_k(x, y_rejected) for every head k
    deltas           (N,)    a method's final reward margin r(x, y_chosen | c) - r(x, y_rejected | c)
    mixture_weights  (N, K)  the weights w_k(x, c) a router gave each pair (rows sum to 1)
    contexts         (N,)    each pair's context label (str), e.g. "helpful" / "harmless"

A pair counts as correct when its margin is positive; a tie (margin exactly 0) counts one half.

Reports (`write_report`) and plots (`plot_*`, matplotlib with the Agg renderer, PNG) consume the dictionaries these
functions return. matplotlib is only imported by the plot functions (`pip install trl-micro[eval]`).
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

SUMMARY_COLUMNS = ("macro", "worst")
PLOT_DPI = 120


# ---------------------------------------------------------------------------------------------------------------------
# Array helpers
# ---------------------------------------------------------------------------------------------------------------------


def _to_numpy(values: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """A float64 numpy copy of a tensor / array / list, checked for shape and NaNs."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().cpu().float().numpy()
    array = np.asarray(values, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(array.shape)}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty: there are no pairs to evaluate.")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN values.")
    return array


def _to_labels(contexts: Any, num_pairs: int) -> np.ndarray:
    if hasattr(contexts, "detach"):
        contexts = contexts.detach().cpu().numpy()
    labels = np.asarray([str(context) for context in contexts], dtype=object)
    if labels.shape != (num_pairs,):
        raise ValueError(f"contexts must hold one label per pair ({num_pairs}), got {labels.shape[0]} labels.")
    return labels


def _sorted_contexts(labels: np.ndarray) -> list[str]:
    return sorted(set(labels.tolist()))


def _correct(deltas: np.ndarray) -> np.ndarray:
    """1 for a positive margin, 0.5 for a tie, 0 for a negative margin (elementwise)."""
    return (deltas > 0).astype(np.float64) + 0.5 * (deltas == 0)


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis, with 0 log 0 = 0."""
    safe = np.where(probabilities > 0, probabilities, 1.0)
    return -(probabilities * np.log(safe)).sum(axis=-1)


def _mixture_weights(mixture_weights: Any) -> np.ndarray:
    weights = _to_numpy(mixture_weights, "mixture_weights", ndim=2)
    if (weights < 0).any():
        raise ValueError("mixture_weights must be non-negative.")
    sums = weights.sum(axis=1, keepdims=True)
    if not np.allclose(sums, 1.0, atol=1e-2):
        raise ValueError(
            "Every row of mixture_weights must sum to 1 (a distribution over heads); "
            f"row sums range from {sums.min():.4f} to {sums.max():.4f}."
        )
    return weights / sums  # remove low-precision rounding (bf16 softmax)


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------------------


def pairwise_accuracy(deltas: Any) -> float:
    """Fraction of pairs whose margin `deltas` (N,) is positive; ties count 0.5."""
    return float(_correct(_to_numpy(deltas, "deltas", ndim=1)).mean())


def per_context_accuracy(deltas: Any, contexts: Any) -> dict:
    """
    Accuracy of the margins `deltas` (N,) within each context of `contexts` (N,).

    Returns a dict:
        accuracy       {context: accuracy}          (contexts sorted by name)
        count          {context: number of pairs}
        macro          mean of the per-context accuracies (every context weighs the same)
        micro          accuracy over all pairs (every pair weighs the same)
        worst          lowest per-context accuracy
        worst_context  the context that has it
        num_pairs      N
    """
    values = _to_numpy(deltas, "deltas", ndim=1)
    labels = _to_labels(contexts, len(values))
    correct = _correct(values)
    accuracy, count = {}, {}
    for context in _sorted_contexts(labels):
        mask = labels == context
        accuracy[context] = float(correct[mask].mean())
        count[context] = int(mask.sum())
    worst_context = min(accuracy, key=accuracy.get)
    return {
        "accuracy": accuracy,
        "count": count,
        "macro": float(np.mean(list(accuracy.values()))),
        "micro": float(correct.mean()),
        "worst": accuracy[worst_context],
        "worst_context": worst_context,
        "num_pairs": int(len(values)),
    }


def _column(table: Any, name: str, role: str) -> Any:
    """Column `name` of a `datasets.Dataset`, a pandas DataFrame or a mapping of column name to values."""
    if hasattr(table, "column_names"):
        present = list(table.column_names)
    elif hasattr(table, "columns"):
        present = [str(column) for column in table.columns]
    elif isinstance(table, Mapping):
        present = [str(key) for key in table]
    else:
        raise TypeError(f"Expected a Dataset, DataFrame or mapping of columns, got {type(table).__name__}.")
    if name not in present:
        raise ValueError(f"{role} column {name!r} is missing; columns present: {present}.")
    return table[name]


def per_context_accuracy_from_table(
    table: Any, delta_column: str = "delta", context_column: str = "context_id"
) -> dict:
    """
    [`per_context_accuracy`] on two columns of a table (a `datasets.Dataset`, a pandas DataFrame or a dict of
    columns). Raises `ValueError` naming the missing column and the columns present.
    """
    contexts = _column(table, context_column, "Context")
    deltas = _column(table, delta_column, "Margin")
    return per_context_accuracy(np.asarray(list(deltas), dtype=np.float64), list(contexts))


def head_accuracy(head_deltas: Any, contexts: Any) -> dict:
    """
    Accuracy of every head on every context.

    Returns `{"contexts": [C names], "accuracy": (K, C) array, "overall": (K,) array, "count": {context: n}}`, where
    `accuracy[k, c]` is head k's pairwise accuracy on context c's pairs.
    """
    deltas = _to_numpy(head_deltas, "head_deltas", ndim=2)
    labels = _to_labels(contexts, deltas.shape[0])
    correct = _correct(deltas)
    names = _sorted_contexts(labels)
    table = np.stack([correct[labels == context].mean(axis=0) for context in names], axis=1)
    return {
        "contexts": names,
        "accuracy": table,
        "overall": correct.mean(axis=0),
        "count": {context: int((labels == context).sum()) for context in names},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Router analysis
# ---------------------------------------------------------------------------------------------------------------------


def head_usage(mixture_weights: Any, contexts: Any) -> dict:
    """
    Mean mixture weight of every head within every context.

    Returns `{"contexts": [C names], "usage": (C, K) array, "overall": (K,) array}`; row c of `usage` is the K-vector
    of mean weights for context c (it sums to 1).
    """
    weights = _mixture_weights(mixture_weights)
    labels = _to_labels(contexts, weights.shape[0])
    names = _sorted_contexts(labels)
    usage = np.stack([weights[labels == context].mean(axis=0) for context in names])
    return {"contexts": names, "usage": usage, "overall": weights.mean(axis=0)}


def router_entropy(mixture_weights: Any) -> float:
    """
    Mean per-pair entropy of the mixture weights, in nats: 0 when every pair is routed to a single head,
    log K when every pair spreads its weight evenly.
    """
    return float(_entropy(_mixture_weights(mixture_weights)).mean())


def mean_usage_entropy(mixture_weights: Any) -> float:
    """
    Entropy (nats) of the mean mixture weights over all pairs: low when the router collapses onto one head for
    everyone, log K when the heads are used equally on average (even if each pair picks one head).
    """
    return float(_entropy(_mixture_weights(mixture_weights).mean(axis=0)))


# ---------------------------------------------------------------------------------------------------------------------
# Heads versus subpopulations
# ---------------------------------------------------------------------------------------------------------------------


def _best_assignment(scores: np.ndarray) -> tuple[list[tuple[int, int]], str]:
    """
    One-to-one assignment of rows to columns maximizing the total score (min(R, C) pairs).

    Uses scipy's Hungarian solver when scipy is installed; otherwise an exact dynamic program over subsets of the
    smaller side (up to 16), and a greedy choice beyond that.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        linear_sum_assignment = None
    if linear_sum_assignment is not None:
        rows, columns = linear_sum_assignment(scores, maximize=True)
        return [(int(r), int(c)) for r, c in zip(rows, columns)], "hungarian"
    transposed = scores.shape[0] > scores.shape[1]
    matrix = scores.T if transposed else scores  # rows: the smaller side, every one of them gets a column
    num_rows, num_columns = matrix.shape
    if num_rows <= 16:
        pairs, method = _assignment_by_subsets(matrix), "exact"
    else:
        pairs, method = _assignment_greedy(matrix), "greedy"
    if transposed:
        pairs = [(column, row) for row, column in pairs]
    return sorted(pairs), method


def _assignment_by_subsets(matrix: np.ndarray) -> list[tuple[int, int]]:
    """Exact: columns are visited in turn, the state is the set of rows already matched."""
    num_rows, num_columns = matrix.shape
    full = (1 << num_rows) - 1
    best = {0: (0.0, ())}
    for column in range(num_columns):
        updated = dict(best)
        for mask, (score, pairs) in best.items():
            for row in range(num_rows):
                if mask & (1 << row):
                    continue
                candidate = (score + matrix[row, column], pairs + ((row, column),))
                key = mask | (1 << row)
                if key not in updated or candidate[0] > updated[key][0]:
                    updated[key] = candidate
        best = updated
    return list(best[full][1])


def _assignment_greedy(matrix: np.ndarray) -> list[tuple[int, int]]:
    pairs, used_rows, used_columns = [], set(), set()
    for flat in np.argsort(-matrix, axis=None):
        row, column = np.unravel_index(flat, matrix.shape)
        if row not in used_rows and column not in used_columns:
            pairs.append((int(row), int(column)))
            used_rows.add(row)
            used_columns.add(column)
    return pairs


def match_heads_to_subpopulations(head_deltas: Any, subpopulation_labels: Any) -> dict:
    """
    How well each head predicts each subpopulation's preferences.

    `subpopulation_labels` (N, M) holds 1 where subpopulation m prefers the chosen response of pair i, and 0 where it
    prefers the rejected one. Head k agrees with subpopulation m on pair i when the sign of `head_deltas[i, k]` matches
    (ties count 0.5).

    Returns a dict:
        accuracy             (K, M) array: accuracy of head k against subpopulation m
        best_head            (M,) array: the most accurate head for every subpopulation (heads may repeat)
        best_head_accuracy   (M,) array
        assignment           [(head, subpopulation), ...]: the one-to-one matching of min(K, M) pairs that maximizes
                             the total accuracy (scipy's Hungarian solver if installed, else an exact search)
        assigned_head        (M,) array: head assigned to each subpopulation, -1 when M > K leaves one unmatched
        assignment_accuracy  mean accuracy over the matched pairs
        assignment_method    "hungarian", "exact" or "greedy"
    """
    deltas = _to_numpy(head_deltas, "head_deltas", ndim=2)
    labels = _to_numpy(subpopulation_labels, "subpopulation_labels", ndim=2)
    if labels.shape[0] != deltas.shape[0]:
        raise ValueError(
            f"head_deltas has {deltas.shape[0]} pairs but subpopulation_labels has {labels.shape[0]}."
        )
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("subpopulation_labels must hold only 0 and 1.")
    signs = 2.0 * labels - 1.0  # +1: chosen preferred, -1: rejected preferred
    accuracy = _correct(deltas[:, :, None] * signs[:, None, :]).mean(axis=0)  # (K, M)
    pairs, method = _best_assignment(accuracy)
    assigned_head = np.full(labels.shape[1], -1, dtype=np.int64)
    for head, subpopulation in pairs:
        assigned_head[subpopulation] = head
    return {
        "accuracy": accuracy,
        "best_head": accuracy.argmax(axis=0),
        "best_head_accuracy": accuracy.max(axis=0),
        "assignment": pairs,
        "assigned_head": assigned_head,
        "assignment_accuracy": float(np.mean([accuracy[h, m] for h, m in pairs])),
        "assignment_method": method,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Adaptation curves and summaries
# ---------------------------------------------------------------------------------------------------------------------


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


def format_accuracy_cell(mean: float, std: float, num_seeds: int) -> str:
    """An accuracy in percent, with "± std" over seeds when there are several; "n/a" when undefined."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if num_seeds > 1:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{100 * mean:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _accuracy_section(summary: dict, reference_methods: Mapping[str, str] | None) -> list[str]:
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


def _adaptation_section(rows: Sequence[Mapping]) -> list[str]:
    counts = sorted({int(row["num_pairs"]) for row in rows})
    series = list(dict.fromkeys((row.get("method", ""), row["context"]) for row in rows))
    cells = {(row.get("method", ""), row["context"], int(row["num_pairs"])): row for row in rows}
    table = []
    for method, context in series:
        line = [method, context]
        for count in counts:
            row = cells.get((method, context, count))
            line.append(
                "–" if row is None else format_accuracy_cell(row["accuracy"], row.get("accuracy_std", 0.0), row.get("num_seeds", 1))
            )
        table.append(line)
    header = ["method", "context", *[f"{count} pairs" for count in counts]]
    return ["## Adaptation curves", "", "Accuracy (%) by number of adaptation pairs per context.", "",
            *markdown_table(header, table), ""]


def _usage_section(usage: Mapping) -> list[str]:
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


def write_report(results: Mapping[str, Any], path_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """
    Write `<path_prefix>.json` (every entry of `results`, converted by [`to_jsonable`]) and `<path_prefix>.md`.

    `results` keys the Markdown report understands:
        methods            (required) {method: per_context_accuracy dict, or a list of them, one per seed}
                           -> table of methods × contexts with macro and worst columns (mean ± std over seeds)
        title              heading of the report
        reference_methods  {"single": name, "oracle": name} -> a "gap closed (macro)" column
        adaptation_curves  tidy rows from [`adaptation_curve`] (with a `method` key) -> accuracy by number of pairs
        head_usage         a [`head_usage`] dict, or {method: head_usage dict} -> mean weight tables
    Any other entry (configuration, timings, head matching, ...) goes to the JSON file only.

    Both paths are checked for writability before anything is computed or written; a path that cannot be written
    raises an `OSError` (e.g. `PermissionError`) naming it. A `methods` entry without per-context accuracies raises
    `ValueError`. Returns the two paths.
    """
    prefix = os.fspath(path_prefix)
    json_path, markdown_path = Path(prefix + ".json"), Path(prefix + ".md")
    ensure_writable(json_path)
    ensure_writable(markdown_path)
    if "methods" not in results:
        raise ValueError(f"results must have a 'methods' entry; it has {list(results)}.")
    summary = summarize_methods(results["methods"])
    payload = to_jsonable({**results, "summary": summary})

    lines = [f"# {results.get('title', 'Reward model evaluation')}", ""]
    lines += _accuracy_section(summary, results.get("reference_methods"))
    if results.get("adaptation_curves"):
        lines += _adaptation_section(results["adaptation_curves"])
    if results.get("head_usage"):
        lines += _usage_section(results["head_usage"])

    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    markdown_path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return json_path, markdown_path


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'trl-micro[eval]'.") from error
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: Path) -> Path:
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

    `table` is `{method: {column: accuracy}}` (e.g. `summarize_methods(...)["mean"]`) or `{method: per_context
    accuracy dict or list of them}`; in the latter case means and standard deviations over seeds are computed and
    `std` is taken from them unless given. A dashed line marks chance (0.5). Returns the PNG path.
    """
    path = ensure_writable(path)
    if table and all(_is_per_context_result(v) or not isinstance(v, Mapping) for v in table.values()):
        summary = summarize_methods(table)
        means, std = summary["mean"], std if std is not None else summary["std"]
    else:
        means = {name: dict(values) for name, values in table.items()}
    if columns is None:
        columns = list(dict.fromkeys(column for values in means.values() for column in values))
    methods = list(means)

    figure = _new_figure(max(6.0, 1.4 * len(columns) + 0.35 * len(columns) * len(methods)), 4.5)
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
    return _save(figure, path)


def plot_adaptation_curves(
    curves: Sequence[Mapping] | Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    references: Mapping[str, float | Mapping[str, float]] | None = None,
    title: str = "Accuracy vs number of adaptation pairs",
    contexts: Sequence[str] | None = None,
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
        raise ValueError(f"Adaptation curve rows lack the keys {sorted(missing)}; they have {sorted(set().union(*rows))}.")
    if contexts is None:
        contexts = list(dict.fromkeys(row["context"] for row in rows))
    methods = list(dict.fromkeys(row.get("method", "method") for row in rows))
    counts = sorted({int(row["num_pairs"]) for row in rows})

    num_rows = math.ceil(len(contexts) / 3)
    num_columns = math.ceil(len(contexts) / num_rows)
    figure = _new_figure(4.2 * num_columns + 2.2, 3.6 * num_rows + 0.6)
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
        panel.set_xlabel("adaptation pairs per context")
        panel.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("pairwise accuracy")
    handles, labels = {}, {}
    for panel in panels:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), loc="outside right upper", frameon=False)
    figure.suptitle(title)
    return _save(figure, path)


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
    matrix = _to_numpy(usage, "usage", ndim=2)
    if matrix.shape[0] != len(context_names):
        raise ValueError(f"usage has {matrix.shape[0]} rows but {len(context_names)} context names were given.")
    num_heads = matrix.shape[1]
    head_names = list(head_names) if head_names is not None else [f"head {k}" for k in range(num_heads)]
    figure = _new_figure(1.1 * num_heads + 3.0, 0.6 * len(context_names) + 1.8)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(1.0, float(matrix.max())), aspect="auto")
    for row, column in itertools.product(range(matrix.shape[0]), range(num_heads)):
        value = matrix[row, column]
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=9,
                  color="black" if value > 0.6 else "white")
    axes.set_xticks(range(num_heads), head_names)
    axes.set_yticks(range(len(context_names)), list(context_names))
    axes.set_xlabel("reward head")
    axes.set_ylabel("context")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="mean weight")
    return _save(figure, path)
