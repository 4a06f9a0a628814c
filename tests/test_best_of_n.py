"""The best-of-n benchmark: its estimators, and the whole pipeline at its smoke size (tiny random models), resumed."""

import itertools
import json

import pytest
import torch

from benchmarks.rl.best_of_n import main, pick_probabilities, win_over_random


def test_pick_probabilities_average_the_argmax_over_every_subset():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.3, 5.0, -0.2]])
    pool = scores.shape[-1]
    for n in (1, 2, 3, 6):
        counts = torch.zeros(pool, dtype=torch.float64)
        subsets = list(itertools.combinations(range(pool), n))
        for subset in subsets:
            counts[subset[int(scores[0, list(subset)].argmax())]] += 1  # argmax: the first of tied maxima
        torch.testing.assert_close(pick_probabilities(scores, n)[0], counts / len(subsets))


def test_win_over_a_random_candidate_counts_ties_and_itself_as_half():
    gold = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert win_over_random(gold)[0].tolist() == pytest.approx([1.5 / 4, 3 / 4, 3 / 4, 0.5 / 4])
    assert float(win_over_random(gold).mean()) == pytest.approx(0.5)  # best of 1: a random pick, 0.5 exactly


def test_smoke_run_reports_every_reader_and_resumes_from_its_cache(tmp_path, capsys):
    argv = ["--preset", "smoke", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    main(argv)
    first = capsys.readouterr().out
    assert "sampled synthetic prompt 2" in first and "trained micro-seed1" in first
    results = json.loads((tmp_path / "out" / "best_of_n.json").read_text())
    scenario = results["scenarios"]["synthetic"]
    assert scenario["readers"] == ["subpop-0", "subpop-1"] and scenario["prompts"] == 3
    methods = scenario["methods"]
    assert set(methods) == {"micro", "micro_residual", "single", "single_residual", "gold"}
    for method, result in methods.items():
        assert result["seeds"] == (1 if method == "gold" else 2)
        for reader in scenario["readers"]:
            curve = result["win_rate"][reader]
            assert curve["1"]["mean"] == pytest.approx(0.5)  # best of 1 is a random candidate
            for n in ("1", "2", "4"):  # the gold's own pick is the best any reward can make under that gold
                assert curve[n]["mean"] <= methods["gold"]["win_rate"][reader][n]["mean"] + 1e-9
            assert result["cross_reader"][reader][reader] == result["win_rate"][reader]["4"]
    # SingleReward routes no one: its picks for every reader are the same
    assert methods["single"]["pick_tokens"]["subpop-0"] == methods["single"]["pick_tokens"]["subpop-1"]
    assert {check["goal"].split(" ")[0] for check in results["checks"]} >= {"MiCRo's", "within", "cross-reader:"}
    assert results["timing"]["candidates"] == 4 and results["timing"]["ratio_min"] > 0
    markdown = (tmp_path / "out" / "best_of_n.md").read_text()
    assert "![win rate against n per reader](best_of_n.png)" in markdown and "## Goals" in markdown
    assert (tmp_path / "out" / "best_of_n.png").stat().st_size > 0

    main(argv)  # resumed: candidates and reward models come from the cache
    second = capsys.readouterr().out
    assert "sampled synthetic prompt" not in second and "trained " not in second
    again = json.loads((tmp_path / "out" / "best_of_n.json").read_text())
    assert again["scenarios"]["synthetic"]["methods"] == methods
