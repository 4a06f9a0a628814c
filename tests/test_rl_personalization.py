"""The RL personalization benchmark at its smoke size (tiny random policy and reward backbone): the pipeline's test."""

import json

import pytest
import torch

from benchmarks.rl.gold_evaluation import add_logged_kl, win_rate
from benchmarks.rl.personalization_rewards import GoldReward
from benchmarks.rl.rl_personalization import main
from trl_micro.rewards import MiCRoReward
from trl_micro.testing_utils import build_tiny_micro_model


def test_win_rate_counts_every_pair_and_ties_as_half():
    samples = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    reference = torch.tensor([[2.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    # row 0: 1 beats 0 only (1/3), 3 beats all three -> 4/6; row 1: each 0 ties one, loses one, beats one -> 0.5
    assert win_rate(samples, reference).tolist() == pytest.approx([4 / 6, 0.5])


def test_logged_kl_is_averaged_between_evaluation_points():
    points = [{"step": 0}, {"step": 2}, {"step": 4}]
    log = [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 0.3}, {"step": 3, "kl": 1.0}, {"step": 4, "loss": 0.0}]
    add_logged_kl(points, log)
    assert "kl" not in points[0]
    assert points[1]["kl"] == pytest.approx(0.2)
    assert points[2]["kl"] == pytest.approx(1.0)


def test_gold_reward_scores_each_row_with_its_own_context(tokenizer):
    judges = {
        name: MiCRoReward(build_tiny_micro_model(tokenizer, num_heads=1, seed=seed), tokenizer)
        for name, seed in (("a", 0), ("b", 1))
    }
    gold = GoldReward(judges)
    prompts = [[{"role": "user", "content": "Question number 1: how do I cook rice?"}]] * 2
    completions = [[{"role": "assistant", "content": "Sure."}]] * 2
    rewards = gold(prompts, completions, context_id=["a", "b"])
    assert rewards[0] == pytest.approx(judges["a"].score(prompts[:1], completions[:1])["rewards"].item())
    assert rewards[1] == pytest.approx(judges["b"].score(prompts[:1], completions[:1])["rewards"].item())
    assert rewards[0] != pytest.approx(rewards[1])
    with pytest.raises(ValueError, match="No gold head for the context ids \\['c'\\]"):
        gold(prompts, completions, context_id=["a", "c"])


def test_smoke_preset_writes_table_plots_and_runs(tmp_path, capsys):
    main(["--preset", "smoke", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "scratch")])
    results = json.loads((tmp_path / "rl_personalization.json").read_text())
    contexts = ["subpop-0", "subpop-1"]
    assert results["summary"]["contexts"] == contexts
    assert {(run["method"], run["seed"]) for run in results["runs"]} == {
        (method, seed) for method in ("micro", "single", "gold") for seed in (0, 1)
    }
    for run in results["runs"]:
        assert [point["step"] for point in run["points"]] == [0, 2, 4]
        assert all(point["kl"] is not None and point["kl"] >= 0 for point in run["points"][1:])  # beta > 0
        for point in run["points"]:
            assert all(0.0 <= point["win_rate"][context] <= 1.0 for context in contexts)
        assert run["points"][0]["gold"] == results["runs"][0]["points"][0]["gold"]  # every run starts from one policy
    for context in contexts:
        row = results["summary"]["table"][context]["micro"]
        assert row["gold_after"]["n"] == 2 and row["gold_after"]["std"] is not None
        assert (tmp_path / f"curves_{context}.png").stat().st_size > 0
    assert set(results["reward_accuracy"]) == {"MiCRo, Stage 1 routing", "MiCRo + Stage 2", "SingleReward", "gold"}
    markdown = (tmp_path / "rl_personalization.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| subpop-")]
    assert len(table_rows) == 6 and "python benchmarks/rl/rl_personalization.py --preset smoke" in markdown
    assert (tmp_path / "kl.png").exists() and len(list((tmp_path / "runs").glob("*.json"))) == 6

    # --resume reuses the finished runs of the same settings, and reruns one whose settings differ.
    finished = (tmp_path / "runs" / "gold-seed0.json").read_text()
    main(["--preset", "smoke", "--output_dir", str(tmp_path), "--methods", "gold", "--seeds", "0", "--resume"])
    assert (tmp_path / "runs" / "gold-seed0.json").read_text() == finished
    main(
        [
            "--preset",
            "smoke",
            "--output_dir",
            str(tmp_path),
            "--methods",
            "gold",
            "--seeds",
            "0",
            "--resume",
            "--max_steps",
            "2",
        ]
    )
    rerun = json.loads((tmp_path / "runs" / "gold-seed0.json").read_text())
    assert [point["step"] for point in rerun["points"]] == [0, 2] and rerun["settings"]["max_steps"] == 2
