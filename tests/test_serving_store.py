"""
`trl-micro serve --user_store`: replicas on one store see each other's feedback within the staleness bound, a failed
commit changes nothing (in the store or in the server's memory), and a retried comparison id is applied once. Servers
run on 127.0.0.1, get a bounded number of requests, and are stopped by the tests.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from trl_micro.personalization.stores import UserStore
from trl_micro.scripts.serve import ServeArguments

from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)
from .store_fixtures import postgres_server, store_url  # noqa: F401 (fixtures)
from .test_serving import PROMPTS, call, running_server

ROW = {"prompt": PROMPTS[0], "completion": [{"role": "assistant", "content": "Sure."}], "user": "erin"}


def comparison(comparison_id: str | None = None, user: str = "erin") -> dict:
    return {
        "user": user,
        "prompt": PROMPTS[0],
        "chosen": [{"role": "assistant", "content": "Here is a detailed answer that walks through every step."}],
        "rejected": [{"role": "assistant", "content": "Sure."}],
        "comparison_id": comparison_id,
    }


def test_a_replica_routes_a_user_within_a_second_of_another_replicas_acknowledgement(
    store_url,  # noqa: F811
    reward_checkpoint,  # noqa: F811
    tmp_path,
):
    writer = ServeArguments(
        model_name_or_path=reward_checkpoint, user_store=store_url, allow_feedback=True, feature_dir=str(tmp_path)
    )
    reader = ServeArguments(model_name_or_path=reward_checkpoint, user_store=store_url, store_staleness_s=0.5)
    with running_server(writer) as a, running_server(reader) as b:
        status, first = call(f"{b}/score", {"rows": [ROW], "return_heads": True})
        assert status == 200 and first["online_routed"] == [False]
        status, answer = call(f"{a}/feedback", {"comparisons": [comparison("x1")] * 1})
        assert status == 200 and answer["num_updates"] == {"erin": 1}
        acknowledged = time.monotonic()
        while True:
            status, scored = call(f"{b}/score", {"rows": [ROW], "return_heads": True})
            if scored["online_routed"] == [True]:
                break
            assert time.monotonic() - acknowledged < 1.0, "replica B did not see the comparison within 1 s"
            time.sleep(0.02)
    stored = UserStore(store_url).weights(["erin"])["erin"]
    assert scored["mixture_weights"][0] == pytest.approx(stored.tolist(), abs=1e-6)


def test_a_failed_commit_changes_nothing_and_a_retry_counts_once(reward_checkpoint, tmp_path):  # noqa: F811
    url = f"sqlite:///{tmp_path / 'users.db'}"
    args = ServeArguments(
        model_name_or_path=reward_checkpoint, user_store=url, allow_feedback=True, feature_dir=str(tmp_path / "f")
    )
    with running_server(args) as server:
        store = UserStore(url)
        with store.engine.begin() as connection:  # every log write fails, as a full disk would make it
            connection.execute(
                text(
                    "CREATE TRIGGER fail_log BEFORE INSERT ON trl_micro_comparisons "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            )
        for _ in range(4):
            status, answer = call(f"{server}/feedback", {"comparisons": [comparison("retried")]})
            assert status == 503 and "nothing was applied" in answer["detail"]
        assert store.weights(["erin"]) == {} and store.count_comparisons() == 0
        status, scored = call(f"{server}/score", {"rows": [ROW]})
        assert scored["online_routed"] == [False]  # nothing was kept in the server's memory either
        with store.engine.begin() as connection:
            connection.execute(text("DROP TRIGGER fail_log"))
        status, answer = call(f"{server}/feedback", {"comparisons": [comparison("retried")]})
        assert status == 200 and answer["num_updates"] == {"erin": 1} and answer["duplicates"] == 0
        status, again = call(f"{server}/feedback", {"comparisons": [comparison("retried")]})
        assert status == 200 and again["num_updates"] == {"erin": 1} and again["duplicates"] == 1
        status, scored = call(f"{server}/score", {"rows": [ROW]})
        assert scored["online_routed"] == [True]
    assert store.num_updates(["erin"]) == {"erin": 1} and store.count_comparisons() == 1
