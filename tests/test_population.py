"""Issue 42: `trl-micro eval --routing` and its user store, and the population benchmark's smoke preset."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from trl_micro.checkpoint_evaluation import EvalArguments, context_columns, load_split, split_adaptation
from trl_micro.modeling_micro import MiCRoRewardModel
from trl_micro.personalization.mixture_weights import mixture_weights, posterior_weights
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.stores import open_user_store
from trl_micro.scoring import score_preference_pairs
from trl_micro.scripts.cli import main as cli_main
from trl_micro.value_checks import normalize_user_id

from .conftest import make_conflicting_pairs, save_tiny_checkpoint, skip_unless_strict


@pytest.fixture()
def checkpoint_and_data(tokenizer, tmp_path):
    make_conflicting_pairs(40).to_json(tmp_path / "pairs.jsonl")
    return save_tiny_checkpoint(tokenizer, tmp_path / "ckpt"), str(tmp_path / "pairs.jsonl")


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


# ------------------------------------------------------------------------------------------ the population benchmark
def fake_world(num_queries: int = 30, hidden: int = 8, seed: int = 0):
    """A World without a backbone: random answer features and the domains' rankings built from them."""
    from benchmarks.studies import population

    generator = torch.Generator().manual_seed(seed)
    reward = torch.randn(num_queries, 5, hidden, generator=generator, dtype=torch.float64)
    heads = torch.randn(4, hidden, generator=generator, dtype=torch.float64)
    judges = population.domain_rank_scores(reward, heads)
    return population.World(None, list(range(num_queries)), {}, reward, judges, heads, {})


def test_a_domain_ranks_its_own_answer_first_and_pure_users_follow_their_domain():
    import numpy as np

    from benchmarks.studies import population

    world = fake_world()
    assert bool((world.judges.argmax(-1) == torch.arange(4)).all())  # DSP's label: a domain's own answer wins
    weights = torch.eye(4, dtype=torch.float64)  # four pure users, one per domain
    users = population.draw_users(world, list(range(30)), weights, [400] * 4, np.random.default_rng(0), "u")
    agree = population.judgments(world, users.query, users.winner, users.loser)  # (N, 4): d prefers the winner
    assert bool((agree[torch.arange(len(users.user)), users.user] == 1).all())
    # A 50/50 mixture of two domains: where they disagree, each wins about half the time.
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    mixed = population.draw_users(world, list(range(30)), half, [4000], np.random.default_rng(1), "m")
    votes = population.judgments(world, mixed.query, mixed.winner, mixed.loser)
    split = votes[:, 0] != votes[:, 1]
    share = float(votes[split, 0].mean())
    assert 0.45 < share < 0.55 and int(split.sum()) > 500


def test_learnt_domain_heads_recover_each_domains_judgment_from_the_training_queries():
    from benchmarks.studies import population

    world = fake_world(num_queries=200)
    train, test = list(range(150)), list(range(150, 200))
    learnt, notes = population.learnt_domain_heads(world, train)
    assert learnt.shape == world.judge_heads.shape and set(notes["l2"]) == set(population.DOMAINS)
    pairs = population.test_pairs(world, test)
    deltas = population.reward_deltas(world, pairs.query, pairs.a, pairs.b)
    for domain in range(4):
        # A pair without the domain's own answer is judged by the domain's linear head alone.
        others = (pairs.a != domain) & (pairs.b != domain)
        judged = pairs.judgments[others, domain]
        agree = float(((deltas[others] @ learnt[domain] > 0).double() == judged).double().mean())
        assert agree > 0.85, (domain, agree)
        cosine = torch.nn.functional.cosine_similarity(learnt[domain], world.judge_heads[domain], dim=0)
        assert float(cosine) > 0.8, (domain, float(cosine))


def test_expected_accuracy_is_the_label_probability_and_the_oracle_bounds_every_method():
    from benchmarks.studies import population

    probability = torch.tensor([[0.9, 0.2], [0.3, 0.5]], dtype=torch.float64)  # (pairs, users)
    margins = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(
        population.expected_accuracy(margins, probability), torch.tensor([(0.9 + 0.7) / 2, (0.2 + 0.5) / 2]).double()
    )
    oracle = population.expected_accuracy(probability - 0.5, probability)
    for trial in range(20):
        other = torch.randn(2, 2, generator=torch.Generator().manual_seed(trial))
        assert bool((population.expected_accuracy(other, probability) <= oracle + 1e-12).all())


def test_lore_new_user_weights_are_the_map_under_the_population_prior():
    import numpy as np

    from benchmarks.studies import population

    world = fake_world(hidden=6)
    generator = torch.Generator().manual_seed(3)
    lore = population.LoRe(
        basis=torch.randn(6, 3, generator=generator, dtype=torch.float64),
        user_weights=torch.randn(50, 3, generator=generator, dtype=torch.float64),
        scale=torch.ones(6, dtype=torch.float64),
        l2=0.0,
    )
    weights = torch.full((2, 4), 0.25, dtype=torch.float64)
    users = population.draw_users(world, list(range(30)), weights, [5, 9], np.random.default_rng(2), "n")
    fitted = population.lore_new_users(lore, world, users)
    mean, precision = lore.prior()
    projected = lore.projected(population.reward_deltas(world, users.query, users.winner, users.loser))
    for user in range(2):
        rows = users.user == user
        direct = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [direct], max_iter=1000, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            centered = direct - mean
            loss = torch.nn.functional.softplus(-projected[rows] @ direct).sum() + 0.5 * centered @ precision @ centered
            loss.backward()
            return loss

        optimizer.step(closure)
        torch.testing.assert_close(fitted[user], direct.detach(), atol=1e-6, rtol=1e-6)


def test_population_smoke_preset_reports_every_method_and_goal(tmp_path):
    from trl_micro.bundled.data_dir import resolve_data_dir

    try:
        data_dir = resolve_data_dir()
    except FileNotFoundError as error:
        skip_unless_strict(str(error))
    from benchmarks.studies import population

    output = tmp_path / "population.md"
    argv = ["--preset", "smoke", "--data_dir", str(data_dir), "--cache_dir", str(tmp_path / "cache")]
    assert population.main([*argv, "--output", str(output)]) == 0
    result = json.loads(output.with_suffix(".json").read_text())
    preset = population.PRESETS["smoke"]
    names = population.method_names(preset)
    assert set(result["runs"]) == {"0.1", "1.0"}
    for alpha, part in result["summary"].items():
        assert set(part["seen"]) == set(names)
        oracle = part["seen"][population.ORACLE][0]
        assert all(0 <= mean <= oracle + 1e-12 for mean, _ in part["seen"].values())
        for name in names:
            assert [int(count) for count in part["unseen"][name]] == list(preset.budgets)
            assert all(mean <= part["unseen"][population.ORACLE][count][0] + 1e-12
                       for count, (mean, _) in part["unseen"][name].items())  # fmt: skip
        run = result["runs"][alpha]["0"]
        for variant in (population.MICRO_PLAIN, population.MICRO_USERS):
            # Stage 2 through the store: the posterior recorded comparison by comparison equals adapt_to_users'
            assert run["diagnostics"][f"{variant}: store posterior vs adapt_to_users, max abs difference"] < 1e-9
    goals = {goal["goal"] for goal in result["goals"]}
    assert any("closes >= 0.9" in goal for goal in goals) and any("at least as good" in goal for goal in goals)
    assert "## Goals of the issue" in output.read_text()
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --resume keeps the runs it finds: the second call trains nothing and writes the same figures.
    assert population.main([*argv, "--output", str(output), "--resume"]) == 0
    assert json.loads(output.with_suffix(".json").read_text())["summary"] == result["summary"]
