"""What a Hub visitor reads at the top of the card: the base model and data by name, and a quick start."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import ModelCard

from ..bundled.catalog import is_hub_dataset_name
from ..bundled.embedded import EMBEDDED_HUB_ID, is_embedded_model_path

CARD_FILE = "README.md"


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
TEXT_EXAMPLE = (
    'prompt = "I am a busy engineer: keep answers short. How do I boil an egg?"\n'
    'completion = " Simmer it for nine minutes, then cool it in cold water."'
)


def quick_start_lines(model_id: str, conversational: bool) -> list[str]:
    """A quick start that scores one routed response, without trl-micro (`trust_remote_code`) and with it."""
    example, join = (
        (CONVERSATIONAL_EXAMPLE, "text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)")
        if conversational
        else (TEXT_EXAMPLE, "text = prompt + completion")
    )
    text = QUICK_START_TEMPLATE.read_text(encoding="utf-8")
    return [
        *text.replace("{model_id}", model_id).replace("{example}", example).replace("{join}", join).splitlines(),
        "",
    ]


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
