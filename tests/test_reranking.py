"""Personalized best-of-n (`MiCRoReward.rerank`, `trl-micro rerank`) on a tiny real model: picks, cost, bad input."""

import json

import pytest
import torch

from trl_micro.feature_cache import FeatureStore
from trl_micro.personalization.online_router import OnlineRouter
from trl_micro.personalization.residual_heads import ResidualHeads
from trl_micro.reward_inputs import InvalidRow, InvalidUserId
from trl_micro.rewards import MiCRoReward
from trl_micro.testing_utils import build_tiny_micro_model

from .conftest import STYLES


def chat(role, text):
    return [{"role": role, "content": text}]


PROMPTS = [chat("user", "Question number 1: how do I learn chess?"), chat("user", "Question number 2: rice?")]
CANDIDATES = [
    [chat("assistant", text) for text in (*STYLES["short"], STYLES["long"][0])],
    [chat("assistant", text) for text in (STYLES["long"][1], STYLES["short"][1], *STYLES["long"][:1])],
]


@pytest.fixture()
def reward(tokenizer):
    """Three heads, the second the opposite of the first; users `a` (head 0) and `b` (head 1), `a` with a residual."""
    model = build_tiny_micro_model(tokenizer, num_heads=3, seed=1)
    with torch.no_grad():
        model.heads.weight[1] = -model.heads.weight[0]
    router = OnlineRouter(num_heads=3)
    for _ in range(4):
        router.update("a", [4.0, -4.0, 0.0])
        router.update("b", [-4.0, 4.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    size = model.config.reward_feature_size
    residuals = ResidualHeads(hidden_size=size, l2=1.0)
    residuals.fit("a", torch.randn(8, generator=generator), torch.randn(8, size, generator=generator))
    return MiCRoReward(model, tokenizer, user_column="user", online_router=router, residual_heads=residuals)


def test_the_pick_is_the_argmax_of_each_users_routed_reward(reward):
    users = [["a", "b", None, "stranger"], ["b", "a"]]
    ranked = reward.rerank(PROMPTS, CANDIDATES, users=users)
    for index, (prompt, candidates) in enumerate(zip(PROMPTS, CANDIDATES)):
        assert ranked.scores[index].shape == (len(users[index]), len(candidates))
        for position, user in enumerate(users[index]):
            expected = reward.score([prompt] * len(candidates), candidates, users=[user] * len(candidates))["rewards"]
            torch.testing.assert_close(ranked.scores[index][position], expected, rtol=1e-4, atol=1e-5)
            assert ranked.best[index][position] == int(expected.argmax())
    assert ranked.online_routed[0].tolist() == [True, True, False, False]
    # Opposite heads: `a` and `b` rank the candidates in opposite orders (the residual is small), so they pick apart.
    assert ranked.best[0][0] != ranked.best[0][1]
    assert ranked.best[0][2] == ranked.best[0][3]  # no user and an unknown user: both routed by the router
    records = ranked.to_records()
    assert [(r["prompt_index"], r["user"]) for r in records] == [(0, "a"), (0, "b"), (0, None), (0, "stranger")] + [
        (1, "b"),
        (1, "a"),
    ]
    assert records[0]["best"] == ranked.best[0][0] and len(records[0]["scores"]) == 4


def test_integer_user_ids_are_the_stores_decimal_strings(reward):
    reward.online_router.update("7", [4.0, -4.0, 0.0])
    ranked = reward.rerank(PROMPTS[:1], CANDIDATES[:1], users=[[7, "7"]])
    assert ranked.users == [["7", "7"]]
    torch.testing.assert_close(ranked.scores[0][0], ranked.scores[0][1])


def count_backbone_rows(model):
    """Sequences the backbone reads (rows of every forward call), counted by a forward hook."""
    counted = {"rows": 0, "calls": 0}

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counted["rows"] += ids.shape[0]
        counted["calls"] += 1

    return counted, model.backbone.register_forward_hook(hook, with_kwargs=True)


def test_each_candidate_goes_through_the_backbone_once_however_many_users_rank_it(reward, tmp_path):
    num_candidates = sum(len(group) for group in CANDIDATES)
    counted, handle = count_backbone_rows(reward.model)
    try:
        reward.rerank(PROMPTS, CANDIDATES, users=[["a"], ["a"]])
        one_user = counted["rows"]
        reward.rerank(PROMPTS, CANDIDATES, users=[["a", "b", None, 5], ["b", "a", "c", None]])
        four_users = counted["rows"] - one_user
        assert one_user == four_users == num_candidates
        before = counted["rows"]  # scoring per user instead costs a pass per candidate and user
        for user in ("a", "b", None, "c"):
            reward.score([PROMPTS[0]] * 4, CANDIDATES[0], users=[user] * 4)
        assert counted["rows"] - before == 4 * len(CANDIDATES[0])

        store = FeatureStore(reward.model, tmp_path / "features")
        first = reward.rerank(PROMPTS, CANDIDATES, users=[["a", "b"]] * 2, feature_store=store)
        before = counted["rows"]
        again = reward.rerank(PROMPTS, CANDIDATES, users=[["a", "b"]] * 2, feature_store=store)
        assert counted["rows"] == before and store.num_reused == num_candidates  # read back, no backbone pass
        reward.rerank(PROMPTS, CANDIDATES, users=[["b"]] * 2, feature_store=tmp_path / "features")  # a root folder
        assert counted["rows"] == before
    finally:
        handle.remove()
    assert first.best == again.best
    other = FeatureStore(build_tiny_micro_model(reward.tokenizer, num_heads=3, seed=2), tmp_path / "features")
    with pytest.raises(ValueError, match="another model's readouts"):
        reward.rerank(PROMPTS, CANDIDATES, feature_store=other)
    for stored, computed in zip(again.scores, reward.rerank(PROMPTS, CANDIDATES, users=[["a", "b"]] * 2).scores):
        torch.testing.assert_close(stored, computed, rtol=1e-4, atol=1e-5)


def test_contexts_belong_to_the_prompt_and_are_read_as_score_reads_them(reward):
    contexts = ["I am busy; keep answers short.", None]
    ranked = reward.rerank(PROMPTS, CANDIDATES, users=[[None], [None]], contexts=contexts)
    n = len(CANDIDATES[0])
    expected = reward.score([PROMPTS[0]] * n, CANDIDATES[0], contexts=[contexts[0]] * n)["rewards"]
    torch.testing.assert_close(ranked.scores[0][0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prompts=[], candidates=[]), ValueError, "`prompts` is empty"),
        (dict(candidates=CANDIDATES[:1]), ValueError, "one list of candidate completions per prompt: 2 prompts, got 1"),
        (dict(candidates=[CANDIDATES[0], []]), ValueError, r"`candidates\[1\]` is empty"),
        (dict(candidates=[CANDIDATES[0], CANDIDATES[1][0]]), ValueError, r"`candidates\[1\]` must be a list"),
        (dict(users=[["a"]]), ValueError, "one list of user ids per prompt .*: 2 prompts, got 1"),
        (dict(users=["a", "b"]), ValueError, r"`users\[0\]` must be a list of user ids.*\[user_id\]"),
        (dict(users=[["a"], []]), ValueError, r"`users\[1\]` is empty"),
        (dict(users=[["a"], ["b", 1.5]]), InvalidUserId, r"`users\[1\]\[1\]` must be a str or an int"),
        (dict(contexts=["only one"]), ValueError, "one context \\(or None\\) per prompt: 2 prompts, got 1"),
        (
            dict(candidates=[CANDIDATES[0], [*CANDIDATES[1][:2], None]]),
            InvalidRow,
            r"`candidates\[1\]\[2\]` is NoneType",
        ),
        (dict(candidates=[CANDIDATES[0], ["plain text", *CANDIDATES[1][1:]]]), InvalidRow, r"`candidates\[1\]\[0\]`"),
        (dict(prompts=[PROMPTS[0], 3]), InvalidRow, r"`prompts\[1\]` is int"),
    ],
)
def test_bad_input_is_refused_naming_the_field(reward, kwargs, error, message):
    arguments = {**dict(prompts=PROMPTS, candidates=CANDIDATES, users=[["a"], ["b"]]), **kwargs}
    with pytest.raises(error, match=message):
        reward.rerank(**arguments)


def test_the_rerank_command_writes_each_users_pick_and_scores(reward, tokenizer, tmp_path):
    from trl_micro.scripts.cli import main

    checkpoint = tmp_path / "micro-rm"
    reward.model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    reward.online_router.save(tmp_path / "online_router.json")
    reward.residual_heads.save(tmp_path / "residual_heads.json")
    rows = [
        {"prompt": PROMPTS[0], "candidates": CANDIDATES[0], "users": ["a", "b", None]},
        {"id": "q2", "prompt": PROMPTS[1], "candidates": CANDIDATES[1], "users": ["b"], "context": "Be brief."},
    ]
    source = tmp_path / "candidates.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "picks.jsonl"
    argv = ["rerank", "--model_name_or_path", str(checkpoint), "--input", str(source), "--output", str(output)]
    argv += ["--online_router", str(tmp_path / "online_router.json")]
    argv += ["--residual_heads", str(tmp_path / "residual_heads.json"), "--batch_size", "3"]
    assert main(argv) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    expected = reward.rerank(
        PROMPTS, CANDIDATES, users=[["a", "b", None], ["b"]], contexts=[None, "Be brief."]
    ).to_records()
    assert [(row["line"], row["id"], row["user"]) for row in written] == [
        (1, None, "a"),
        (1, None, "b"),
        (1, None, None),
        (2, "q2", "b"),
    ]
    for got, want in zip(written, expected):
        assert got["best"] == want["best"]
        assert got["scores"] == pytest.approx(want["scores"], rel=1e-4, abs=1e-5)
        assert got["online_routed"] == want["online_routed"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "candidates": []}) + "\n")
    with pytest.raises(SystemExit, match=r"line 2: `candidates` is empty"):
        main(["rerank", "--model_name_or_path", str(checkpoint), "--input", str(bad), "--output", str(output)])
