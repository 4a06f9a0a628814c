r"""
Synthetic personalized preferences: M hidden subpopulations that judge the same responses differently.

The generative model:

- A prompt is an everyday request, a template filled with a topic ("How can I sleep better?").
- A response to it has a style s in {0, 1}^A, one bit per style axis (length, formality, structure, caution,
  enthusiasm, examples), and its text is assembled from phrase banks so that every axis is visible in the words.
- Subpopulation m has a weight vector w_m over the axes and utility u_m(s) = w_m . s. It prefers response a over b
  with probability sigmoid((u_m(s_a) - u_m(s_b)) / label_noise); `label_noise=0` gives the deterministic argmax.
- Each row is one comparison by one subpopulation, shown with the subpopulation's context, a natural-language
  description of its taste. Pairs on which the subpopulation is indifferent are never drawn, and a chosen fraction
  of pairs are ones that some other subpopulation would label the other way.

The subpopulations are designed to conflict (concise and casual vs thorough and formal, cautious vs risk-tolerant,
...), so one Bradley-Terry reward cannot fit them all.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
from dataclasses import dataclass

from datasets import Dataset

from .synthetic_texts import AXES, MAX_SUBPOPULATIONS, PROMPT_TEMPLATES, SUBPOPULATIONS, TOPICS, render_response


@dataclass
class SyntheticPreferenceConfig:
    """
    Options of [`generate_synthetic_preferences`].

    Args:
        num_subpopulations (`int`, defaults to 2):
            M, how many of the designed subpopulations rate (the first M of `SUBPOPULATIONS`, at most 8).
        num_pairs_per_subpopulation (`int`, defaults to 200):
            Rows labelled by each subpopulation; the dataset has M times as many rows.
        num_prompts (`int`, *optional*):
            Distinct prompts to draw from the templates x topics grid (240 of them); all when unset.
        axes (`tuple[str, ...]`, defaults to all of `AXES`):
            Style axes that vary between responses; the others stay at bit 0. Style vectors list these axes in order.
        label_noise (`float`, defaults to 0.0):
            Bradley-Terry temperature of the labels; 0 labels every pair by the argmax of utility.
        conflict_fraction (`float`, defaults to 0.5):
            Fraction of each subpopulation's pairs drawn among pairs that some other selected subpopulation ranks the
            other way; the rest are drawn uniformly (and often conflict too). Ignored when M is 1.
        context_paraphrase (`bool`, defaults to `False`):
            Show each row with a paraphrase of its subpopulation's context instead of the original description.
        conversational (`bool`, defaults to `False`):
            Chat messages (`[{"role": "user", ...}]`, `[{"role": "assistant", ...}]`) instead of plain strings.
        seed (`int`, defaults to 0):
            The dataset is a function of the config, this seed included.
    """

    num_subpopulations: int = 2
    num_pairs_per_subpopulation: int = 200
    num_prompts: int | None = None
    axes: tuple[str, ...] = AXES
    label_noise: float = 0.0
    conflict_fraction: float = 0.5
    context_paraphrase: bool = False
    conversational: bool = False
    seed: int = 0

    def __post_init__(self):
        self.axes = tuple(self.axes)
        _check_num_subpopulations(self.num_subpopulations)
        if not isinstance(self.num_pairs_per_subpopulation, int) or self.num_pairs_per_subpopulation < 1:
            raise ValueError(
                "SyntheticPreferenceConfig.num_pairs_per_subpopulation must be an integer >= 1, "
                f"got {self.num_pairs_per_subpopulation!r}."
            )
        grid_size = len(TOPICS) * len(PROMPT_TEMPLATES)
        if self.num_prompts is not None and (
            not isinstance(self.num_prompts, int) or not 1 <= self.num_prompts <= grid_size
        ):
            raise ValueError(
                f"SyntheticPreferenceConfig.num_prompts must be an integer in [1, {grid_size}], "
                f"got {self.num_prompts!r}."
            )
        unknown = [axis for axis in self.axes if axis not in AXES]
        if not self.axes or unknown or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"SyntheticPreferenceConfig.axes must be distinct names among {AXES}, got {self.axes!r}.")
        if not self.label_noise >= 0:
            raise ValueError(f"SyntheticPreferenceConfig.label_noise must be >= 0, got {self.label_noise!r}.")
        if not 0 <= self.conflict_fraction <= 1:
            raise ValueError(
                f"SyntheticPreferenceConfig.conflict_fraction must be in [0, 1], got {self.conflict_fraction!r}."
            )
        for m, n in itertools.combinations(range(self.num_subpopulations), 2):
            if not any(_disagree(a, b, m, n, self.axes) for a, b in _style_pairs(len(self.axes))):
                raise ValueError(
                    f"SyntheticPreferenceConfig.axes {self.axes!r} leave subpopulations {m} and {n} with the same "
                    "preferences; add axes."
                )


def subpopulation_contexts(num_subpopulations: int) -> list[str]:
    """Context descriptions of the first `num_subpopulations` subpopulations."""
    _check_num_subpopulations(num_subpopulations)
    return [population.context for population in SUBPOPULATIONS[:num_subpopulations]]


def subpopulation_paraphrases(subpopulation: int) -> list[str]:
    """Other wordings of subpopulation `subpopulation`'s context, for testing routing on unseen contexts."""
    _check_subpopulation(subpopulation)
    return list(SUBPOPULATIONS[subpopulation].paraphrases)


def utility(style, subpopulation: int, axes: tuple[str, ...] = AXES) -> float:
    """u_m(s) = w_m . s, with `style` listing the bits of `axes` in order."""
    _check_subpopulation(subpopulation)
    weights = SUBPOPULATIONS[subpopulation].weights
    return sum(weights[axis] * bit for axis, bit in zip(axes, style, strict=True))


def true_preference(style_a, style_b, subpopulation: int, axes: tuple[str, ...] = AXES) -> int:
    """1 if `subpopulation` prefers the response of style `style_a`, -1 if the one of `style_b`, 0 if indifferent."""
    difference = utility(style_a, subpopulation, axes) - utility(style_b, subpopulation, axes)
    return 0 if abs(difference) < 1e-9 else (1 if difference > 0 else -1)


def preference_probability(
    style_a, style_b, subpopulation: int, axes: tuple[str, ...] = AXES, label_noise: float = 0.0
) -> float:
    """P(a preferred over b) = sigmoid((u_m(a) - u_m(b)) / label_noise); the step function when `label_noise` is 0."""
    difference = utility(style_a, subpopulation, axes) - utility(style_b, subpopulation, axes)
    if label_noise == 0:
        return 0.5 if abs(difference) < 1e-9 else float(difference > 0)
    return 1.0 / (1.0 + math.exp(-difference / label_noise))


def generate_synthetic_preferences(config: SyntheticPreferenceConfig | None = None) -> Dataset:
    """
    A preference dataset in TRL's explicit-prompt format (`prompt`, `chosen`, `rejected`, responses without EOS),
    with the columns `context`, `context_id` ("subpop-m"), `subpopulation` (m), `topic` (index into `TOPICS`) and the
    ground-truth styles `chosen_style` / `rejected_style` (bits of `config.axes`). Rows are shuffled.
    """
    config = config or SyntheticPreferenceConfig()
    rng = random.Random(config.seed)
    grid = list(itertools.product(range(len(TOPICS)), range(len(PROMPT_TEMPLATES))))
    prompts = rng.sample(grid, config.num_prompts or len(grid))
    num_axes = len(config.axes)
    subpopulations = range(config.num_subpopulations)

    rows = []
    for m in subpopulations:
        decided = [(a, b) for a, b in _style_pairs(num_axes) if true_preference(a, b, m, config.axes) != 0]
        others = [n for n in subpopulations if n != m]
        contested = [(a, b) for a, b in decided if any(_disagree(a, b, m, n, config.axes) for n in others)]
        for _ in range(config.num_pairs_per_subpopulation):
            pool = contested if contested and rng.random() < config.conflict_fraction else decided
            style_a, style_b = rng.choice(pool)
            if rng.random() < 0.5:
                style_a, style_b = style_b, style_a
            p_a = preference_probability(style_a, style_b, m, config.axes, config.label_noise)
            chosen, rejected = (style_a, style_b) if rng.random() < p_a else (style_b, style_a)
            topic_index, template_index = rng.choice(prompts)
            topic = TOPICS[topic_index]
            prompt = PROMPT_TEMPLATES[template_index].format(goal=topic.goal)
            chosen_text = render_response(topic, _full_style(chosen, config.axes), rng)
            rejected_text = render_response(topic, _full_style(rejected, config.axes), rng)
            population = SUBPOPULATIONS[m]
            context = rng.choice(population.paraphrases) if config.context_paraphrase else population.context
            if config.conversational:
                prompt = [{"role": "user", "content": prompt}]
                chosen_text = [{"role": "assistant", "content": chosen_text}]
                rejected_text = [{"role": "assistant", "content": rejected_text}]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen_text,
                    "rejected": rejected_text,
                    "context": context,
                    "context_id": f"subpop-{m}",
                    "subpopulation": m,
                    "topic": topic_index,
                    "chosen_style": list(chosen),
                    "rejected_style": list(rejected),
                }
            )
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def rated_by_topic_owner(dataset: Dataset, num_subpopulations: int) -> Dataset:
    """
    The rows whose rater owns the prompt's topic (subpopulation = topic index mod `num_subpopulations`): data in which
    who rates depends on the prompt, as in HH-RLHF, where harmlessness raters got red-teaming prompts. Mixture modeling
    without context labels can split such data into one head per subpopulation, its router telling them apart by the
    prompt; evaluation data that mixes every topic then needs the context to say who rates.
    """
    if num_subpopulations < 1:
        raise ValueError(f"num_subpopulations must be >= 1, got {num_subpopulations}.")
    missing = {"topic", "subpopulation"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"rated_by_topic_owner needs the generator's columns {sorted(missing)}.")
    return dataset.filter(
        lambda row: row["topic"] % num_subpopulations == row["subpopulation"], desc="Keeping topic owners' ratings"
    )


def _full_style(bits, axes: tuple[str, ...]) -> dict[str, int]:
    style = dict.fromkeys(AXES, 0)
    style.update(zip(axes, bits, strict=True))
    return style


def _style_pairs(num_axes: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every unordered pair of distinct style vectors."""
    return list(itertools.combinations(itertools.product((0, 1), repeat=num_axes), 2))


def _disagree(style_a, style_b, m: int, n: int, axes: tuple[str, ...]) -> bool:
    """Both subpopulations have a strict preference, and they are opposite."""
    return true_preference(style_a, style_b, m, axes) * true_preference(style_a, style_b, n, axes) < 0


def _check_num_subpopulations(num_subpopulations) -> None:
    if not isinstance(num_subpopulations, numbers.Integral) or not 1 <= num_subpopulations <= MAX_SUBPOPULATIONS:
        raise ValueError(
            f"num_subpopulations must be an integer in [1, {MAX_SUBPOPULATIONS}], got {num_subpopulations!r}."
        )


def _check_subpopulation(subpopulation) -> None:
    if not isinstance(subpopulation, numbers.Integral) or not 0 <= subpopulation < MAX_SUBPOPULATIONS:
        raise ValueError(f"subpopulation must be an integer in [0, {MAX_SUBPOPULATIONS - 1}], got {subpopulation!r}.")
