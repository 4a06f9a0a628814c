"""The model card a save writes (TRL's card + the MiCRo section with one card per head), and what eval adds to it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from trl_micro import MiCRoRewardModel, score_preference_pairs
from trl_micro.bundled.embedded import EMBEDDED_HUB_ID, embedded_model_path
from trl_micro.model_card import measure_heads, replace_section
from trl_micro.scoring import PairScores
from trl_micro.scripts.cli import main as cli_main
from trl_micro.scripts.train import main as train_main
from trl_micro.scripts.train import make_parser as train_parser
from trl_micro.testing_utils import save_tiny_backbone

from .conftest import CONTEXTS, make_conflicting_pairs, skip_unless_strict
from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# A short training run on CPU: batches of 8, no reporting, no checkpoints.
QUICK_CPU_RUN = ["--per_device_train_batch_size", "8", "--report_to", "none", "--save_strategy", "no", "--use_cpu"]


def test_measure_heads_reads_routing_accuracy_length_and_examples():
    """Head 0 rewards length, head 1 brevity; the router sends context a to head 0, b to head 1."""
    responses = ["a", "bbbb", "cccccccc", "dd", "eeeeee", "ffffffffff"]  # chosen, rejected of pairs 0, 1, 2
    lengths = torch.tensor([float(len(r)) for r in responses]).view(3, 2)
    head_rewards = torch.stack([lengths, -lengths], dim=-1)  # (3 pairs, 2 responses, 2 heads)
    scores = PairScores(
        head_margins=head_rewards[:, 0] - head_rewards[:, 1],
        router_logits=torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
        feature_deltas=torch.zeros(3, 4),
        head_rewards=head_rewards,
    )
    pairs = Dataset.from_dict(
        {
            "prompt": ["p0", "p1", "p2"],
            "chosen": responses[0::2],
            "rejected": responses[1::2],
            "context_id": ["a", "a", "b"],
        }
    )
    measured = measure_heads(scores, pairs)
    longer, shorter = measured["heads"]
    assert measured["contexts"] == ["a", "a", "b"] and measured["num_pairs"] == 3
    assert longer.routed_share == pytest.approx(2 / 3) and shorter.routed_share == pytest.approx(1 / 3)
    # the chosen response is the longer one in pair 1 only: head 0 is right there, head 1 on pairs 0 and 2
    assert longer.accuracy_per_context == {"a": 0.5, "b": 0.0} and shorter.accuracy_per_context == {"a": 0.5, "b": 1.0}
    assert longer.accuracy == pytest.approx(1 / 3) and shorter.accuracy == pytest.approx(2 / 3)
    assert longer.length_correlation == pytest.approx(1.0) and shorter.length_correlation == pytest.approx(-1.0)
    assert [e.response for e in longer.top] == ["ffffffffff", "cccccccc", "eeeeee"]
    assert [e.response for e in shorter.top] == ["a", "dd", "bbbb"] and longer.bottom[0].prompt == "p0"


def test_replace_section_replaces_its_own_and_keeps_the_rest():
    text = replace_section("# Card\n", "eval:x", ["old"])
    text = replace_section(text, "eval:y", ["other"])
    text = replace_section(text, "eval:x", ["new"])
    assert "old" not in text and text.count("new") == 1 and "other" in text and text.startswith("# Card")


def card_numbers(card: str, head: int, label: str) -> float:
    section = card.split(f"#### Head {head}")[1].split("#### Head")[0]
    return float(re.search(rf"{label}: ([-+0-9.]+)", section).group(1))


def test_a_saved_checkpoint_card_lists_every_head_with_its_measured_preferences(reward_checkpoint):  # noqa: F811
    folder = Path(reward_checkpoint)
    card = ModelCard.load(folder / "README.md")
    assert {"trl", "reward-trainer", "trl-micro"} <= set(card.data.tags)
    text = card.text
    assert "This model was trained with MiCRo Reward" in text  # TRL's own template
    readout = MiCRoRewardModel.from_pretrained(folder).config.reward_readout
    assert f"- Heads: K = 2; readout: `{readout}` of the backbone's output (" in text
    assert "routing: linear router on the last prompt token" in text
    assert "| num_train_epochs | `4` |" in text and "64 training pairs" in text
    assert f"--reward_model_name_or_path {folder.name} --trust_remote_code" in text
    assert "![Mean router weight per head and context](head_usage.png)" in text
    assert (folder / "head_usage.png").read_bytes()[:8] == PNG_SIGNATURE

    # The numbers are the heads' own, measured on the 64 training pairs.
    data = make_conflicting_pairs(64, seed=0, conversational=True)
    model = MiCRoRewardModel.from_pretrained(folder).eval()
    scores = score_preference_pairs(model, data, AutoTokenizer.from_pretrained(folder))
    routed = scores.mixture_weights.argmax(dim=1)
    for k in range(2):
        assert f"#### Head {k}" in text
        accuracy = (scores.head_margins[:, k] > 0).float().mean().item()
        assert card_numbers(text, k, "Accuracy alone") == pytest.approx(accuracy, abs=1e-3)
        assert card_numbers(text, k, "Routed to it") == pytest.approx(100 * (routed == k).float().mean().item(), abs=1)
        assert re.search(r"Pearson r = [-+]\d\.\d\d", text.split(f"#### Head {k}")[1])
        for context in CONTEXTS.values():
            assert f"| {context} |" in text.split(f"#### Head {k}")[1].split("Top-scored")[0]
        best = scores.head_rewards[..., k].flatten().argmax().item()
        response = data[best // 2]["chosen" if best % 2 == 0 else "rejected"][-1]["content"]
        top = text.split(f"#### Head {k}")[1].split("Top-scored responses:")[1].split("\n- ")[1]
        assert response[:40] in top


def test_eval_adds_its_table_to_the_card_once(reward_checkpoint, tmp_path):  # noqa: F811
    checkpoint = tmp_path / "micro-rm"
    shutil.copytree(reward_checkpoint, checkpoint)
    data = tmp_path / "pairs.jsonl"
    make_conflicting_pairs(12, conversational=True).to_json(data)
    argv = [
        "eval",
        "--model_name_or_path",
        str(checkpoint),
        "--dataset_name",
        str(data),
        "--context_id_column",
        "taste",
        "--output_dir",
        str(tmp_path / "eval"),
    ]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0  # evaluating again replaces the section
    text = (checkpoint / "README.md").read_text()
    assert text.count("## Evaluation on pairs.jsonl") == 1 and "#### Head 1" in text
    assert str(tmp_path) not in text  # the data by its name, not the machine's path
    table = text.split("## Evaluation on pairs.jsonl")[1]
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    routed = report["methods"]["routed (checkpoint router)"]
    assert f"| routed (checkpoint router) | {100 * routed['accuracy']['long']:.1f} |" in table
    assert "head 0 alone" not in table

    (checkpoint / "README.md").unlink()
    (checkpoint / "README.md").mkdir()  # a card that cannot be written: refused before anything is scored
    with pytest.raises(OSError, match="--update_model_card false"):
        cli_main([*argv[:-1], str(tmp_path / "eval2")])
    assert not (tmp_path / "eval2" / "eval_report.json").exists()


def test_what_push_to_hub_would_push(tokenizer, tmp_path, monkeypatch):
    """The recipe's output folder is what `push_to_hub` uploads: weights, tokenizer, code, card naming the Hub id."""
    backbone = save_tiny_backbone(str(tmp_path / "backbone"), tokenizer)
    make_conflicting_pairs(16).to_json(tmp_path / "pairs.jsonl")
    output_dir = tmp_path / "micro-rm"
    argv = [
        "--model_name_or_path",
        backbone,
        "--dataset_name",
        str(tmp_path / "pairs.jsonl"),
        "--num_heads",
        "3",
        "--output_dir",
        str(output_dir),
        "--num_train_epochs",
        "1",
        *QUICK_CPU_RUN,
        "--hub_model_id",
        "someone/micro-rm",
    ]
    script_args, training_args, model_args = train_parser().parse_args_and_config(argv)
    assert training_args.hub_model_id == "someone/micro-rm" and not training_args.push_to_hub
    assert train_parser().parse_args_and_config([*argv, "--push_to_hub"])[1].push_to_hub
    train_main(script_args, training_args, model_args)

    pushed = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(("_", "checkpoint-")))
    assert pushed == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "configuration_micro.py",
        "head_usage.png",
        "model.safetensors",
        "modeling_micro.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.bin",
    ]
    text = (output_dir / "README.md").read_text()
    assert "# Model Card for micro-rm" in text and "--reward_model_name_or_path someone/micro-rm" in text
    assert all(f"#### Head {k}" in text for k in range(3)) and "pairs.jsonl, 16 training pairs" in text
    assert "datasets:" not in text.split("---")[1]  # a local file is not linked as a Hub dataset


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_the_card_of_a_model_trained_on_the_embedded_model_from_a_local_file(tmp_path, no_trl_micro):
    """What a Hub visitor reads: the real base model, the data by name, no path of this machine, a quick start that
    loads the checkpoint and routes, without trl-micro and with it."""
    try:
        backbone = embedded_model_path()
    except (ImportError, FileNotFoundError) as error:
        skip_unless_strict(f"the embedded model is not installed: {error}")
    make_conflicting_pairs(16, conversational=True).to_json(tmp_path / "pairs.jsonl")
    argv = [
        "train",
        "--model_name_or_path",
        "embedded",
        "--dataset_name",
        str(tmp_path / "pairs.jsonl"),
        "--output_dir",
        str(tmp_path / "micro-rm"),
        "--max_steps",
        "2",
        *QUICK_CPU_RUN,
        "--freeze_backbone",
        "true",
        "--feature_cache_dir",
        str(tmp_path / "cache"),
    ]
    assert cli_main(argv) == 0
    text = (tmp_path / "micro-rm" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "micro-rm" / "README.md")

    assert card.data.base_model == EMBEDDED_HUB_ID
    assert f"fine-tuned version of [{EMBEDDED_HUB_ID}](https://huggingface.co/{EMBEDDED_HUB_ID})" in text
    assert f"- Base model: [{EMBEDDED_HUB_ID}]" in text and "- Data: pairs.jsonl, 16 training pairs" in text
    assert "None" not in text
    for local in (str(tmp_path), str(Path(backbone).parent), os.path.expanduser("~")):
        assert local not in text, local

    without, with_trl_micro = python_blocks(text.split("## Quick start")[1].split("\n## ")[0])
    for code, env in ((without, no_trl_micro), (with_trl_micro, {**os.environ, "OMP_NUM_THREADS": "1"})):
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.search(r"-?\d+\.\d+", result.stdout.strip().splitlines()[-1]), result.stdout
