"""The card's Markdown: the MiCRo section, the head cards, and sections that a later save replaces."""

from __future__ import annotations

import html
import os
import re
import textwrap
from pathlib import Path

from huggingface_hub import ModelCard
from trl.trainer.utils import generate_model_card

from ..evaluation_reports import markdown_table
from .head_measurements import HeadCard, preference_summary
from .hub_names import CARD_FILE, card_base_model, data_name, polish_trl_card

EXAMPLE_WIDTH = 160
PAPER = "[MiCRo](https://huggingface.co/papers/2505.24846)"


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
        lines += [
            "",
            *markdown_table(
                ["context", "accuracy"], [[inline(c, 60), f"{a:.3f}"] for c, a in card.accuracy_per_context.items()]
            ),
        ]
    for title, examples in (("Top-scored responses", card.top), ("Bottom-scored responses", card.bottom)):
        lines += ["", f"{title}:", ""]
        lines += [f"- {e.reward:+.3f}: {inline(e.response)} (prompt: {inline(e.prompt, 80)})" for e in examples]
    return [*lines, ""]


def micro_section_lines(
    config,
    model_id: str,
    data: str | None,
    settings: dict,
    measurements: dict | None,
    plot: str | None,
    adapter: bool = False,
) -> list[str]:
    """The MiCRo part of the card: model, data, use, training settings and the head cards (`adapter`: a LoRA one)."""
    prompt_reading = "the mean over the prompt" if config.router_readout == "mean" else "the last prompt token"
    router = f"{config.router_type} router on {prompt_reading}" if config.use_router else "static mixture"
    reading = {
        "last": "the last token's hidden state",
        "mean": "the mean over the response's tokens",
        "last_mean": "the last token's hidden state and the mean over the response, side by side",
    }
    layer = "the backbone's output" if config.reward_layer is None else f"hidden layer {config.reward_layer}"
    base = card_base_model(config._name_or_path)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    lines = [
        "## MiCRo reward model",
        "",
        f"A {PAPER} reward model (mixture of Bradley-Terry heads with context-aware routing), trained with trl-micro: "
        "K reward heads over one backbone and a router that reads the prompt (and any context in it) to weight them. "
        "The routed reward is `logits`.",
        "",
        f"- Base model: {base_text} ({config.text_config.model_type}, hidden size {config.hidden_size})",
        f"- Heads: K = {config.num_heads}; readout: `{config.reward_readout}` of {layer} "
        f"({reading[config.reward_readout]}); routing: {router}",
        f"- Data: {inline(data, 200) if data else 'not recorded'}",
        f"- Context template: `{config.context_template!r}`"
        + (f"; prompts end with `{config.prompt_marker!r}`" if config.prompt_marker else ""),
        "",
        "### Use it",
        "",
        *(
            [
                "This folder is a LoRA run (the adapter, with the heads and router saved in full): "
                f'`MiCRoRewardModel.from_pretrained("{model_id}")` and `MiCRoReward.from_pretrained` load it with the '
                "adapter merged (peft needed), and so does `AutoModelForSequenceClassification` with "
                "`trust_remote_code=True`. For a loader without peft, write a merged checkpoint first, "
                f"`python -m trl_micro.trainer.lora {model_id} merged`, and use `merged` below.",
                "",
            ]
            if adapter
            else []
        ),
        "With TRL's own scripts (no trl-micro needed; each completion is routed on its prompt):",
        "",
        "```bash",
        f"trl grpo --model_name_or_path <policy> --reward_model_name_or_path {model_id} --trust_remote_code ...",
        "```",
        "",
        "In Python (see the quick start), the model returns `logits` (the routed reward), `head_rewards` (one per "
        "head) and `mixture_weights`; trl-micro's `MiCRoReward` routes each row by its own context column or, with "
        "per-user stores, by user id.",
        "",
    ]
    if settings:
        lines += [
            "### Training settings",
            "",
            *markdown_table(
                ["setting", "value"], [[k, "not set" if v is None else f"`{v!r}`"] for k, v in settings.items()]
            ),
            "",
        ]
    lines += ["### Heads", ""]
    if measurements is None:
        return [*lines, "Not measured (no pairs were available when this checkpoint was saved).", ""]
    lines += [
        f"Measured on {measurements['num_pairs']} {measurements['source']} pairs with this checkpoint's "
        "router. Length is counted in characters.",
        "",
    ]
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
            base_model=None,
            model_name=model_id,
            hub_model_id=model_id,
            dataset_name=None,
            tags=["trl-micro", "reward-model"],
            wandb_url=None,
            trackio_url=None,
            trainer_name="MiCRo Reward",
            template_file="rm_model_card.md",
        )
        card = polish_trl_card(card, None, model_id, conversational=True)
    card.text = replace_section(card.text, name, lines)
    card.save(path)
    return path


def add_evaluation_section(model_dir: str | os.PathLike, dataset_name: str, lines: list[str]) -> Path:
    """Add (or replace) the evaluation of `dataset_name` in the card of the local checkpoint `model_dir`."""
    shown = data_name(dataset_name)
    return write_card_section(model_dir, f"eval:{shown}", [f"## Evaluation on {shown}", "", *lines])
