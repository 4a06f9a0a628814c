"""What each head of a checkpoint prefers, measured on scored pairs (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from ..evaluation import head_accuracy, head_usage
from ..scoring import PairScores

CONTEXT_ID_COLUMN = "context_id"
ALL_PAIRS = "all pairs"
NUM_EXAMPLES = 3
CLEAR_LENGTH_CORRELATION = 0.3


@dataclass
class Example:
    reward: float
    prompt: str
    response: str


@dataclass
class HeadCard:
    """What one head prefers, measured on scored pairs (see the module docstring)."""

    head: int
    routed_share: float
    mean_weight: float
    accuracy: float
    accuracy_per_context: dict[str, float] = field(default_factory=dict)
    length_correlation: float | None = None
    top: list[Example] = field(default_factory=list)
    bottom: list[Example] = field(default_factory=list)


def message_text(value) -> str:
    """The text of a prompt or response: the string itself, or the contents of a list of messages."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return "\n".join(str(message.get("content", "")) for message in value if isinstance(message, dict))


def pair_contexts(pairs: Dataset, context_column: str | None) -> list[str] | None:
    """Each pair's context label (`context_id`, else the context text), or `None` when a pair has none."""
    for column in (CONTEXT_ID_COLUMN, context_column):
        if column and column in pairs.column_names:
            values = pairs[column]
            if all(value not in (None, "") for value in values):
                return [str(value) for value in values]
    return None


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two vectors; `None` when either is constant."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def measure_heads(scores: PairScores, pairs: Dataset, context_column: str | None = "context") -> dict:
    """
    The head cards of scored `pairs` (rows of a preference dataset, `scores` from `score_preference_pairs`):
    `{"num_pairs", "contexts" (labels, or None), "heads": [HeadCard], "usage": evaluation.head_usage(...)}`.
    """
    if scores.head_rewards is None:
        raise ValueError("measure_heads needs per-response head rewards (PairScores.head_rewards).")
    weights, margins = scores.mixture_weights.numpy(), scores.head_margins.numpy()
    rewards = scores.head_rewards.numpy().reshape(-1, margins.shape[1])  # chosen, rejected of pair 0, then pair 1...
    contexts = pair_contexts(pairs, context_column)
    labels = contexts or [ALL_PAIRS] * len(margins)
    accuracy, usage = head_accuracy(margins, labels), head_usage(weights, labels)
    prompts = [message_text(p) for p in pairs["prompt"]] if "prompt" in pairs.column_names else [""] * len(margins)
    responses = [message_text(r) for pair in zip(pairs["chosen"], pairs["rejected"]) for r in pair]
    lengths = np.array([len(response) for response in responses], dtype=np.float64)
    routed = weights.argmax(axis=1)
    heads = []
    for k in range(margins.shape[1]):
        order = np.argsort(rewards[:, k], kind="stable")
        examples = [Example(float(rewards[i, k]), prompts[i // 2], responses[i]) for i in order]
        per_context = {name: float(accuracy["accuracy"][k, c]) for c, name in enumerate(accuracy["contexts"])}
        heads.append(
            HeadCard(
                head=k,
                routed_share=float((routed == k).mean()),
                mean_weight=float(weights[:, k].mean()),
                accuracy=float(accuracy["overall"][k]),
                accuracy_per_context=per_context if contexts else {},
                length_correlation=pearson(rewards[:, k], lengths),
                top=examples[::-1][:NUM_EXAMPLES],
                bottom=examples[:NUM_EXAMPLES],
            )
        )
    return {"num_pairs": len(margins), "contexts": contexts, "heads": heads, "usage": usage}


def preference_summary(card: HeadCard, usage: dict) -> str:
    """One sentence on what the head prefers, from its measurements."""
    parts = []
    r = card.length_correlation
    if r is not None and abs(r) >= CLEAR_LENGTH_CORRELATION:
        parts.append(f"{'longer' if r > 0 else 'shorter'} responses (length correlation {r:+.2f})")
    if card.accuracy_per_context:
        best = max(card.accuracy_per_context, key=card.accuracy_per_context.get)
        parts.append(f"what `{best}` prefers (accuracy {card.accuracy_per_context[best]:.2f} there)")
    summary = "Prefers " + " and ".join(parts) + "." if parts else "No clear preference by response length."
    if usage["contexts"] != [ALL_PAIRS]:
        column = usage["usage"][:, card.head]
        favourite = int(np.argmax(column))
        summary += f" The router sends it `{usage['contexts'][favourite]}` most (mean weight {column[favourite]:.2f})."
    return summary
