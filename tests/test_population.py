"""Issue 42: `trl-micro eval --routing` and its user store, and the population benchmark's smoke preset."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from trl_micro.modeling_micro import MiCRoRewardModel
from trl_micro.personalization.mixture_weights import mixture_weights, posterior_weights
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.stores import open_user_store
from trl_micro.scoring import score_preference_pairs
from trl_micro.scripts.cli import main as cli_main
from trl_micro.scripts.eval import EvalArguments, context_columns, load_split, split_adaptation
from trl_micro.testing_utils import build_tiny_micro_model
from trl_micro.value_checks import normalize_user_id

from .conftest import make_conflicting_pairs


@pytest.fixture()
def checkpoint_and_data(tokenizer, tmp_path):
    model = build_tiny_micro_model(tokenizer, num_heads=3)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    data_file = tmp_path / "pairs.jsonl"
    make_conflicting_pairs(40).to_json(data_file)
    return str(tmp_path / "ckpt"), str(data_file)


def adaptation_scores(checkpoint: str, data_file: str, pairs: int):
    """The adaptation pairs `trl-micro eval` draws, scored by the checkpoint, and each pair's context id."""
    args = EvalArguments(
        model_name_or_path=checkpoint, dataset_name=data_file, context_id_column="taste", adaptation_pairs=pairs
    )
    dataset = load_split(args)
    text_column, label_column = context_columns(dataset, args)
    labels = [normalize_user_id(value) for value in dataset[label_column]]
    adaptation, _ = split_adaptation(dataset, labels, label_column, args)
    model = MiCRoRewardModel.from_pretrained(checkpoint).eval()
    scores = score_preference_pairs(
        model,
        dataset.select(adaptation),
        AutoTokenizer.from_pretrained(checkpoint),
        context_column=text_column,
        prompt_marker=model.config.prompt_marker,
    )
    return scores, [labels[row] for row in adaptation]


def test_eval_routing_rules_are_fitted_and_written_to_the_user_store(checkpoint_and_data, tmp_path, capsys):
    checkpoint, data_file = checkpoint_and_data
    base = ["eval", "--model_name_or_path", checkpoint, "--dataset_name", data_file, "--context_id_column", "taste"]
    base += ["--adaptation_pairs", "8", "--update_model_card", "false"]
    stored = {}
    for rule in ("posterior", "mixture", "auto"):
        url = f"sqlite:///{tmp_path / rule}.db"
        assert cli_main([*base, "--output_dir", str(tmp_path / rule), "--routing", rule, "--user_store", url]) == 0
        report = json.loads((tmp_path / rule / "eval_report.json").read_text())
        assert report["routing"]["rule"] == rule
        assert set(report["routing"]["per_context"]) == {"short", "long"}
        if rule != "auto":
            assert set(report["routing"]["per_context"].values()) == {rule}
        assert report["user_store"] == {"url": url, "users": 2}
        name = "online routing (8 pairs per context" + ("" if rule == "posterior" else f", {rule} weights") + ")"
        assert name in report["methods"]
        store = open_user_store(url)
        stored[rule] = store.weights(["short", "long"])
        router = OnlineRouter.load(tmp_path / rule / "online_router.json")
        assert router.model_fingerprint == store.settings.model_fingerprint is not None
        for user in ("short", "long"):
            torch.testing.assert_close(stored[rule][user].double(), router.weights(user, dtype=torch.float64))
        store.close()
    assert "routing auto: mixture weights for" in capsys.readouterr().out

    # What the store holds is what each rule fits on the context's adaptation pairs, from the router's mean prior.
    scores, users = adaptation_scores(checkpoint, data_file, 8)
    for user in ("short", "long"):
        rows = [row for row, other in enumerate(users) if other == user]
        prior = scores.mixture_weights[rows].double().mean(0)
        prior = prior / prior.sum()
        expected = {
            "mixture": mixture_weights(scores.head_margins[rows], prior),
            "posterior": posterior_weights(scores.head_margins[rows], prior),
        }
        for rule, weights in expected.items():
            torch.testing.assert_close(stored[rule][user].double(), weights, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(expected["mixture"], expected["posterior"], atol=1e-3)


def test_eval_user_store_needs_adaptation(checkpoint_and_data, tmp_path):
    checkpoint, data_file = checkpoint_and_data
    argv = ["eval", "--model_name_or_path", checkpoint, "--dataset_name", data_file, "--context_id_column", "taste"]
    with pytest.raises(ValueError, match="--user_store stores what --adaptation_pairs adapts"):
        cli_main([*argv, "--output_dir", str(tmp_path / "a"), "--user_store", f"sqlite:///{tmp_path}/u.db"])
    with pytest.raises(SystemExit):
        cli_main([*argv, "--output_dir", str(tmp_path / "b"), "--adaptation_pairs", "4", "--routing", "best"])
