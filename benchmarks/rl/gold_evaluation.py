r"""
How the RL personalization benchmark measures a policy: its samples on held-out prompts, judged by each context's
gold reward (`benchmarks.rl.personalization_rewards.GoldReward`).

At an evaluation, every held-out prompt (which shows its context) gets `samples_per_prompt` sampled completions
(the trainer's temperature, same seed at every evaluation so only the policy changes). Per context c:

    gold mean   mean over c's prompts and samples of g_c(x, y)
    win rate    mean over c's prompts x of  P(g_c(x, y) > g_c(x, y0)) + P(g_c(x, y) = g_c(x, y0)) / 2,
                y a sample of the evaluated policy, y0 one of the initial policy (reference samples, drawn once with
                another seed); every pair (y, y0) of the prompt counts

so the initial policy's own win rate is about 0.5, up to sampling noise. Also recorded per context: the mean number of
words and of tokens of the samples (the synthetic tastes differ on length), the cap share (the share of samples cut at
the completion budget, which a taste for longer answers runs into), and, from the trainer's log
([`add_logged_kl`]), the mean `kl` to the initial policy over the steps since the previous evaluation (logged by TRL
when `beta > 0`).

The cross-context matrix tells personalization from a better average: the answers to the prompts shown under context
a, judged by the gold reward of every context b (the prompt then shown under b, as b's gold was trained), as a win
rate over the initial policy's answers under a judged the same way. A policy that serves each context its own way
wins on the diagonal (b = a) and not off it where the tastes conflict.
"""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_micro.data_utils import join_context
from trl_micro.scripts.rl_utils import sample_completions

from .personalization_rewards import GoldReward


def win_rate(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(P,) per prompt: P(a > b) + P(a = b) / 2 over every pair of a row of `samples` (P, S) and `reference` (P, R)."""
    difference = samples[:, :, None] - reference[:, None, :]
    return ((difference > 0).float() + 0.5 * (difference == 0).float()).mean(dim=(1, 2))


class GoldEvaluation(TrainerCallback):
    """
    Evaluate the policy with the gold reward at step 0 and every `every` steps (and at the last step); see the module
    docstring. One object serves every run of the benchmark: the reference samples of the initial policy are drawn at
    the start of the first run (every run starts from the same initial policy) and kept. `points` holds the current
    run's evaluations and `seconds` the time they took; `start_run` clears both.

    Args:
        prompts (`Dataset`): held-out prompts: `prompt` showing the context, `context_id`, and for the cross-context
            matrix `query` (the prompt without its context) and `context` (the text shown).
        gold ([`GoldReward`]): the judge.
        every (`int`): evaluate every this many steps.
        samples_per_prompt (`int`): samples of the evaluated policy per prompt.
        reference_samples (`int`): samples of the initial policy per prompt.
        max_new_tokens (`int`): sample length, as in training.
        generation_kwargs (`dict`): sampling settings, as in training (`temperature`, `top_p`, `top_k`).
        seed (`int`): seed of the evaluated samples (the reference uses `seed + 1`).
        batch_size (`int`): prompts per `generate` call (on CPU one decode step over 64 prompts costs a fraction of
            eight steps over 8: large batches are the cheap way to sample).
        context_template (`str`): how a context joins a `query` when another context's gold judges it (the
            template the prompts were shown with).
    """

    def __init__(
        self,
        prompts: Dataset,
        gold: GoldReward,
        every: int,
        samples_per_prompt: int,
        reference_samples: int,
        max_new_tokens: int,
        generation_kwargs: dict,
        seed: int = 0,
        batch_size: int = 64,
        context_template: str = "{context}\n\n",
    ):
        if every < 1 or samples_per_prompt < 1 or reference_samples < 1:
            raise ValueError("every, samples_per_prompt and reference_samples must be >= 1.")
        missing = {"prompt", "context_id", "query", "context"} - set(prompts.column_names)
        if missing:
            raise ValueError(
                f"The held-out prompts lack the columns {sorted(missing)}; they have {prompts.column_names}."
            )
        self.prompts = prompts
        self.gold = gold
        self.every = every
        self.samples_per_prompt = samples_per_prompt
        self.reference_samples = reference_samples
        self.max_new_tokens = max_new_tokens
        self.generation_kwargs = generation_kwargs
        self.seed = seed
        self.batch_size = batch_size
        self.context_template = context_template
        self.contexts = sorted(set(prompts["context_id"]))
        self.shown = {}  # context id -> the context text its prompts show (the first, if several)
        for context_id, context in zip(prompts["context_id"], prompts["context"]):
            self.shown.setdefault(context_id, context)
        self.rows = {c: [i for i, value in enumerate(prompts["context_id"]) if value == c] for c in self.contexts}
        self.reference: dict | None = None  # the initial policy's draw (see `draw`)
        self.points: list[dict] = []
        self.seconds = 0.0  # spent evaluating in the current run

    def start_run(self) -> None:
        self.points, self.seconds = [], 0.0

    # ------------------------------------------------------------------------------------------------ sampling
    def draw(self, policy, tokenizer, samples: int, seed: int) -> dict:
        """
        `samples` completions per held-out prompt: `gold` `{judge: (P, samples)}` rewards under every context's gold
        (the prompt shown under the judge's context), and `words`, `tokens`, `capped` (P, samples).
        """
        prompts = [prompt for prompt in self.prompts["prompt"] for _ in range(samples)]
        queries = [query for query in self.prompts["query"] for _ in range(samples)]
        with torch.random.fork_rng(devices=[]):  # the training run's random stream is left as it was
            torch.manual_seed(seed)
            completions, tokens, capped = sample_completions(
                policy,
                tokenizer,
                prompts,
                self.max_new_tokens,
                self.batch_size,
                return_lengths=True,
                **self.generation_kwargs,
            )
        shape = (len(self.prompts), samples)
        gold = {}
        for judge in self.contexts:
            shown = [join_context(query, self.shown[judge], self.context_template) for query in queries]
            gold[judge] = self.gold.score(shown, completions, [judge] * len(shown)).view(shape)
        texts = [completion[0]["content"] if isinstance(completion, list) else completion for completion in completions]
        return {
            "gold": gold,
            "words": torch.tensor([float(len(text.split())) for text in texts]).view(shape),
            "tokens": torch.tensor(tokens, dtype=torch.float32).view(shape),
            "capped": torch.tensor(capped, dtype=torch.float32).view(shape),
        }

    def evaluate(self, policy, tokenizer, step: int) -> dict:
        started = time.perf_counter()
        if self.reference is None:
            self.reference = self.draw(policy, tokenizer, self.reference_samples, self.seed + 1)
        drawn = self.draw(policy, tokenizer, self.samples_per_prompt, self.seed)
        point = {key: {} for key in ("gold", "win_rate", "words", "tokens", "cap_share", "cross_win_rate")}
        point["step"] = step
        for context, rows in self.rows.items():
            point["gold"][context] = drawn["gold"][context][rows].mean().item()
            point["words"][context] = drawn["words"][rows].mean().item()
            point["tokens"][context] = drawn["tokens"][rows].mean().item()
            point["cap_share"][context] = drawn["capped"][rows].mean().item()
            point["cross_win_rate"][context] = {
                judge: win_rate(drawn["gold"][judge][rows], self.reference["gold"][judge][rows]).mean().item()
                for judge in self.contexts
            }
            point["win_rate"][context] = point["cross_win_rate"][context][context]
        self.points.append(point)
        self.seconds += time.perf_counter() - started
        return point

    def reference_summary(self) -> dict:
        """Gold mean, words, tokens and cap share per context of the initial policy's reference samples."""
        summary = {key: {} for key in ("gold", "words", "tokens", "cap_share")}
        for context, rows in self.rows.items():
            summary["gold"][context] = self.reference["gold"][context][rows].mean().item()
            summary["words"][context] = self.reference["words"][rows].mean().item()
            summary["tokens"][context] = self.reference["tokens"][rows].mean().item()
            summary["cap_share"][context] = self.reference["capped"][rows].mean().item()
        return summary

    # ------------------------------------------------------------------------------------------------ callback
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.evaluate(model, processing_class, 0)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(model, processing_class, state.global_step)


def add_logged_kl(points: list[dict], log_history: list[dict]) -> None:
    """Give each point after the first `kl`: the mean logged `kl` of the steps since the previous point (or None)."""
    for previous, point in zip(points, points[1:]):
        steps = range(previous["step"] + 1, point["step"] + 1)
        values = [entry["kl"] for entry in log_history if "kl" in entry and entry.get("step", 0) in steps]
        point["kl"] = sum(values) / len(values) if values else None
