r"""
The model card of a MiCRo checkpoint (its `README.md`, what the Hub page shows): TRL's reward-model card
(`trl.trainer.utils.generate_model_card`) followed by what a reader needs to use the K heads: the model (base model,
K, router), the data, the training settings, how to load it, and one card per head, measured on the training or
evaluation pairs with the checkpoint's own router:

- routed: the share of pairs whose largest router weight is the head's, and the head's mean weight;
- accuracy: the share of pairs the head alone ranks correctly (ties count half), over all pairs and per context when
  the pairs name one (`context_id`, else the context text);
- length: the Pearson correlation, over the pairs' responses y, of the head's reward r_k(x, y) with the length of y
  in characters (positive: the head rewards longer responses);
- examples: the responses it scores highest and lowest, shortened;

plus the head-usage plot (mean router weight per head and context; matplotlib, `pip install 'trl-micro[eval]'`).
`trl-micro eval` adds its per-context table ([`add_evaluation_section`]). Each section sits between HTML comments
(`<!-- trl-micro:name -->`), so a later save or evaluation replaces its own section and keeps the others.
"""

from __future__ import annotations

import html
import logging
import os
import re
import textwrap
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from trl.trainer.utils import generate_model_card

from .bundled.catalog import is_hub_dataset_name
from .bundled.embedded import EMBEDDED_HUB_ID, is_embedded_model_path
from .evaluation import head_accuracy, head_usage, markdown_table, plot_head_usage_heatmap
from .scoring import PairScores, score_preference_pairs

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
USAGE_PLOT = "head_usage.png"
CONTEXT_ID_COLUMN = "context_id"
ALL_PAIRS = "all pairs"
NUM_EXAMPLES = 3
EXAMPLE_WIDTH = 160
CLEAR_LENGTH_CORRELATION = 0.3
TRAINING_SETTINGS = (
    "loss_type", "router_balance_coef", "router_entropy_coef", "adaptation_likelihood", "router_anchor_coef",
    "freeze_backbone", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "context_column", "prompt_marker", "seed",
)
PAPER = "[MiCRo](https://huggingface.co/papers/2505.24846)"


# ---------------------------------------------------------------------------------------------------------------------
# Measuring the heads
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Names a Hub visitor can read: no path of the machine that trained the model
# ---------------------------------------------------------------------------------------------------------------------


def card_base_model(name_or_path: str | os.PathLike | None) -> str | None:
    """
    The Hub id of the model a checkpoint was fine-tuned from: the embedded model's copy is its Hub original, a Hub id
    stays itself, a local MiCRo checkpoint passes on the base model its own card names; any other local folder has none.
    """
    if not name_or_path:
        return None
    if is_embedded_model_path(name_or_path):
        return EMBEDDED_HUB_ID
    if not os.path.isdir(name_or_path):
        return str(name_or_path)
    card = Path(name_or_path) / CARD_FILE
    base = ModelCard.load(card).data.to_dict().get("base_model") if card.is_file() else None
    return (base[0] if base else None) if isinstance(base, list) else base


def data_name(name: str | None) -> str | None:
    """How the card names training or evaluation data: a Hub or built-in name as it is, a local file by its name."""
    if not name:
        return None
    return name if is_hub_dataset_name(name) or name.startswith("trl-micro/") else Path(name).name


QUICK_START = re.compile(r"## Quick start\n.*?(?=\n## )", flags=re.DOTALL)
TRL_BASE_SENTENCE = re.compile(r"This model is a fine-tuned version of \[[^\]]*\]\([^)]*\)")


QUICK_START_TEMPLATE = Path(__file__).parent / "templates" / "quick_start.md"
CONVERSATIONAL_EXAMPLE = """\
prompt = [{"role": "system", "content": "I am a busy engineer: keep answers short."},
          {"role": "user", "content": "How do I boil an egg?"}]
completion = [{"role": "assistant", "content": "Simmer it for nine minutes, then cool it in cold water."}]"""
TEXT_EXAMPLE = ('prompt = "I am a busy engineer: keep answers short. How do I boil an egg?"\n'
                'completion = " Simmer it for nine minutes, then cool it in cold water."')


def quick_start_lines(model_id: str, conversational: bool) -> list[str]:
    """A quick start that scores one routed response, without trl-micro (`trust_remote_code`) and with it."""
    example, join = ((CONVERSATIONAL_EXAMPLE, "text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)")
                     if conversational else (TEXT_EXAMPLE, "text = prompt + completion"))
    text = QUICK_START_TEMPLATE.read_text(encoding="utf-8")
    return [*text.replace("{model_id}", model_id).replace("{example}", example).replace("{join}", join).splitlines(), ""]


def polish_trl_card(card: ModelCard, base_model: str | None, model_id: str, conversational: bool) -> ModelCard:
    """TRL's card with the base model named (or said to be local), and a quick start that loads and routes."""
    if base_model:
        card.data.base_model = base_model
        sentence = f"This model is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
    else:
        card.data.base_model = None
        sentence = "This model is a fine-tuned version of a local model"
    text = TRL_BASE_SENTENCE.sub(lambda _: sentence, card.text, count=1)
    card.text = QUICK_START.sub(lambda _: "\n".join(quick_start_lines(model_id, conversational)), text, count=1)
    return card


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def inline(text: str, width: int = EXAMPLE_WIDTH) -> str:
    """`text` on one line, shortened to `width` characters, safe inside Markdown (no HTML, no emphasis)."""
    flat = textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" …") if text.strip() else "(empty)"
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", html.escape(flat, quote=False))


def head_card_lines(card: HeadCard, usage: dict) -> list[str]:
    lines = [f"#### Head {card.head}", "", preference_summary(card, usage), ""]
    lines.append(f"- Routed to it: {100 * card.routed_share:.0f}% of pairs (mean router weight {card.mean_weight:.2f})")
    lines.append(f"- Accuracy alone: {card.accuracy:.3f}")
    r = card.length_correlation
    lines.append(f"- Reward vs response length: {'n/a (constant)' if r is None else f'Pearson r = {r:+.2f}'}")
    if card.accuracy_per_context:
        lines += ["", *markdown_table(["context", "accuracy"],
                                      [[inline(c, 60), f"{a:.3f}"] for c, a in card.accuracy_per_context.items()])]
    for title, examples in (("Top-scored responses", card.top), ("Bottom-scored responses", card.bottom)):
        lines += ["", f"{title}:", ""]
        lines += [f"- {e.reward:+.3f}: {inline(e.response)} (prompt: {inline(e.prompt, 80)})" for e in examples]
    return [*lines, ""]


def micro_section_lines(
    config, model_id: str, data: str | None, settings: dict, measurements: dict | None, plot: str | None,
    adapter: bool = False,
) -> list[str]:
    """The MiCRo part of the card: model, data, use, training settings and the head cards (`adapter`: a LoRA one)."""
    prompt_reading = "the mean over the prompt" if config.router_readout == "mean" else "the last prompt token"
    router = f"{config.router_type} router on {prompt_reading}" if config.use_router else "static mixture"
    reading = {"last": "the last token's hidden state", "mean": "the mean over the response's tokens",
               "last_mean": "the last token's hidden state and the mean over the response, side by side"}
    layer = "the backbone's output" if config.reward_layer is None else f"hidden layer {config.reward_layer}"
    readout_kwargs = "".join(f", {key}={getattr(config, key)!r}" for key in ("reward_readout", "reward_layer",
                                                                              "router_readout"))
    base = card_base_model(config._name_or_path)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    adapter_base = base or "<base model>"
    lines = [
        "## MiCRo reward model", "",
        f"A {PAPER} reward model (mixture of Bradley-Terry heads with context-aware routing), trained with trl-micro: "
        "K reward heads over one backbone and a router that reads the prompt (and any context in it) to weight them. "
        "The routed reward is `logits`.", "",
        f"- Base model: {base_text} ({config.text_config.model_type}, hidden size {config.hidden_size})",
        f"- Heads: K = {config.num_heads}; readout: `{config.reward_readout}` of {layer} "
        f"({reading[config.reward_readout]}); routing: {router}",
        f"- Data: {inline(data, 200) if data else 'not recorded'}",
        f"- Context template: `{config.context_template!r}`" + (
            f"; prompts end with `{config.prompt_marker!r}`" if config.prompt_marker else ""),
        "", "### Use it", "",
        *([f"This folder holds a LoRA adapter with the heads and router: merge it first, "
           f"`PeftModel.from_pretrained(MiCRoRewardModel.from_backbone(\"{adapter_base}\", num_heads={config.num_heads}"
           f"{readout_kwargs}), "
           f"\"{model_id}\").merge_and_unload().save_pretrained(merged)` (with its tokenizer), then use the merged "
           "folder as below.", ""] if adapter else []),
        "With TRL's own scripts (no trl-micro needed; each completion is routed on its prompt):", "",
        "```bash",
        f"trl grpo --model_name_or_path <policy> --reward_model_name_or_path {model_id} --trust_remote_code ...",
        "```", "",
        "In Python (see the quick start), the model returns `logits` (the routed reward), `head_rewards` (one per "
        "head) and `mixture_weights`; trl-micro's `MiCRoReward` routes each row by its own context column or, with "
        "per-user stores, by user id.", "",
    ]
    if settings:
        lines += ["### Training settings", "", *markdown_table(["setting", "value"],
                                                             [[k, "not set" if v is None else f"`{v!r}`"]
                                                              for k, v in settings.items()]), ""]
    lines += ["### Heads", ""]
    if measurements is None:
        return [*lines, "Not measured (no pairs were available when this checkpoint was saved).", ""]
    lines += [f"Measured on {measurements['num_pairs']} {measurements['source']} pairs with this checkpoint's "
              "router. Length is counted in characters.", ""]
    if plot:
        lines += [f"![Mean router weight per head and context]({plot})", ""]
    for card in measurements["heads"]:
        lines += head_card_lines(card, measurements["usage"])
    return lines


def replace_section(text: str, name: str, lines: list[str]) -> str:
    """`text` with its section `name` (between `<!-- trl-micro:name -->` comments) replaced by `lines`, or added."""
    start, end = f"<!-- trl-micro:{name} -->", f"<!-- /trl-micro:{name} -->"
    block = "\n".join([start, *lines, end])
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_card_section(directory: str | os.PathLike, name: str, lines: list[str]) -> Path:
    """Put section `name` into `<directory>/README.md`, starting from TRL's reward-model card when there is none."""
    path = Path(directory) / CARD_FILE
    if path.exists():
        card = ModelCard.load(path)
    else:
        model_id = Path(directory).name
        card = generate_model_card(
            base_model=None, model_name=model_id, hub_model_id=model_id,
            dataset_name=None, tags=["trl-micro", "reward-model"], wandb_url=None, trackio_url=None,
            trainer_name="MiCRo Reward", template_file="rm_model_card.md",
        )
        card = polish_trl_card(card, None, model_id, conversational=True)
    card.text = replace_section(card.text, name, lines)
    card.save(path)
    return path


def add_evaluation_section(model_dir: str | os.PathLike, dataset_name: str, lines: list[str]) -> Path:
    """Add (or replace) the evaluation of `dataset_name` in the card of the local checkpoint `model_dir`."""
    shown = data_name(dataset_name)
    return write_card_section(model_dir, f"eval:{shown}", [f"## Evaluation on {shown}", "", *lines])


# ---------------------------------------------------------------------------------------------------------------------
# The trainers' side
# ---------------------------------------------------------------------------------------------------------------------


def sample_pairs(dataset, num_pairs: int, seed: int) -> Dataset | None:
    """Up to `num_pairs` rows of `dataset` (a seeded sample of a `Dataset`, the first rows of an iterable one)."""
    if dataset is None or num_pairs <= 0:
        return None
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if isinstance(dataset, Dataset):
        if len(dataset) > num_pairs:
            dataset = dataset.shuffle(seed=seed).select(range(num_pairs))
        return dataset.flatten_indices() if len(dataset) else None
    rows = list(islice(iter(dataset), num_pairs))
    return Dataset.from_list(rows) if rows else None


class MiCRoModelCardMixin:
    """
    The MiCRo trainers' card: every `save_model` measures the heads on `args.model_card_pairs` pairs (of the
    evaluation set when there is one, else of the training set; all processes take part, as DeepSpeed ZeRO-3 needs),
    and the main process writes TRL's card plus the MiCRo section (module docstring) and the head-usage plot into the
    saved folder. `create_model_card(dataset_name=...)` rewrites it naming the data, as TRL's scripts do on push.
    """

    _card_measurements: dict | None = None
    _card_dataset_name: str | None = None

    def _keep_card_pairs(self, train_dataset, eval_dataset) -> None:
        """Called before the datasets are tokenized: keep the raw pairs the card is measured on."""
        self._card_source = ("evaluation", eval_dataset) if eval_dataset is not None else ("training", train_dataset)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        self._card_measurements = self._measure_heads()
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir or self.args.output_dir)

    @torch.no_grad()
    def _measure_heads(self) -> dict | None:
        source, dataset = getattr(self, "_card_source", ("training", None))
        pairs = sample_pairs(dataset, self.args.model_card_pairs, self.args.seed)
        if pairs is None:
            return None
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            scores = score_preference_pairs(
                model, pairs, self.processing_class, context_column=self.args.context_column,
                prompt_marker=self.args.prompt_marker, batch_size=self.args.per_device_eval_batch_size,
            )
        finally:
            model.train(was_training)
        return {**measure_heads(scores, pairs, self.args.context_column), "source": source}

    def _card_settings(self) -> dict:
        settings = {name: getattr(self.args, name) for name in TRAINING_SETTINGS if hasattr(self.args, name)}
        settings["processes"] = self.accelerator.num_processes
        peft_config = getattr(self.accelerator.unwrap_model(self.model), "peft_config", None)
        if peft_config:
            adapter = next(iter(peft_config.values()))
            targets = adapter.target_modules
            targets = targets if isinstance(targets, str) or targets is None else sorted(targets)
            settings["lora"] = {"r": adapter.r, "alpha": adapter.lora_alpha, "target_modules": targets}
        return settings

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, output_dir=None):
        """TRL's card (`args.output_dir/README.md`) plus the MiCRo section; also written to `output_dir` if given."""
        self._card_dataset_name = dataset_name or self._card_dataset_name
        if model_name is None:  # as TRL names it when it saves a checkpoint
            hub_model_id = self.args.hub_model_id
            model_name = hub_model_id.split("/")[-1] if hub_model_id else Path(self.args.output_dir).name
        hub_dataset = self._card_dataset_name if is_hub_dataset_name(self._card_dataset_name) else None
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset, tags=tags)
        if not self.is_world_process_zero():
            return
        trl_card = Path(self.args.output_dir) / CARD_FILE
        model = self.accelerator.unwrap_model(self.model)
        conversational = bool(getattr(self.processing_class, "chat_template", None))
        card = polish_trl_card(ModelCard.load(trl_card), card_base_model(model.config._name_or_path),
                               self.args.hub_model_id or Path(self.args.output_dir).name, conversational)
        card.save(trl_card)
        folders = list(dict.fromkeys([Path(self.args.output_dir), Path(output_dir or self.args.output_dir)]))
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._write_micro_section(folder)

    def _write_micro_section(self, folder: Path) -> None:
        config = self.accelerator.unwrap_model(self.model).config
        measurements = self._card_measurements
        plot = None
        if measurements is not None:
            usage = measurements["usage"]
            try:
                plot_head_usage_heatmap(usage["usage"], usage["contexts"], folder / USAGE_PLOT,
                                        title="Mean router weight per head and context")
                plot = USAGE_PLOT
            except ImportError as error:
                logger.warning(f"Model card without the head-usage plot: {error}")
        model_id = self.args.hub_model_id or folder.name
        num_pairs = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        data = ", ".join(filter(None, [data_name(self._card_dataset_name), num_pairs and f"{num_pairs} training pairs"]))
        settings = self._card_settings()
        lines = micro_section_lines(config, model_id, data or None, settings, measurements, plot, "lora" in settings)
        path = folder / CARD_FILE
        if folder != Path(self.args.output_dir):
            path.write_text((Path(self.args.output_dir) / CARD_FILE).read_text(encoding="utf-8"), encoding="utf-8")
        write_card_section(folder, "micro", lines)
