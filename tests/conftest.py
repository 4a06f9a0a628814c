"""Shared fixtures: a tokenizer trained in memory and small preference datasets; no downloads."""

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import pytest
from datasets import Dataset

from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real preference data beside the checkout, as the recipes and benchmarks default to it.
os.environ.setdefault("TRL_MICRO_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))

STRICT_ENV_VAR = "TRL_MICRO_STRICT_TESTS"


def skip_unless_strict(reason: str) -> None:
    """
    Skip a test whose optional input (the shared real data, the embedded model) is missing, except under
    `TRL_MICRO_STRICT_TESTS=1` (set by .ci/run), where the missing input fails the test: CI must run every test.
    """
    if os.environ.get(STRICT_ENV_VAR) == "1":
        pytest.fail(f"{reason} ({STRICT_ENV_VAR}=1: every test must run)")
    pytest.skip(reason)


STYLES = {
    "short": ["Sure.", "Yes, done.", "Ok, here it is."],
    "long": [
        "Here is a detailed answer that walks through every step carefully and explains why each one matters.",
        "Let me explain this thoroughly, with background, the main steps, and a few caveats worth knowing.",
    ],
}
CONTEXTS = {"short": "I am busy; keep answers short.", "long": "I like thorough, detailed answers."}


def make_conflicting_pairs(num_pairs: int, seed: int = 0, conversational: bool = False) -> Dataset:
    """Two subpopulations with opposite tastes (short vs long answers); the context says which one labelled."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_pairs):
        taste = "short" if i % 2 == 0 else "long"
        other = "long" if taste == "short" else "short"
        prompt = f"Question number {i}: how do I {rng.choice(['cook rice', 'fix a bike', 'learn chess'])}?"
        chosen, rejected = rng.choice(STYLES[taste]), rng.choice(STYLES[other])
        if conversational:
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            row = {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}
        row["context"] = CONTEXTS[taste]
        row["taste"] = taste
        rows.append(row)
    return Dataset.from_list(rows)


def tokenizer_corpus() -> list[str]:
    """The texts the tests' tokenizer is trained on (the same tokenizer in every process that trains it)."""
    corpus = []
    for texts in STYLES.values():
        corpus += texts
    corpus += list(CONTEXTS.values())
    corpus += [f"Question number {i}: how do I cook rice fix a bike learn chess?" for i in range(50)]
    corpus += ["\n\nHuman: hello\n\nAssistant: hi there", "user assistant system"]
    return corpus * 4


def save_tiny_checkpoint(tokenizer, folder: Path, num_heads: int = 3) -> str:
    """A tiny MiCRo model with `num_heads` untrained heads and `tokenizer`, saved to `folder`; returns its path."""
    build_tiny_micro_model(tokenizer, num_heads=num_heads).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """`rows` one JSON object a line, as they are (malformed ones included: `Dataset.to_json` would fix their types)."""
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def eval_command(checkpoint, dataset, *flags: str) -> list[str]:
    """`trl-micro eval` on `checkpoint` and the pairs file `dataset`, with `flags`, as the CLI's `main` takes it."""
    return ["eval", "--model_name_or_path", str(checkpoint), "--dataset_name", str(dataset), *flags]


def run_eval(checkpoint, dataset, output_dir: Path, *flags: str) -> dict:
    """Run `trl-micro eval` (it must exit 0) writing to `output_dir`; returns its eval_report.json."""
    from trl_micro.scripts.cli import main

    assert main(eval_command(checkpoint, dataset, *flags, "--output_dir", str(output_dir))) == 0
    return json.loads((Path(output_dir) / "eval_report.json").read_text())


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(tokenizer_corpus())


@pytest.fixture()
def pairs():
    return make_conflicting_pairs(32)


@pytest.fixture(scope="session")
def no_trl_micro(tmp_path_factory):
    """An environment whose Python path starts with a `trl_micro` that cannot be imported (it raises)."""
    folder = tmp_path_factory.mktemp("no_trl_micro")
    (folder / "trl_micro").mkdir()
    (folder / "trl_micro" / "__init__.py").write_text('raise ImportError("trl_micro is not installed here")\n')
    return {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
