"""The RL personalization benchmark at its smoke size (tiny random policy and reward backbone): the pipeline's test."""

import json

import pytest
import torch

from benchmarks.rl.gold_evaluation import add_logged_kl, win_rate
from benchmarks.rl.personalization_rewards import GoldReward
from benchmarks.rl.rl_personalization import main
from benchmarks.rl.rl_personalization_report import checks_lines
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


def test_personalization_checks_read_the_means_of_the_micro_runs():
    def value(mean):
        return {"mean": mean, "std": 0.0, "n": 2}

    def row(win, cross, cap=0.1):
        return {
            "win_rate_after": value(win),
            "cap_share_after": value(cap),
            "cross_win_rate": {judge: value(mean) for judge, mean in cross.items()},
        }

    # a: wins, 0.04 below gold, its diagonal tops its row (0.5) and its column (0.3); b: loses under its own gold,
    # 0.10 below gold, its diagonal (0.45) is below a's answers judged by b (0.5), and its answers are cut.
    table = {
        "a": {"micro": row(0.66, {"a": 0.66, "b": 0.5}), "gold": row(0.70, {"a": 0.7, "b": 0.2})},
        "b": {"micro": row(0.45, {"a": 0.3, "b": 0.45}, cap=0.4), "gold": row(0.55, {"a": 0.2, "b": 0.55})},
    }
    summary = {
        "contexts": ["a", "b"],
        "methods": ["micro", "gold"],
        "table": table,
        "curves": {"micro": [{"step": 0}, {"step": 32}]},
    }
    lines = checks_lines(summary)
    assert "step 32" in lines[2]
    rows = [line for line in lines if line.startswith("| a |") or line.startswith("| b |")]
    assert rows == [
        "| a | yes (0.66) | yes (0.66 vs 0.70) | yes (0.66 vs max 0.50) | yes (0.10) |",
        "| b | no (0.45) | no (0.45 vs 0.55) | no (0.45 vs max 0.50) | no (0.40) |",
    ]
    assert checks_lines({**summary, "methods": ["single", "gold"]}) == []
    without_gold = checks_lines({**summary, "methods": ["micro"]})
    assert "| a | yes (0.66) | n/a (no gold run) |" in "\n".join(without_gold)


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
    main_table = markdown[: markdown.index("## Completions cut")]
    table_rows = [line for line in main_table.splitlines() if line.startswith("| subpop-")]
    assert len(table_rows) == 6 and "python -m benchmarks.rl.rl_personalization --preset smoke" in markdown
    assert (tmp_path / "kl.png").exists() and len(list((tmp_path / "runs").glob("*.json"))) == 6
    for run in results["runs"]:
        for point in run["points"]:
            assert all(0.0 <= point["cap_share"][context] <= 1.0 for context in contexts)
            assert all(1 <= point["tokens"][context] <= 8 for context in contexts)  # the smoke budget is 8 tokens
            assert set(point["cross_win_rate"]) == set(contexts)
            assert all(point["cross_win_rate"][c][c] == point["win_rate"][c] for c in contexts)
    assert "## Completions cut at the budget of 8 tokens" in markdown and "## Cross-context matrix" in markdown
    assert "## Does the MiCRo-trained policy personalize?" in markdown

    # --report_only trains nothing: it reports the finished runs and names the missing one.
    (tmp_path / "runs" / "synthetic-gold-seed1.json").unlink()
    main(["--preset", "smoke", "--output_dir", str(tmp_path), "--report_only"])
    assert not (tmp_path / "runs" / "synthetic-gold-seed1.json").exists()
    partial = json.loads((tmp_path / "rl_personalization.json").read_text())
    assert partial["missing_runs"] == [{"method": "gold", "seed": 1}] and len(partial["runs"]) == 5
    assert partial["summary"]["table"]["subpop-0"]["gold"]["gold_after"]["n"] == 1
    markdown = (tmp_path / "rl_personalization.md").read_text()
    assert "Not run yet: gold (ceiling) seed 1." in markdown and "gold (ceiling): [0]" in markdown
    with pytest.raises(SystemExit, match="no finished run"):
        main(["--preset", "smoke", "--output_dir", str(tmp_path), "--report_only", "--seeds", "5"])

    # --resume reuses the finished runs of the same settings, and reruns one whose settings differ.
    finished = (tmp_path / "runs" / "synthetic-gold-seed0.json").read_text()
    main(["--preset", "smoke", "--output_dir", str(tmp_path), "--methods", "gold", "--seeds", "0", "--resume"])
    assert (tmp_path / "runs" / "synthetic-gold-seed0.json").read_text() == finished
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
    rerun = json.loads((tmp_path / "runs" / "synthetic-gold-seed0.json").read_text())
    assert [point["step"] for point in rerun["points"]] == [0, 2] and rerun["settings"]["max_steps"] == 2


def test_sample_completions_counts_tokens_and_marks_completions_cut_at_the_cap(tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_micro.scripts.rl_utils import sample_completions
    from trl_micro.testing_utils import tiny_backbone_config

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_backbone_config(tokenizer))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = ["Question number 1: how do I cook rice?", "Tell me a story."]
    others = [token for token in range(policy.config.vocab_size) if token != tokenizer.eos_token_id]

    # Only the end-of-sequence token can be sampled: every completion ends at its first token.
    texts, lengths, capped = sample_completions(
        policy, tokenizer, prompts, max_new_tokens=5, return_lengths=True, suppress_tokens=others
    )
    assert len(texts) == 2 and lengths == [1, 1] and capped == [False, False]

    # The end-of-sequence token can never be sampled: every completion runs to the cap.
    texts, lengths, capped = sample_completions(
        policy, tokenizer, prompts, max_new_tokens=5, return_lengths=True, suppress_tokens=[tokenizer.eos_token_id]
    )
    assert lengths == [5, 5] and capped == [True, True]
    assert all(isinstance(text, str) for text in sample_completions(policy, tokenizer, prompts, max_new_tokens=2))


def test_dsp_scenario_trains_on_disjoint_queries_and_reports_the_cross_domain_matrix(tmp_path):
    from benchmarks.rl.personalization_rewards import DSPRewardSetup, draw_dsp_pools
    from trl_micro.bundled.data_dir import resolve_data_dir

    from .conftest import skip_unless_strict

    try:
        data_dir = resolve_data_dir()
    except FileNotFoundError as error:
        skip_unless_strict(str(error))
    setup = DSPRewardSetup(stage1_queries=6, adaptation_queries=4, adaptation_pairs=4, gold_queries=6, test_queries=4)
    pools = draw_dsp_pools(setup, data_dir)
    queries = {name: {str(row["prompt"]) for row in pools[name]} for name in ("stage1", "adaptation", "gold", "test")}
    for first in queries:
        for second in queries:
            assert first == second or not queries[first] & queries[second], (first, second)
    assert {str(q) for q in pools["train_prompts"]["query"]} == queries["stage1"]
    assert {str(q) for q in pools["eval_prompts"]["query"]} == queries["test"]  # held-out prompts: unseen queries
    assert "context" not in pools["stage1"].column_names and len(set(pools["stage1"]["context_id"])) == 4
    for name in ("adaptation", "gold", "test", "eval_prompts"):
        assert set(pools[name]["context_id"]) == {"academy", "entertainment"}, name
    assert sorted(pools["adaptation"]["context_id"]) == ["academy"] * 4 + ["entertainment"] * 4
    with pytest.raises(ValueError, match="DSP domains must be some of"):
        draw_dsp_pools(DSPRewardSetup(domains=("cooking",)), data_dir)
    with pytest.raises(ValueError, match="none is left"):
        draw_dsp_pools(DSPRewardSetup(stage1_queries=10_000), data_dir)

    output = tmp_path / "out"
    argv = ["--preset", "smoke", "--scenario", "dsp", "--seeds", "0", "--output_dir", str(output)]
    main([*argv, "--cache_dir", str(tmp_path / "scratch"), "--data_dir", str(data_dir)])
    results = json.loads((output / "rl_personalization_dsp.json").read_text())
    assert results["scenario"] == "dsp" and results["summary"]["contexts"] == ["academy", "entertainment"]
    assert {run["method"] for run in results["runs"]} == {"micro", "single", "gold"}
    matrix = results["summary"]["table"]["academy"]["micro"]["cross_win_rate"]
    assert set(matrix) == {"academy", "entertainment"} and all(0 <= v["mean"] <= 1 for v in matrix.values())
    markdown = (output / "rl_personalization_dsp.md").read_text()
    assert "DSP pairs of 6 queries" in markdown and "| MiCRo (Stage 2 routing) | academy |" in markdown
    assert (output / "rl_personalization_dsp_curves_academy.png").exists()
    assert "![cross-context matrix](rl_personalization_dsp_cross_context.png)" in markdown
    assert (output / "rl_personalization_dsp_cross_context.png").stat().st_size > 0
    assert len(list((output / "runs").glob("dsp-*-seed0.json"))) == 3


def test_probe_lengths_reports_the_initial_policys_answer_lengths_without_training(tmp_path):
    main(["--preset", "smoke", "--probe_lengths", "6", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path)])
    probe = json.loads((tmp_path / "initial_lengths.json").read_text())
    assert probe["budget"] == 6 and set(probe["contexts"]) == {"subpop-0", "subpop-1"}
    for value in probe["contexts"].values():
        assert 1 <= value["mean_tokens"] <= 6 and 0 <= value["cap_share"] <= 1 and value["samples"] == 4
    report = (tmp_path / "initial_lengths.md").read_text()
    assert report.startswith("# How long the initial policy answers (synthetic scenario)") and "| subpop-0 |" in report
    assert not list((tmp_path / "runs").glob("*.json"))  # nothing trained
