r"""
Choosing which pairs a user labels (Stage 2 that asks the right questions).

Online routing keeps a posterior pi over the K heads for each user (`trl_micro.personalization.online_router`). A candidate pair i,
unlabelled, with head margins m_ik = r_k(a_i) - r_k(b_i), is answered "a over b" under head k with the Bradley-Terry
probability p_ik = sigmoid(m_ik); before the answer, the user's predictive probability is pbar_i = sum_k pi_k p_ik.
How much the answer y_i tells about which head the user follows is the mutual information between y_i and the head
(BALD: Houlsby et al., 2011), with H the binary entropy:

    I(y_i; k)  =  H(pbar_i)  -  sum_k pi_k H(p_ik)

It is zero when every head the posterior weighs ranks the pair alike (p_ik equal), and largest when heads that the
posterior still weighs disagree confidently. `"disagreement"` is the cheaper rule: the variance of p_ik under pi,

    D_i  =  sum_k pi_k (p_ik - pbar_i)^2

and `"random"` is the baseline. Both scores are O(K) per candidate from stored margins (`score_preference_pairs`);
neither depends on which side of a pair is called chosen, so a labelled pool can be ranked without its labels.

Sequentially (ask one, update the posterior with the answer, ask the next: [`choose_pairs_to_label`]) each choice is
the best single question. Choosing n at once ([`select_queries`]) is greedy on the joint information of the batch
(BatchBALD: Kirsch et al., 2019): the gain of adding pair i to a chosen set S is

    I(y_S, y_i; k) - I(y_S; k)  =  sum_c P(c) H(pbar_i | c)  -  sum_k pi_k H(p_ik)

over the possible answers c to S, each with its posterior pi|c, so a second copy of a question already chosen adds
little. The answers are enumerated exactly while there are at most `max_answer_sets`, then resampled to that many by
their probability (seeded). The disagreement rule takes the same expectation, sum_c P(c) D_i|c.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..value_checks import normalize_user_id
from .online_router import OnlineRouter

QUERY_STRATEGIES = ("random", "information", "disagreement")
MAX_ANSWER_SETS = 256
_EPS = 1e-12


def _as_margins(head_margins, name: str = "head_margins") -> np.ndarray:
    margins = np.asarray(head_margins.detach().cpu() if isinstance(head_margins, torch.Tensor) else head_margins)
    if margins.ndim != 2 or margins.shape[1] < 1:
        raise ValueError(f"`{name}` must be (num_candidates, num_heads), got shape {margins.shape}.")
    margins = margins.astype(np.float64)
    if not np.isfinite(margins).all():
        raise ValueError(f"`{name}` has values that are not finite numbers.")
    return margins


def _as_weights(weights, num_heads: int) -> np.ndarray:
    weights = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if weights.shape != (num_heads,):
        raise ValueError(f"`weights` must be one weight per head ({num_heads},), got shape {weights.shape}.")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("`weights` must be finite, non-negative and not all zero (a posterior over the heads).")
    return weights / weights.sum()


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def _label_probabilities(margins: np.ndarray) -> np.ndarray:
    """p_ik = sigmoid(m_ik), computed without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * margins))


def _gains(p: np.ndarray, pi: np.ndarray, posteriors: np.ndarray, probabilities: np.ndarray, strategy: str):
    """
    (N,) the score of each candidate (label probabilities p (N, K) under the heads) given the answer sets so far, each
    with its posterior (C, K) and probability (C,): the expected information (BALD) or disagreement of the module
    docstring. One answer set holding the posterior `pi` is the score of a single question.
    """
    predictive = posteriors @ p.T  # (C, N): pbar_i | c
    if strategy == "information":
        return probabilities @ _binary_entropy(predictive) - _binary_entropy(p) @ pi
    return probabilities @ (posteriors @ (p**2).T - predictive**2)


def _single_question(head_margins, weights, strategy: str) -> np.ndarray:
    margins = _as_margins(head_margins)
    pi = _as_weights(weights, margins.shape[1])
    return np.maximum(_gains(_label_probabilities(margins), pi, pi[None, :], np.ones(1), strategy), 0.0)


def expected_information(head_margins, weights) -> np.ndarray:
    """(N,) I(y_i; k) in nats: what the label of each candidate tells about the head (module docstring)."""
    return _single_question(head_margins, weights, "information")


def head_disagreement(head_margins, weights) -> np.ndarray:
    """(N,) the variance under the posterior of the heads' label probabilities (module docstring)."""
    return _single_question(head_margins, weights, "disagreement")


def select_queries(
    head_margins,
    weights,
    num_queries: int,
    strategy: str = "information",
    seed: int = 0,
    exclude: Sequence[int] = (),
    max_answer_sets: int = MAX_ANSWER_SETS,
) -> list[int]:
    """
    Indices of `num_queries` candidates to ask, best first, chosen together (module docstring).

    Args:
        head_margins (`(N, K)`): per-head margins of the unlabelled candidates (either orientation).
        weights (`(K,)`): the user's current posterior over the heads (`OnlineRouter.weights(user)`).
        num_queries (`int`): how many to choose (at most the candidates left after `exclude`).
        strategy (`str`): `"information"` (BALD, greedy joint information), `"disagreement"` or `"random"`.
        seed (`int`): the seed of `"random"` and of resampling the answer sets.
        exclude (`Sequence[int]`): candidates never to choose (e.g. those already asked).
        max_answer_sets (`int`): answer sets kept exactly before resampling (see the module docstring).
    """
    if strategy not in QUERY_STRATEGIES:
        raise ValueError(f"`strategy` must be one of {QUERY_STRATEGIES}, got {strategy!r}.")
    margins = _as_margins(head_margins)
    pi = _as_weights(weights, margins.shape[1])
    available = np.ones(len(margins), dtype=bool)
    excluded = np.asarray(list(exclude), dtype=np.int64)
    if excluded.size and (excluded.min() < 0 or excluded.max() >= len(margins)):
        raise ValueError(f"`exclude` holds indices outside the {len(margins)} candidates.")
    available[excluded] = False
    if not isinstance(num_queries, (int, np.integer)) or isinstance(num_queries, bool) or num_queries < 0:
        raise ValueError(f"`num_queries` must be an integer >= 0, got {num_queries!r}.")
    if num_queries > available.sum():
        raise ValueError(f"`num_queries` is {num_queries} but only {int(available.sum())} candidates are left to ask.")
    if max_answer_sets < 1:
        raise ValueError(f"`max_answer_sets` must be >= 1, got {max_answer_sets}.")
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return [int(i) for i in rng.permutation(np.flatnonzero(available))[:num_queries]]

    p = _label_probabilities(margins)  # (N, K)
    posteriors, probabilities = pi[None, :], np.ones(1)  # the answer sets c: pi | c and P(c)
    chosen: list[int] = []
    for _ in range(num_queries):
        gain = np.where(available, _gains(p, pi, posteriors, probabilities, strategy), -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        # Each answer set splits on the new question's answer: posterior times the head's probability of that answer.
        yes = posteriors * p[best]
        no = posteriors * (1.0 - p[best])
        joint = np.concatenate([yes * probabilities[:, None], no * probabilities[:, None]])
        probabilities = joint.sum(axis=1)
        posteriors = joint / np.maximum(probabilities[:, None], _EPS)
        probabilities = probabilities / probabilities.sum()
        if len(probabilities) > max_answer_sets:
            keep = rng.choice(len(probabilities), size=max_answer_sets, replace=True, p=probabilities)
            posteriors, probabilities = posteriors[keep], np.full(max_answer_sets, 1.0 / max_answer_sets)
    return chosen


def choose_pairs_to_label(
    user_ids: Sequence[str],
    head_margins,
    num_queries: int,
    strategy: str = "information",
    priors: dict[str, torch.Tensor] | None = None,
    eta: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """
    Rows of labelled candidate pairs (head margins `(N, K)`, chosen minus rejected) to reveal, `num_queries` per
    user, asked one at a time as a user would answer them: each question is chosen under the user's posterior so
    far, then its label (the pool's own orientation) updates that posterior. `priors[c]` starts user c (uniform
    when None; `adaptation.router_priors` gives the model router's). Returns rows in asking order, user by
    user.
    """
    user_ids = [normalize_user_id(user, f"user_ids[{row}]") for row, user in enumerate(user_ids)]
    margins = torch.as_tensor(head_margins).double()
    if len(user_ids) != margins.shape[0]:
        raise ValueError(f"{len(user_ids)} user ids for {margins.shape[0]} scored candidate pairs.")
    router = OnlineRouter(num_heads=margins.shape[1], eta=eta)
    chosen_rows: list[int] = []
    for index, user in enumerate(sorted(set(user_ids))):
        rows = [row for row, other in enumerate(user_ids) if other == user]
        if num_queries > len(rows):
            raise ValueError(f"User {user!r} has {len(rows)} candidate pairs; {num_queries} were asked for.")
        prior = None if priors is None else priors[user]
        asked: list[int] = []
        for step in range(num_queries):
            weights = router.weights(user, prior=prior, dtype=torch.float64)
            (pick,) = select_queries(
                margins[rows], weights, 1, strategy, seed=seed + 7919 * index + step, exclude=asked
            )
            asked.append(pick)
            router.update(user, margins[rows[pick]], prior=prior)
        chosen_rows += [rows[pick] for pick in asked]
    return chosen_rows
