"""`trl-micro eval` on what users have: user ids without context text, malformed rows, Hub names with no network."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from trl_micro import MiCRoRewardModel, score_preference_pairs
from trl_micro.evaluation import per_context_accuracy
from trl_micro.scripts.cli import main as cli_main

from .conftest import eval_command, make_conflicting_pairs, run_eval, save_tiny_checkpoint, write_jsonl


@pytest.fixture()
def checkpoint(tokenizer, tmp_path):
    return save_tiny_checkpoint(tokenizer, tmp_path / "ckpt")


def user_pairs(num_pairs: int) -> Dataset:
    """Pairs with a user id column and no context text (the users' tastes differ: see make_conflicting_pairs)."""
    data = make_conflicting_pairs(num_pairs).remove_columns("context")
    return data.add_column("user", [f"user-{taste}" for taste in data["taste"]])


def test_user_ids_without_context_text_are_enough(checkpoint, tokenizer, tmp_path):
    data = user_pairs(24)
    data.to_json(tmp_path / "pairs.jsonl")
    out = tmp_path / "eval"
    report = run_eval(
        checkpoint, tmp_path / "pairs.jsonl", out, "--context_id_column", "user", "--adaptation_pairs", "4"
    )
    assert report["context_column"] is None and report["context_label_column"] == "user"
    assert report["num_pairs"] == {"scored": 24, "evaluated": 16, "adaptation": 8, "adaptation_pool": 8}
    online = report["methods"]["online routing + residual heads (4 pairs per context)"]["accuracy"]
    assert set(online) == {"user-short", "user-long"}
    assert set(json.loads((out / "online_router.json").read_text())["users"]) == {"user-short", "user-long"}
    # Without context text, the router reads the prompt as it is: the same as scoring with no context column.
    scores = score_preference_pairs(MiCRoRewardModel.from_pretrained(checkpoint), data, tokenizer, context_column=None)
    everything = per_context_accuracy(scores.margins, data["user"])
    all_pairs = run_eval(checkpoint, tmp_path / "pairs.jsonl", tmp_path / "all", "--context_id_column", "user")
    routed = all_pairs["methods"]["routed (checkpoint router)"]
    assert routed["accuracy"] == pytest.approx(everything["accuracy"])


def test_eval_chooses_the_adaptation_pairs_from_a_pool(checkpoint, tmp_path):
    """--query_strategy picks --adaptation_pairs of --adaptation_pool per context; the pool's rest is not evaluated."""
    user_pairs(40).to_json(tmp_path / "pairs.jsonl")
    flags = ["--context_id_column", "user", "--adaptation_pairs", "3"]
    base = eval_command(checkpoint, tmp_path / "pairs.jsonl", *flags)
    chosen = ["--adaptation_pool", "8", "--query_strategy", "information"]
    report = run_eval(checkpoint, tmp_path / "pairs.jsonl", tmp_path / "eval", *flags, *chosen)
    assert report["num_pairs"] == {"scored": 40, "evaluated": 24, "adaptation": 6, "adaptation_pool": 16}
    assert "online routing (3 pairs per context, chosen by information)" in report["methods"]
    stored = json.loads((tmp_path / "eval" / "online_router.json").read_text())["users"]
    assert all(stored[user]["num_updates"] == 3 for user in ("user-short", "user-long")), stored
    with pytest.raises(ValueError, match="--adaptation_pool above 3"):
        cli_main([*base, "--query_strategy", "disagreement", "--output_dir", str(tmp_path / "e2")])
    with pytest.raises(ValueError, match="--adaptation_pool 2 is below --adaptation_pairs 3"):
        cli_main([*base, "--adaptation_pool", "2", "--output_dir", str(tmp_path / "e3")])


def test_no_id_and_no_context_column_names_both_flags(checkpoint, tmp_path):
    user_pairs(4).to_json(tmp_path / "pairs.jsonl")
    with pytest.raises(
        ValueError,
        match="no context id column 'context_id' and no context column 'context'.*"
        "--context_id_column.*--context_column",
    ):
        cli_main(eval_command(checkpoint, tmp_path / "pairs.jsonl", "--output_dir", str(tmp_path / "eval")))


@pytest.mark.parametrize(
    ("conversational", "row", "field", "problem"),
    [
        (False, {"chosen": None}, "chosen", "is None, not text"),
        (False, {"prompt": "  "}, "prompt", "is empty"),
        (False, {"user": None}, "user", "is missing"),
        (True, {"rejected": [{"role": "assistant", "content": None}]}, "rejected", "is a list .*not text or a list of"),
    ],
)
def test_one_malformed_row_among_thousands_is_named(checkpoint, tmp_path, conversational, row, field, problem):
    data = make_conflicting_pairs(2000, conversational=conversational)
    rows = data.add_column("user", data["taste"]).to_list()
    rows[1234].update(row)
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    argv = eval_command(checkpoint, path, "--context_id_column", "user", "--output_dir", str(tmp_path / "eval"))
    message = rf"Row 1234 of .*: `{field}` {problem}.*1 of 2000 rows.*--skip_malformed_rows"
    with pytest.raises(ValueError, match=message):
        cli_main(argv)
    assert not (tmp_path / "eval" / "eval_report.json").exists()


def test_skip_malformed_rows_scores_the_others_and_reports_how_many(checkpoint, tmp_path, capsys):
    rows = user_pairs(40).to_list()
    rows[7]["chosen"], rows[30]["user"] = None, ""
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    report = run_eval(checkpoint, path, tmp_path / "eval", "--context_id_column", "user", "--skip_malformed_rows")
    assert report["skipped_rows"] == 2 and report["num_pairs"]["scored"] == 38
    assert "skipped 2 malformed rows" in capsys.readouterr().out


def test_hub_names_without_network_are_clear_errors(checkpoint, tmp_path):
    """Hub model and dataset ids reach the Hub's loaders; offline, the error names them and the setting."""
    make_conflicting_pairs(4).to_json(tmp_path / "pairs.jsonl")
    script = (
        "import sys\n"
        "from trl_micro.scripts.cli import main\n"
        "for argv in ([sys.argv[1], 'someone/prefs', '--dataset_config', 'v2'], ['someone/micro-rm', sys.argv[2]]):\n"
        "    try:\n"
        "        main(['eval', '--model_name_or_path', argv[0], '--dataset_name', *argv[1:], '--output_dir', 'out'])\n"
        "    except OSError as error:\n"
        "        print('ERROR', type(error.__cause__).__name__, error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, checkpoint, str(tmp_path / "pairs.jsonl")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    dataset_error, model_error = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert "Dataset 'someone/prefs' (config 'v2')" in dataset_error and "HF_DATASETS_OFFLINE=1" in dataset_error
    assert dataset_error.startswith("ERROR ConnectionError")  # raised by datasets.load_dataset itself
    assert "Model 'someone/micro-rm' is not a local directory" in model_error and "HF_HUB_OFFLINE=1" in model_error


def test_eval_says_when_the_heads_have_not_separated(checkpoint, tokenizer, tmp_path, capsys):
    data = user_pairs(24)
    data.to_json(tmp_path / "pairs.jsonl")
    flags = ["--context_id_column", "user"]
    random_heads = run_eval(checkpoint, tmp_path / "pairs.jsonl", tmp_path / "random", *flags)["head_agreement"]
    assert 0 <= random_heads < 0.95 and "have not separated" not in capsys.readouterr().out

    model = MiCRoRewardModel.from_pretrained(checkpoint)
    with torch.no_grad():  # three copies of head 0: every pair ranked alike by every two heads
        model.heads.weight.copy_(model.heads.weight[:1].expand_as(model.heads.weight))
    model.save_pretrained(tmp_path / "same-heads")
    tokenizer.save_pretrained(tmp_path / "same-heads")
    same = run_eval(tmp_path / "same-heads", tmp_path / "pairs.jsonl", tmp_path / "same", *flags)
    assert same["head_agreement"] == pytest.approx(1.0)
    assert "the heads have not separated" in capsys.readouterr().out
