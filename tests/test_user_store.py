"""
The user store on SQLite and on a real PostgreSQL: posterior updates equal to the online router's, the feedback log,
idempotent retries, failed transactions, deletion, JSON import / export, model checks, concurrent writer processes,
the rebuild for new heads, and the reward reading the store with bounded staleness.
"""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest
import torch
from sqlalchemy import text

from trl_micro import OnlineRouter, ResidualHeads
from trl_micro.feature_cache import FeatureStore, reward_model_fingerprint
from trl_micro.personalization.rebuild import rebuild_user_store
from trl_micro.personalization.stores import CachedUserStore, Comparison, UserStore, open_user_store
from trl_micro.rewards import MiCRoReward
from trl_micro.scripts.users import main as users_main
from trl_micro.testing_utils import build_tiny_micro_model

from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)
from .store_fixtures import postgres_server, store_url  # noqa: F401 (fixtures)


def comparisons_of(users, prefix="c"):
    return [
        Comparison(user, f"prompt {i}", f"good {i}", f"bad {i}", None, f"{prefix}{i}") for i, user in enumerate(users)
    ]


@pytest.mark.parametrize("forgetting", [1.0, 0.7])
def test_updates_equal_the_online_router_and_every_comparison_is_logged(store_url, forgetting):  # noqa: F811
    generator = torch.Generator().manual_seed(0)
    users = ["alice", "bob", 17, "alice", "alice", "bob", "17"]
    margins = torch.randn(len(users), 3, generator=generator, dtype=torch.float64) * 3
    margins[4] = 0  # identical responses: logged, not applied
    priors = torch.softmax(torch.randn(len(users), 3, generator=generator, dtype=torch.float64), -1)
    store = open_user_store(store_url, num_heads=3, forgetting=forgetting, model_fingerprint="m1")
    results = []
    for rows in (slice(0, 3), slice(3, None)):  # two requests, the second applied over what the first stored
        results += store.record_comparisons(comparisons_of(users)[rows], margins[rows], priors=priors[rows])
    expected = OnlineRouter(num_heads=3, forgetting=forgetting)
    expected.update_many([str(user) for user in users[:3]], margins[:3], priors[:3])
    expected.update_many([str(user) for user in users[3:]], margins[3:], priors[3:])
    for user in ("alice", "bob", "17"):
        torch.testing.assert_close(store.weights([user])[user], expected.weights(user, dtype=torch.float64))
        assert store.num_updates([user])[user] == expected.num_updates(user)
    assert [result.num_updates for result in results] == [1, 1, 1, 2, 2, 2, 2]  # the zero row is not counted
    logged = list(store.comparisons())
    assert len(logged) == 7 and [row.user_id for row in logged] == [str(user) for user in users]
    assert logged[4].applied is False and logged[0].head_margins == margins[0].tolist()
    assert logged[0].model_fingerprint == "m1" and store.count_comparisons("alice") == 3


def test_a_retried_comparison_is_applied_once_and_answered_as_before(store_url):  # noqa: F811
    store = open_user_store(store_url, num_heads=2)
    comparison = Comparison("alice", [{"role": "user", "content": "Hi"}], "a", "b", "terse", "request-1")
    first = store.record_comparisons([comparison], [[2.0, -1.0]])
    again = store.record_comparisons([comparison], [[2.0, -1.0]])
    assert first[0].num_updates == again[0].num_updates == 1 and again[0].duplicate and not first[0].duplicate
    assert store.count_comparisons() == 1 and list(store.comparisons())[0].prompt == comparison.prompt
    with pytest.raises(ValueError, match="appears twice"):
        store.record_comparisons([Comparison("bob", "p", "a", "b", None, "x")] * 2, [[1.0, 0.0]] * 2)


def test_a_failed_transaction_changes_nothing(store_url):  # noqa: F811
    store = open_user_store(store_url, num_heads=2)
    store.record_comparisons([Comparison("alice", "p", "a", "b")], [[1.0, -1.0]])
    before = store.weights(["alice"])["alice"]
    unserializable = Comparison("carol", ["not a message", {1, 2}], "a", "b")  # the log row cannot be written
    with pytest.raises(TypeError):
        store.record_comparisons([Comparison("alice", "p", "c", "d"), unserializable], [[3.0, -3.0], [1.0, 0.0]])
    torch.testing.assert_close(store.weights(["alice"])["alice"], before)
    assert store.num_updates(["alice", "carol"]) == {"alice": 1} and store.count_comparisons() == 1
    with pytest.raises(TypeError, match=r"comparisons\[0\].user_id"):
        store.record_comparisons([Comparison(17.0, "p", "a", "b")], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        store.record_comparisons([Comparison("alice", "p", "a", "b")], [[float("nan"), 0.0]])


def test_delete_removes_a_users_state_and_log(store_url):  # noqa: F811
    store = open_user_store(store_url, num_heads=2)
    store.record_comparisons(comparisons_of(["alice", "bob", "alice"]), [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    store.set_residuals({"alice": (torch.ones(4), 1.0, 2)})
    assert users_main(["delete", "alice", "--user_store", store_url]) == 0
    assert store.weights(["alice", "bob"]).keys() == {"bob"} and store.residuals(["alice"]) == {}
    assert [row.user_id for row in store.comparisons()] == ["bob"] and len(store) == 1
    assert users_main(["delete", "nobody", "--user_store", store_url]) == 1


def test_json_stores_migrate_with_one_command_and_export_back(store_url, tmp_path):  # noqa: F811
    router = OnlineRouter(num_heads=3, eta=0.5, model_fingerprint="abc")
    router.update_many(["u1", "u2", "u1"], torch.randn(3, 3))
    residuals = ResidualHeads(hidden_size=4, l2=1.0, model_fingerprint="abc")
    residuals.fit("u1", torch.tensor([0.5, -0.2, 0.1]), torch.randn(3, 4))
    router.save(tmp_path / "online_router.json")
    residuals.save(tmp_path / "residual_heads.json")
    paths = [str(tmp_path / "online_router.json"), "--residual_heads", str(tmp_path / "residual_heads.json")]
    assert users_main(["import", *paths, "--user_store", store_url]) == 0
    store = UserStore(store_url)
    assert store.settings.eta == 0.5 and store.settings.model_fingerprint == "abc" and len(store) == 2
    output = ["--output", str(tmp_path / "out.json"), "--residual_output", str(tmp_path / "out_res.json")]
    assert users_main(["export", "--user_store", store_url, *output]) == 0
    exported, exported_residuals = (
        OnlineRouter.load(tmp_path / "out.json"),
        ResidualHeads.load(tmp_path / "out_res.json"),
    )
    for user in ("u1", "u2"):
        torch.testing.assert_close(exported.weights(user), router.weights(user))
        assert exported.num_updates(user) == router.num_updates(user)
    torch.testing.assert_close(exported_residuals.residual("u1"), residuals.residual("u1"))
    assert exported_residuals.l2_of("u1") == 1.0
    other = OnlineRouter(num_heads=2)
    other.save(tmp_path / "other.json")
    assert users_main(["import", str(tmp_path / "other.json"), "--user_store", store_url]) == 1  # another model


def test_a_store_of_another_model_is_refused(store_url, reward_checkpoint):  # noqa: F811
    open_user_store(store_url, num_heads=3)
    with pytest.raises(ValueError, match="num_heads=3, the reward model 2.*trl-micro users rebuild"):
        MiCRoReward.from_pretrained(reward_checkpoint, user_column="user", user_store=store_url)


def test_a_store_of_other_heads_is_refused_by_the_reward(store_url, reward_checkpoint, tokenizer):  # noqa: F811
    other = build_tiny_micro_model(tokenizer, num_heads=2, seed=11)
    open_user_store(store_url, num_heads=2, model_fingerprint=reward_model_fingerprint(other))
    with pytest.raises(ValueError, match="not of this model.*rebuild"):
        MiCRoReward.from_pretrained(reward_checkpoint, user_column="user", user_store=store_url)
    with pytest.raises(ValueError, match="not of this model.*rebuild"):
        open_user_store(store_url, model_fingerprint="other")


def test_a_new_store_needs_num_heads_and_a_url():
    with pytest.raises(ValueError, match="sqlite:///path/users.db"):
        UserStore("users.db")
    with pytest.raises(ValueError, match="pass `num_heads`"):
        open_user_store("sqlite:///:memory:")


def _write_comparisons(url: str, writer: int, count: int) -> None:
    store = UserStore(url)
    for i in range(count):
        user = f"user{i % 5}"
        store.record_comparisons(
            [Comparison(user, "p", f"a{writer}-{i}", "b", None, f"w{writer}-{i}")], [[0.1 * (writer + 1), -0.2]]
        )
    store.close()


@pytest.mark.slow
def test_concurrent_writer_processes_lose_nothing(store_url):  # noqa: F811
    """4 processes x 40 comparisons over 5 shared users: every update is in the log once and in the posterior."""
    store = open_user_store(store_url, num_heads=2)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_comparisons, args=(store_url, writer, 40)) for writer in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert store.count_comparisons() == 160
    expected = OnlineRouter(num_heads=2)
    for writer in range(4):
        for i in range(40):
            expected.update(f"user{i % 5}", [0.1 * (writer + 1), -0.2])
    for user in expected.users():
        assert store.num_updates([user])[user] == 32
        assert sum(row.applied for row in store.comparisons(user)) == 32
        torch.testing.assert_close(store.weights([user])[user], expected.weights(user, dtype=torch.float64))


def test_rebuild_replays_the_log_through_new_heads_without_a_backbone_pass(store_url, tokenizer, tmp_path):  # noqa: F811
    """Feedback scored and kept by one model; new heads on the same (frozen) backbone: the rebuilt posteriors equal
    the new heads' margins replayed, read from the feature store; with another backbone, the backbone runs."""
    old = MiCRoReward(build_tiny_micro_model(tokenizer, num_heads=2, seed=0), tokenizer, context_column=None)
    store = open_user_store(store_url, num_heads=2, model_fingerprint=reward_model_fingerprint(old.model))
    features = FeatureStore(old.model, tmp_path / "features")
    users = ["alice", "bob", "alice", "carol"]
    prompts, chosen, rejected = (
        [f"Question {i}?" for i in range(4)],
        ["Sure."] * 4,
        [f"A long answer {i}." for i in range(4)],
    )
    scored = old.comparison_margins(prompts, chosen, rejected)
    features.add(scored["sequence_keys"], scored["readings"])
    comparisons = [Comparison(u, p, c, r) for u, p, c, r in zip(users, prompts, chosen, rejected)]
    from trl_micro.feature_cache import backbone_fingerprint

    store.record_comparisons(
        comparisons, scored["head_margins"], feature_keys=scored["feature_keys"],
        feature_backbone=backbone_fingerprint(old.model.backbone),
    )  # fmt: skip
    store.set_residuals({"alice": (torch.zeros(old.model.config.reward_feature_size), 1.0, 2)})

    new_model = build_tiny_micro_model(tokenizer, num_heads=3, seed=5)
    new_model.backbone.load_state_dict(old.model.backbone.state_dict())  # same frozen backbone, new heads
    new = MiCRoReward(new_model, tokenizer, context_column=None)
    report = rebuild_user_store(store, new.model, new.encode, tmp_path / "features", progress=False)
    assert report.sequences_computed == 0 and report.sequences_from_features == 8 and report.comparisons == 4
    expected = OnlineRouter(num_heads=3)
    expected.update_many(users, new.comparison_margins(prompts, chosen, rejected)["head_margins"])
    for user in ("alice", "bob", "carol"):
        torch.testing.assert_close(store.weights([user])[user], expected.weights(user, dtype=torch.float64))
    assert store.settings.num_heads == 3 and store.settings.model_fingerprint == reward_model_fingerprint(new_model)
    assert store.residual_users() == ["alice"] and report.residual_users == 1

    other = MiCRoReward(build_tiny_micro_model(tokenizer, num_heads=2, seed=9), tokenizer, context_column=None)
    report = rebuild_user_store(store, other.model, other.encode, tmp_path / "features", progress=False)
    assert report.sequences_computed == 8 and report.users == 3


def test_the_reward_reads_the_store_within_its_staleness_bound(store_url, reward_checkpoint):  # noqa: F811
    reward = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", user_store=store_url, store_staleness_s=0.3
    )
    writer = UserStore(store_url)
    assert isinstance(reward.user_store, CachedUserStore)
    prompt, completion = [{"role": "user", "content": "Hi?"}], [{"role": "assistant", "content": "Sure."}]
    before = reward.score([prompt], [completion], users=["dave"])
    assert not before["online_routed"][0]
    writer.record_comparisons([Comparison("dave", "p", "a", "b")], [[-8.0, 8.0]])
    deadline = time.monotonic() + 5
    while not reward.score([prompt], [completion], users=["dave"])["online_routed"][0]:
        assert time.monotonic() < deadline, "the reward never saw the new user"
        time.sleep(0.05)
    seen = time.monotonic()
    after = reward.score([prompt], [completion], users=["dave"])
    torch.testing.assert_close(
        after["mixture_weights"][0].double(), writer.weights(["dave"])["dave"], atol=1e-6, rtol=0
    )
    assert seen - (deadline - 5) < 0.3 + 1.0


def test_sqlite_store_uses_wal_and_durable_commits(tmp_path):
    store = open_user_store(f"sqlite:///{tmp_path / 'users.db'}", num_heads=2)
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    assert json.loads(json.dumps(store.settings.__dict__))["num_heads"] == 2
