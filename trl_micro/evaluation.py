r"""
What `trl-micro eval` measures: pairwise and per-context accuracy, per-head accuracy and head usage. The JSON +
Markdown report and the plots of these are in `trl_micro.evaluation_reports`.

Everything here is a pure function of per-pair arrays (torch tensors, numpy arrays or lists):

    head_deltas      (N, K)  r_k(x, y_chosen) - r_k(x, y_rejected) for every head k
    deltas           (N,)    a method's final reward margin r(x, y_chosen | c) - r(x, y_rejected | c)
    mixture_weights  (N, K)  the weights w_k(x, c) a router gave each pair (rows sum to 1)
    contexts         (N,)    each pair's context label (str), e.g. "helpful" / "harmless"

A pair counts as correct when its margin is positive; a tie (margin exactly 0) counts one half.

"""

from __future__ import annotations

from typing import Any

import numpy as np

from .deprecation import moved_names

SUMMARY_COLUMNS = ("macro", "worst")


# ---------------------------------------------------------------------------------------------------------------------
# Array helpers
# ---------------------------------------------------------------------------------------------------------------------


def as_numpy(values: Any, name: str, ndim: int | None = None) -> np.ndarray:
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


def _mixture_weights(mixture_weights: Any) -> np.ndarray:
    weights = as_numpy(mixture_weights, "mixture_weights", ndim=2)
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
# Accuracy and head usage
# ---------------------------------------------------------------------------------------------------------------------


def pairwise_accuracy(deltas: Any) -> float:
    """Fraction of pairs whose margin `deltas` (N,) is positive; ties count 0.5."""
    return float(_correct(as_numpy(deltas, "deltas", ndim=1)).mean())


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
    values = as_numpy(deltas, "deltas", ndim=1)
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


def head_accuracy(head_deltas: Any, contexts: Any) -> dict:
    """
    Accuracy of every head on every context.

    Returns `{"contexts": [C names], "accuracy": (K, C) array, "overall": (K,) array, "count": {context: n}}`, where
    `accuracy[k, c]` is head k's pairwise accuracy on context c's pairs.
    """
    deltas = as_numpy(head_deltas, "head_deltas", ndim=2)
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


__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        (
            "to_jsonable",
            "ensure_writable",
            "markdown_table",
            "accuracy_lines",
            "head_usage_lines",
            "write_report",
            "new_figure",
            "save_figure",
            "plot_accuracy_per_context",
            "plot_head_usage_heatmap",
        ),
        "trl_micro.evaluation_reports",
    ),
)
