"""
`trl-micro serve` on 127.0.0.1: OpenRLHF's own remote-reward client, the native and feedback endpoints, the dynamic
batcher, the refusals, and verl's own reward loading and reward manager. Every server is started by the test on a free loopback
port, gets a bounded number of requests, and is stopped by the test.
"""

import asyncio
import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from trl_micro import OnlineRouter, open_user_store
from trl_micro.rewards import MiCRoReward
from trl_micro.scripts.serve import ServeArguments, build_app
from trl_micro.serving import DynamicBatcher, server_config
from trl_micro.serving.verl_reward import compute_score, compute_score_batch

from .conftest import CONTEXTS, skip_unless_strict
from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)

uvicorn = pytest.importorskip("uvicorn")

PROMPTS = [
    [{"role": "system", "content": CONTEXTS["short"]}, {"role": "user", "content": "Question number 3?"}],
    [{"role": "system", "content": CONTEXTS["long"]}, {"role": "user", "content": "Question number 4?"}],
]
COMPLETIONS = ["Sure.", "Here is a detailed answer that walks through every step carefully."]
REQUEST_TIMEOUT = 60
VERL_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "verl_micro_reward.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(app):
    """`app` served by uvicorn (`server_config`: the header timeout, the connection cap) on a free 127.0.0.1 port in a
    thread; yields its base URL; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running_server(args: ServeArguments):
    """`build_app(args)` served on 127.0.0.1 (see `serving`)."""
    with serving(build_app(args)) as url:
        yield url


def exchange(url: str, payload=None, raw: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body text) of one request."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method or ("POST" if data is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def call(url: str, payload=None, raw: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, decoded JSON or text) of one request."""
    status, _, body = exchange(url, payload, raw, headers, method)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def rendered(tokenizer, prompt, completion=None) -> str:
    messages = prompt + ([{"role": "assistant", "content": completion}] if completion is not None else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None)


@pytest.fixture(scope="module")
def in_process(reward_checkpoint):  # noqa: F811
    return MiCRoReward.from_pretrained(reward_checkpoint, context_column=None)


def openrlhf_rows(tokenizer):
    prompts = [rendered(tokenizer, p) for p in PROMPTS for _ in COMPLETIONS]
    queries = [rendered(tokenizer, p, c) for p in PROMPTS for c in COMPLETIONS]
    return queries, prompts


def openrlhf_client():
    """OpenRLHF's own remote-reward client (`SingleTurnAgentExecutor._fetch_rewards_via_http`), when installed."""
    if importlib.util.find_spec("openrlhf") is None:
        skip_unless_strict("OpenRLHF is not installed (make installs it with --no-deps)")
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    return SingleTurnAgentExecutor


def test_openrlhf_client_gets_the_in_process_rewards(reward_checkpoint, in_process, tmp_path):  # noqa: F811
    executor_class = openrlhf_client()
    tokenizer = in_process.tokenizer
    queries, prompts = openrlhf_rows(tokenizer)
    router = OnlineRouter(num_heads=2)
    router.update("long-reader", torch.tensor([[-6.0, 6.0]] * 3))
    router.save(tmp_path / "router.json")
    args = ServeArguments(
        model_name_or_path=reward_checkpoint, online_router=str(tmp_path / "router.json"), user_field="labels"
    )
    labels = ["short-reader", "short-reader", "long-reader", "nobody"]
    with running_server(args) as url:
        executor = executor_class(f"{url}/get_reward")
        (answer,) = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, labels))
        status, metrics = call(f"{url}/metrics")
    # what OpenRLHF reads of the answer: `rewards`, `scores` (else `rewards`), `extra_logs` (a dict)
    assert set(answer) >= {"rewards", "scores", "extra_logs"} and answer["scores"] == answer["rewards"]
    routed = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", online_router=str(tmp_path / "router.json")
    )
    completions = [q[len(p) :] for q, p in zip(queries, prompts)]
    expected = routed.score(prompts, completions, users=labels)
    torch.testing.assert_close(torch.tensor(answer["rewards"]), expected["rewards"], rtol=0, atol=1e-5)
    assert set(answer["extra_logs"]) == {"head_reward_0", "head_reward_1", "online_routed"}
    torch.testing.assert_close(
        torch.tensor(answer["extra_logs"]["head_reward_1"]), expected["head_rewards"][:, 1], rtol=0, atol=1e-5
    )
    assert answer["extra_logs"]["online_routed"] == [0.0, 0.0, 1.0, 0.0]  # only long-reader is in the store
    assert status == 200 and "trl_micro_fallback_rows_total 3.0" in metrics  # short-reader x2 and nobody


def test_native_endpoint_scores_text_and_messages_and_returns_heads(reward_checkpoint, in_process):  # noqa: F811
    rows = [{"prompt": p, "completion": [{"role": "assistant", "content": c}]} for p in PROMPTS for c in COMPLETIONS]
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint)) as url:
        status, answer = call(f"{url}/score", {"rows": rows, "return_heads": True})
        health = call(f"{url}/health")
    assert status == 200 and health == (200, {"status": "ok", "num_heads": 2, "feedback": False})  # no process id
    expected = in_process.score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    torch.testing.assert_close(torch.tensor(answer["rewards"]), expected["rewards"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(answer["head_rewards"]), expected["head_rewards"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(answer["mixture_weights"]), expected["mixture_weights"], rtol=0, atol=1e-5)


def test_concurrent_clients_get_their_own_rewards(reward_checkpoint, in_process):  # noqa: F811
    """8 clients x 4 rows at once: each answer is that client's rows, as scored in process."""
    rows = [
        {"prompt": PROMPTS[i % 2], "completion": [{"role": "assistant", "content": f"{COMPLETIONS[i % 2]} {i}"}]}
        for i in range(32)
    ]
    expected = in_process.score([r["prompt"] for r in rows], [r["completion"] for r in rows])["rewards"]
    args = ServeArguments(model_name_or_path=reward_checkpoint, max_wait_ms=50)
    with running_server(args) as url, ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(lambda c: call(f"{url}/score", {"rows": rows[4 * c : 4 * c + 4]}), range(8)))
        _, metrics = call(f"{url}/metrics")
    for client, (status, answer) in enumerate(answers):
        assert status == 200
        torch.testing.assert_close(
            torch.tensor(answer["rewards"]), expected[4 * client : 4 * client + 4], rtol=0, atol=1e-5
        )
    assert "trl_micro_rows_total 32.0" in metrics and "trl_micro_batch_rows_count" in metrics


def test_the_batcher_scores_requests_that_arrive_together_in_one_call():
    batches = []

    def score_rows(rows):
        batches.append(len(rows))
        return [row * 10 for row in rows]

    async def scenario():
        batcher = DynamicBatcher(score_rows, ThreadPoolExecutor(1), max_batch_size=12, max_wait_ms=200)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit([4 * c + i for i in range(4)]) for c in range(5)))
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[10 * (4 * c + i) for i in range(4)] for c in range(5)]  # each request its own rows, in order
    assert batches == [12, 8]  # three requests fill a batch of 12; the fourth starts the next one


def test_feedback_updates_the_store_and_is_off_by_default(reward_checkpoint, in_process, tmp_path):  # noqa: F811
    store = f"sqlite:///{tmp_path / 'feedback' / 'users.db'}"
    comparison = {
        "user": "alice",
        "prompt": PROMPTS[0],
        "chosen": [{"role": "assistant", "content": "Sure."}],
        "rejected": [{"role": "assistant", "content": COMPLETIONS[1]}],
    }
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint)) as url:
        status, answer = call(f"{url}/feedback", {"comparisons": [comparison]})
    assert status == 403 and "--allow_feedback" in answer["detail"]
    args = ServeArguments(
        model_name_or_path=reward_checkpoint, user_store=store, allow_feedback=True, feature_dir=str(tmp_path / "f")
    )
    with running_server(args) as url:
        for _ in range(3):
            status, answer = call(f"{url}/feedback", {"comparisons": [comparison, {**comparison, "user": 7}]})
            assert status == 200
        _, metrics = call(f"{url}/metrics")
    assert answer["num_updates"] == {"7": 3, "alice": 3} and "trl_micro_feedback_total 6.0" in metrics
    stored = open_user_store(store).to_online_router()
    heads = in_process.score([PROMPTS[0]] * 2, [comparison["chosen"], comparison["rejected"]])["head_rewards"]
    expected = OnlineRouter(num_heads=2)
    expected.update("alice", (heads[0] - heads[1]).double().repeat(3, 1))
    torch.testing.assert_close(stored.weights("alice"), expected.weights("alice"), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/get_reward", b"{not json", 422, "JSON decode error"),
        ("/get_reward", {"prompts": ["a"]}, 422, "query"),
        ("/get_reward", {"query": ["ab", "cd"], "prompts": ["a"]}, 422, "`query` has 2 rows and `prompts` 1"),
        ("/get_reward", {"query": ["hello"]}, 422, "`prompts` is missing"),
        ("/get_reward", {"query": ["hello world"], "prompts": ["bye"]}, 422, "does not start with prompts[0]"),
        ("/get_reward", {"query": ["same"], "prompts": ["same"]}, 422, "the response of query[0] is empty"),
        ("/score", {"rows": []}, 422, "no rows"),
        ("/score", {"rows": [{"prompt": "a"}]}, 422, "completion"),
        ("/score", {"rows": [{"prompt": "a", "completion": "  "}]}, 422, "rows[0].completion is empty"),
        ("/score", {"rows": [{"prompt": "a", "completion": "b"}] * 5}, 413, "at most 4 per request"),
        ("/score", {"rows": [{"prompt": "a" * 3000, "completion": "b"}]}, 413, "at most 2048"),
    ],
)
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(reward_checkpoint, path, body, status, message):  # noqa: F811
    args = ServeArguments(model_name_or_path=reward_checkpoint, max_rows_per_request=4, max_request_bytes=2048)
    with running_server(args) as url:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer = call(f"{url}{path}", raw=raw)
        assert got == status and message in json.dumps(answer), answer
        assert call(f"{url}/score", {"rows": [{"prompt": "Hi.", "completion": "Hello."}]})[0] == 200


def test_a_token_guards_every_endpoint_but_health(reward_checkpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRL_MICRO_API_KEY", "s3cret")
    row = {"rows": [{"prompt": "Hi.", "completion": "Hello."}]}
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint)) as url:
        assert call(f"{url}/score", row)[0] == 401
        assert call(f"{url}/score", row, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/score", row, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(f"{url}/metrics")[0] == 401 and call(f"{url}/health")[0] == 200


def test_feedback_needs_a_store_and_a_missing_store_is_named(reward_checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--user_store URL"):
        build_app(ServeArguments(model_name_or_path=reward_checkpoint, allow_feedback=True))
    json_file = str(tmp_path / "router.json")
    with pytest.raises(ValueError, match=f"trl-micro users import {json_file} --user_store URL"):
        build_app(ServeArguments(model_name_or_path=reward_checkpoint, online_router=json_file, allow_feedback=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_app(ServeArguments(model_name_or_path=reward_checkpoint, online_router=str(tmp_path / "none.json")))


def test_verl_reward_function_scores_through_the_server_and_in_process(reward_checkpoint, in_process):  # noqa: F811
    """verl's reward managers call `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)` (naive)
    or `compute_score_batch` with lists (batch); the prompt travels in extra_info."""
    extra_infos = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "user_id": "x"}]
    expected = in_process.score(
        [e["prompt"] for e in extra_infos], [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    )["rewards"]
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint)) as url:
        served = [
            compute_score(data_source="dsp", solution_str=c, ground_truth=None, extra_info=e, url=url)
            for c, e in zip(COMPLETIONS, extra_infos)
        ]
    local = compute_score_batch(["dsp"] * 2, COMPLETIONS, [None] * 2, extra_infos, model_name_or_path=reward_checkpoint)
    torch.testing.assert_close(torch.tensor(served), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(local), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="extra_info has no 'prompt'"):
        compute_score("dsp", "Sure.", None, {"question": "?"}, model_name_or_path=reward_checkpoint)


def verl_reward_api():
    """verl's reward-function loader and reward-manager resolver (what its PPO trainer calls), when installed."""
    if importlib.util.find_spec("verl") is None:
        skip_unless_strict("verl is not installed (make installs it with --no-deps)")
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    return DataProto, load_reward_manager


def verl_batch(DataProto, tokenizer, completions, extra_infos):  # noqa: N803 (verl's class)
    """A rollout batch as verl's trainer hands it to a reward manager: prompt ids, right-padded response ids, an
    attention mask over both that marks the valid tokens, and the dataset's `data_source`, `reward_model` and
    `extra_info` per row."""
    import numpy as np

    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    width = max(map(len, ids))
    responses = torch.full((len(ids), width), tokenizer.pad_token_id)
    response_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, row_ids in enumerate(ids):
        responses[row, : len(row_ids)], response_mask[row, : len(row_ids)] = torch.tensor(row_ids), 1
    prompts = torch.full((len(ids), 3), tokenizer.pad_token_id)
    attention_mask = torch.cat([torch.ones_like(prompts), response_mask], dim=1)
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attention_mask},
        non_tensors={
            "data_source": np.array(["dsp"] * len(ids), dtype=object),
            "reward_model": np.array([{"ground_truth": None}] * len(ids), dtype=object),
            "extra_info": np.array(extra_infos, dtype=object),
        },
    )


def test_verl_loads_the_recipe_and_its_reward_manager_gets_the_routed_rewards(reward_checkpoint, tmp_path):  # noqa: F811
    """recipes/verl_micro_reward.yaml loaded by verl's own `load_reward_manager` (the custom reward function by path
    and name, with its reward_kwargs), and verl's default reward manager scoring a rollout batch row by row, as verl's
    reward loop does, through a server that routes the user named in extra_info: the rewards are the in-process routed
    rewards, a known user's differ from the checkpoint's own routing, an unknown user falls back to it."""
    from omegaconf import OmegaConf

    import trl_micro.serving.verl_reward as verl_reward

    DataProto, load_reward_manager = verl_reward_api()  # noqa: N806
    store = str(tmp_path / "router.json")
    router = OnlineRouter(num_heads=2)
    router.update("long-reader", torch.tensor([[-6.0, 6.0]] * 3))
    router.save(store)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    users = ["long-reader", None, "long-reader", "nobody"]
    completions = COMPLETIONS * 2
    extra_infos = [{"prompt": p} if u is None else {"prompt": p, "user_id": u} for p, u in zip(prompts, users)]
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    routed = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", online_router=store
    )
    expected = routed.score(prompts, messages, users=users)["rewards"]
    unrouted = MiCRoReward.from_pretrained(reward_checkpoint, context_column=None).score(prompts, messages)["rewards"]

    config = OmegaConf.merge(
        OmegaConf.load(VERL_RECIPE), {"reward": {"reward_manager": {"source": "register", "name": "naive"}}}
    )
    config.reward.custom_reward_function.path = verl_reward.__file__
    batch = verl_batch(DataProto, routed.tokenizer, completions, extra_infos)
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint, online_router=store)) as url:
        config.reward.custom_reward_function.reward_kwargs.url = url
        manager = load_reward_manager(config, routed.tokenizer)

        async def score_rows():
            return await asyncio.gather(*(manager.run_single(batch[i : i + 1]) for i in range(len(batch))))

        outputs = manager.loop.run_until_complete(score_rows())
    assert type(manager).__name__ == "NaiveRewardManager"
    served = torch.tensor([output["reward_score"] for output in outputs])
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
    assert (served[[0, 2]] - unrouted[[0, 2]]).abs().min() > 1e-3  # long-reader was routed by its user id
    torch.testing.assert_close(served[[1, 3]], unrouted[[1, 3]], rtol=0, atol=1e-5)  # no user, unknown user


def test_rerank_endpoint_picks_as_the_reward_does_and_locates_bad_candidates(reward_checkpoint, tmp_path):  # noqa: F811
    """/rerank answers each line's pick per user as `MiCRoReward.rerank` in process; a refused candidate is a 422
    naming `lines[i].candidates[j]`; a user the store does not know is routed by the router."""
    router = OnlineRouter(num_heads=2)
    router.update("long-reader", torch.tensor([[-6.0, 6.0]] * 3))
    router.save(tmp_path / "router.json")

    def said(*texts):
        return [[{"role": "assistant", "content": text}] for text in texts]

    lines = [
        {"prompt": PROMPTS[0], "candidates": said(*COMPLETIONS), "users": ["long-reader", "nobody", None]},
        {"prompt": PROMPTS[1], "candidates": said(COMPLETIONS[1], COMPLETIONS[0], COMPLETIONS[1] + " More.")},
    ]
    args = ServeArguments(model_name_or_path=reward_checkpoint, online_router=str(tmp_path / "router.json"))
    with running_server(args) as url:
        status, answer = call(f"{url}/rerank", {"lines": lines})
        bad = call(
            f"{url}/rerank", {"lines": [lines[0], {"prompt": PROMPTS[1], "candidates": [*said("fine"), "plain text"]}]}
        )
        empty = call(f"{url}/rerank", {"lines": [{"prompt": PROMPTS[0], "candidates": []}]})
    assert status == 200, answer
    local = MiCRoReward.from_pretrained(
        reward_checkpoint, context_column=None, user_column="user", online_router=str(tmp_path / "router.json")
    )
    expected = local.rerank(
        [line["prompt"] for line in lines], [line["candidates"] for line in lines], users=[lines[0]["users"], [None]]
    ).to_records()
    assert [(p["line"], p["user"], p["best"], p["online_routed"]) for p in answer["picks"]] == [
        (r["prompt_index"], r["user"], r["best"], r["online_routed"]) for r in expected
    ]
    assert [p["online_routed"] for p in answer["picks"]] == [True, False, False, False]
    for pick, record in zip(answer["picks"], expected):
        torch.testing.assert_close(torch.tensor(pick["scores"]), torch.tensor(record["scores"]), rtol=0, atol=1e-5)
    assert bad[0] == 422 and bad[1]["detail"].startswith("lines[1].candidates[1] ")
    assert empty[0] == 422 and "candidates" in json.dumps(empty[1])
