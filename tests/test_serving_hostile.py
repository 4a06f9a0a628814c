"""
`trl-micro serve` against bad input, overload and hostile clients (issue 40): a test for each finding, each failing
on the server as it was before. Every server runs on a free 127.0.0.1 port, gets a bounded number of requests (raw
sockets where a client misbehaves, each with a timeout) and is stopped by its test.
"""

import asyncio
import gc
import json
import logging
import select
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from benchmarks.performance.serving_soak import connect, head, read_answer
from trl_micro import OnlineRouter
from trl_micro.rewards import MiCRoReward
from trl_micro.scripts.serve import ServeArguments, build_app
from trl_micro.serving import DynamicBatcher, ServeSettings, create_app

from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)
from .serving_fixtures import guarded_server_arguments
from .test_serving import COMPLETIONS, PROMPTS, call, exchange, running_server, serving

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ONE_ROW = {"rows": [{"prompt": "Hi.", "completion": "Hello."}]}
SOCKET_TIMEOUT = 10


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def metric(metrics: str, name: str) -> float:
    """The value of one sample line of Prometheus text (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` seconds (whatever it sends first is read and dropped)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


@pytest.fixture(scope="module")
def guarded(reward_checkpoint, tmp_path_factory):  # noqa: F811
    """A server with a token, a user store, feedback, users in `labels`, a 1 MiB body limit, 1 s body and header
    timeouts, and batches that wait 300 ms for company; plus a `/boom` route that fails (a 500 answered in JSON)."""
    folder = tmp_path_factory.mktemp("guarded")
    limits = dict(max_request_bytes=2**20, body_timeout_s=1.0, header_timeout_s=1.0, max_wait_ms=300)
    app = build_app(guarded_server_arguments(reward_checkpoint, folder, TOKEN, **limits))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a failure inside an endpoint")

    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def plain(reward_checkpoint):  # noqa: F811
    """A server with the default limits."""
    with running_server(ServeArguments(model_name_or_path=reward_checkpoint)) as url:
        yield url


@pytest.fixture(scope="module")
def in_process(reward_checkpoint):  # noqa: F811
    return MiCRoReward.from_pretrained(reward_checkpoint, context_column=None)


# ------------------------------------------------------------------------------ 1. a 4xx where a 500 was answered
MESSAGE = [{"role": "assistant", "content": "Sure."}]
BAD_BODIES = {
    "label 1.5": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [1.5]}', "labels[0] must be a str"),
    "label 17.0": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [17.0]}', "labels[0] must be a str"),
    "label true": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [true]}', "labels[0] must be a str"),
    "label [1]": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [[1]]}', "labels[0] must be a str"),
    "label {}": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [{}]}', "labels[0] must be a str"),
    "label NaN": ("/get_reward", '{"query": ["ab"], "prompts": ["a"], "labels": [NaN]}', "labels[0] must be a str"),
    "lone surrogate in a query": (
        "/get_reward",
        '{"query": ["a b\\ud800"], "prompts": ["a"]}',
        "the response of query[0] has a lone surrogate",
    ),
    "message without a role": (
        "/score",
        json.dumps({"rows": [{"prompt": [{"content": "Hi?"}], "completion": MESSAGE}]}),
        "rows[0].prompt message 0 needs a `role`",
    ),
    "numeric role": (
        "/score",
        json.dumps({"rows": [{"prompt": [{"role": 3, "content": "Hi?"}], "completion": MESSAGE}]}),
        "rows[0].prompt message 0 needs a `role`",
    ),
    "non-text content": (
        "/score",
        json.dumps(
            {
                "rows": [
                    {
                        "prompt": [{"role": "user", "content": "Hi?"}],
                        "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Sure."}]}],
                    }
                ]
            }
        ),
        "rows[0].completion message 0 needs a `content` that is text",
    ),
    "user NaN": ("/score", '{"rows": [{"prompt": "a", "completion": "b", "user": NaN}]}', '"user"'),
    "return_heads NaN": (
        "/score",
        '{"rows": [{"prompt": "a", "completion": "b"}], "return_heads": NaN}',
        "return_heads",
    ),
    "user of 300 digits": (
        "/score",
        '{"rows": [{"prompt": "a", "completion": "b", "user": 1%s}]}' % ("0" * 299),
        "rows[0].user",
    ),
    "feedback: text prompt, messages responses": (
        "/feedback",
        json.dumps({"comparisons": [{"user": "u", "prompt": "Hi?", "chosen": MESSAGE, "rejected": MESSAGE}]}),
        "comparisons[0].chosen is a list of messages and its prompt text",
    ),
    "feedback: one comparison id twice": (
        "/feedback",
        json.dumps(
            {"comparisons": [{"user": "u", "prompt": "Hi?", "chosen": "a", "rejected": "b", "comparison_id": "c1"}] * 2}
        ),
        "comparisons[1].comparison_id repeats comparisons[0].comparison_id",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_gets_a_422_in_valid_json_naming_the_field(guarded, case):
    path, raw, named = BAD_BODIES[case]
    status, _, body = exchange(f"{guarded}{path}", raw=raw.encode(), headers=AUTH)
    assert status == 422, body
    assert named in json.dumps(strict_json(body)), body
    assert call(f"{guarded}/score", ONE_ROW, headers=AUTH)[0] == 200


# --------------------------------------------------------------------------------------- 2. rows fail alone
def test_a_bad_row_never_reaches_a_batch_of_good_ones(guarded):
    """Requests sent together are batched (300 ms): a bad one is refused before it joins, the others are scored."""
    good = {"rows": [{"prompt": PROMPTS[0], "completion": MESSAGE}]}
    bad = {"rows": [{"prompt": PROMPTS[0], "completion": [{"content": "no role"}]}]}
    with ThreadPoolExecutor(6) as clients:
        answers = list(clients.map(lambda body: call(f"{guarded}/score", body, headers=AUTH), [good, good, bad] * 2))
    assert [status for status, _ in answers] == [200, 200, 422] * 2, answers
    assert "rows[0].completion message 0 needs a `role`" in answers[2][1]["detail"]


def test_a_failing_batch_fails_only_the_request_that_broke_it():
    def score_rows(rows):
        if "poison" in rows:
            raise ValueError("a row the scorer cannot take")
        return [row.upper() for row in rows]

    async def scenario():
        batcher = DynamicBatcher(score_rows, ThreadPoolExecutor(1), max_batch_size=16, max_wait_ms=200)
        batcher.start()
        requests = (batcher.submit(["a", "b"]), batcher.submit(["poison"]), batcher.submit(["c"]))
        answers = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=30)
        await batcher.stop()
        return answers

    first, poisoned, third = asyncio.run(scenario())
    assert first == ["A", "B"] and third == ["C"]
    assert isinstance(poisoned, ValueError)


# ---------------------------------------------------------------------------------- 3. user ids: str or int
@pytest.mark.parametrize("user", ["17.0", "true", "1.7e1"])
def test_a_float_or_boolean_user_id_is_refused(guarded, user):
    raw = '{"rows": [{"prompt": "Hi.", "completion": "Hello.", "user": %s}]}' % user
    status, answer = call(f"{guarded}/score", raw=raw.encode(), headers=AUTH)
    assert status == 422 and ["body", "rows", 0, "user"] in [item["loc"][:4] for item in answer["detail"]], answer


def test_an_integer_user_id_is_its_decimal_string(guarded):
    rewards = [
        call(f"{guarded}/score", {"rows": [{**ONE_ROW["rows"][0], "user": user}]}, headers=AUTH)[1]["rewards"]
        for user in (17, "17")
    ]
    assert rewards[0] == rewards[1]


# ----------------------------------------------------------- 4. the body limit counts bytes as they arrive
def test_a_chunked_body_is_refused_once_past_the_limit(guarded):
    """20 MiB offered in chunks to a server taking 1 MiB: the 413 comes while the body is still being sent (what is
    in flight is only the sockets' buffers), not after its end, which is never sent."""
    chunk = b"x" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with connect(guarded) as sock:
        sock.sendall(head("/score", "Content-Type: application/json", "Transfer-Encoding: chunked", *auth_header()))
        try:
            while sent < 20 * 2**20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body = read_answer(sock, timeout=10)
    assert status == 413 and "--max_request_bytes" in body, body
    assert sent < 16 * 2**20


def test_without_the_token_no_body_is_read(guarded):
    """401 from the headers alone: before any chunk is sent, and for a malformed body too (not its 422)."""
    with connect(guarded) as sock:
        sock.sendall(head("/score", "Content-Type: application/json", "Transfer-Encoding: chunked"))
        status, body = read_answer(sock, timeout=5)
    assert status == 401 and "bearer token" in strict_json(body)["detail"]
    assert call(f"{guarded}/score", raw=b"{not json")[0] == 401
    assert call(f"{guarded}/score", raw=b"{not json", headers=AUTH)[0] == 422


def auth_header() -> list[str]:
    return [f"{name}: {value}" for name, value in AUTH.items()]


# ------------------------------------------------------------------- 5. metrics by route, every status counted
def test_metrics_are_labelled_by_route_and_count_answers_of_500(guarded):
    sizes = []
    for start in (0, 150, 300):  # the first round adds the label sets of /metrics and `unmatched`, once
        for index in range(start, start + 150):
            assert exchange(f"{guarded}/made-up/{index}")[0] == 401  # the token is checked first
        sizes.append(len(call(f"{guarded}/metrics", headers=AUTH)[1]))
    metrics = call(f"{guarded}/metrics", headers=AUTH)[1]
    assert "made-up" not in metrics and sizes[2] - sizes[1] < 100, sizes
    assert metric(metrics, 'trl_micro_requests_total{endpoint="unmatched",status="401"}') >= 450
    status, _, body = exchange(f"{guarded}/boom", headers=AUTH)
    assert status == 500 and "server's log" in strict_json(body)["detail"]
    metrics = call(f"{guarded}/metrics", headers=AUTH)[1]
    assert metric(metrics, 'trl_micro_requests_total{endpoint="/boom",status="500"}') == 1


# ------------------------------------------------------------------- 6. texts bounded in characters
def test_a_10_mb_response_is_cut_in_characters_and_scored_as_in_process(plain, in_process):
    huge = "word " * 2_000_000
    started = time.monotonic()
    status, answer = call(f"{plain}/score", {"rows": [{"prompt": "Hi.", "completion": huge}]})
    elapsed = time.monotonic() - started
    assert status == 200 and elapsed < 5, (status, elapsed)
    cut = in_process.score(["Hi."], [huge[: in_process.max_chars]])["rewards"]
    torch.testing.assert_close(torch.tensor(answer["rewards"]), cut, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_process.score(["Hi."], [huge])["rewards"], cut, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- 7. bounds on waiting
def test_a_slow_body_gets_408_and_its_connection_is_closed(guarded):
    with connect(guarded) as sock:
        sock.sendall(head("/score", "Content-Type: application/json", "Content-Length: 100", *auth_header()))
        sock.sendall(b'{"rows": [')  # 10 of 100 bytes, then nothing
        status, body = read_answer(sock, timeout=5)
        assert status == 408 and "--body_timeout_s" in body, body
        assert closed_within(sock, timeout=5)


def test_half_sent_headers_and_silent_connections_are_closed(guarded):
    with connect(guarded) as half, connect(guarded) as silent:
        half.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert closed_within(half, timeout=5) and closed_within(silent, timeout=5)


def test_requests_whose_client_hung_up_are_dropped_before_they_are_scored(plain):
    """8 requests of 256 rows sent while one of 256 is scored, their clients gone at once: none of them is scored,
    and a fresh 1-row request is answered as soon as the first is done."""
    rows = {
        "rows": [
            {"prompt": PROMPTS[0], "completion": [{"role": "assistant", "content": f"{COMPLETIONS[1]} {i}"}]}
            for i in range(256)
        ]
    }
    scored_before = metric(call(f"{plain}/metrics")[1], "trl_micro_rows_total")
    body = json.dumps(rows).encode()
    busy = threading.Thread(target=call, args=(f"{plain}/score", rows))
    busy.start()
    time.sleep(0.2)
    for _ in range(8):
        with connect(plain) as sock:
            sock.sendall(head("/score", "Content-Type: application/json", f"Content-Length: {len(body)}") + body)
    started = time.monotonic()
    status, _ = call(f"{plain}/score", ONE_ROW)
    waited = time.monotonic() - started
    busy.join(timeout=60)
    metrics = call(f"{plain}/metrics")[1]
    scored = metric(metrics, "trl_micro_rows_total") - scored_before
    assert status == 200 and scored <= 2 * 256 + 1, scored
    assert metric(metrics, 'trl_micro_dropped_rows_total{reason="client_gone"}') >= 7 * 256
    assert waited < 10


@pytest.fixture(scope="module")
def queued(reward_checkpoint):  # noqa: F811
    """At most 8 rows admitted, a 0.5 s deadline, batches that wait 2 s for company; the schema served (token)."""
    args = ServeArguments(
        model_name_or_path=reward_checkpoint,
        api_key=TOKEN,
        serve_openapi=True,
        max_queued_rows=8,
        max_rows_per_request=8,
        max_wait_ms=2000,
        request_timeout_s=0.5,
    )
    with running_server(args) as url:
        yield url


def test_past_the_row_bound_503_and_past_the_deadline_503_both_with_retry_after(queued):
    four, eight = ({"rows": ONE_ROW["rows"] * n} for n in (4, 8))
    with ThreadPoolExecutor(1) as client:
        first = client.submit(exchange, f"{queued}/score", four, headers=AUTH)
        time.sleep(0.2)  # the first request waits in the batcher, holding 4 of the 8 rows
        status, headers, body = exchange(f"{queued}/score", eight, headers=AUTH)
        assert status == 503 and headers.get("retry-after") == "1" and "--max_queued_rows" in body, body
        status, headers, body = first.result(timeout=30)
    assert status == 503 and headers.get("retry-after") == "1" and "--request_timeout_s" in body, body
    metrics = call(f"{queued}/metrics", headers=AUTH)[1]
    assert metric(metrics, 'trl_micro_dropped_rows_total{reason="timed_out"}') == 4
    assert metric(metrics, "trl_micro_overloaded_requests_total") == 1


# ------------------------------------------------------------------- 8. unknown users: bounded memory and log
def held_strings(root, prefix: str, limit: int = 3_000_000) -> list[str]:
    """Strings starting with `prefix` that `root` reaches through object references (not through functions'
    globals, modules or classes, which reach everything)."""
    seen, stack, found = set(), [root], []
    while stack and len(seen) < limit:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, str):
            if item.startswith(prefix):
                found.append(item)
            continue
        if isinstance(item, (types.FunctionType, types.ModuleType, type, torch.Tensor)):
            continue
        stack.extend(gc.get_referents(item))
    return found


def test_unknown_users_are_counted_in_bounded_memory_with_one_short_warning(
    reward_checkpoint,
    in_process,
    tmp_path,
    caplog,  # noqa: F811
):
    router = OnlineRouter(num_heads=2)
    router.update("known", torch.tensor([[-6.0, 6.0]]))
    router.save(tmp_path / "router.json")
    app = build_app(
        ServeArguments(
            model_name_or_path=reward_checkpoint, online_router=str(tmp_path / "router.json"), user_field="labels"
        )
    )
    prompt = "Question number 3?\n"
    request = {"query": [prompt + "Sure."] * 256, "prompts": [prompt] * 256}
    with caplog.at_level(logging.WARNING, logger="trl_micro"), serving(app) as url:
        for batch in range(4):
            labels = [f"unknown-{batch}-{i}-" + "x" * 180 for i in range(256)]
            assert call(f"{url}/get_reward", {**request, "labels": labels})[0] == 200
        one_row = {"query": request["query"][:1], "prompts": request["prompts"][:1], "labels": ["y" * 2**20]}
        status, answer = call(f"{url}/get_reward", one_row)
        metrics = call(f"{url}/metrics")[1]
    assert held_strings(app.state.service, "unknown-") == []
    warnings = [record.getMessage() for record in caplog.records if "does not know" in record.getMessage()]
    assert len(warnings) == 1 and len(warnings[0]) < 600 and "x" * 40 not in warnings[0], warnings
    assert metric(metrics, "trl_micro_fallback_rows_total") == 4 * 256
    assert status == 422 and "labels[0] is 1048576 characters long" in answer["detail"]


# -------------------------------------------------------------- 9. authentication first, nothing to fingerprint
def test_schema_pages_are_off_by_default_and_behind_the_token_when_served(guarded, queued):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert exchange(f"{guarded}{path}", headers=AUTH)[0] == 404
        assert exchange(f"{queued}{path}")[0] == 401
    assert exchange(f"{queued}/openapi.json", headers=AUTH)[0] == 200
    assert exchange(f"{queued}/docs", headers=AUTH)[0] == 200
    status, health = call(f"{guarded}/health")
    assert status == 200 and set(health) == {"status", "num_heads", "feedback"}  # no process id


# ------------------------------------------------------------------------------- 10. an empty key is refused
@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_at_start(reward_checkpoint, in_process, monkeypatch, key):  # noqa: F811
    with pytest.raises(ValueError, match="--api_key is empty: authentication would be off"):
        build_app(ServeArguments(model_name_or_path=reward_checkpoint, api_key=key))
    monkeypatch.setenv("TRL_MICRO_API_KEY", key)
    with pytest.raises(ValueError, match=r"\$TRL_MICRO_API_KEY is empty"):
        build_app(ServeArguments(model_name_or_path=reward_checkpoint))
    with pytest.raises(ValueError, match="is empty"):
        create_app(in_process, ServeSettings(api_key=key))


# --------------------------------------------------------------------- 11. the batcher's worker cannot die
class Escaped(BaseException):
    """What a scoring call may raise past `except Exception`."""


def test_the_batcher_survives_a_base_exception_and_restarts_a_worker_that_ends():
    def score_rows(rows):
        if rows == ["escape"]:
            raise Escaped("out of a scoring call")
        return [row.upper() for row in rows]

    async def scenario():
        batcher = DynamicBatcher(score_rows, ThreadPoolExecutor(1), max_wait_ms=0)
        batcher.start()
        with pytest.raises(RuntimeError, match="Escaped"):
            await asyncio.wait_for(batcher.submit(["escape"]), timeout=10)
        assert batcher.running
        assert await asyncio.wait_for(batcher.submit(["a"]), timeout=10) == ["A"]
        batcher._worker.cancel()  # a worker that ends anyway is started again
        await asyncio.sleep(0.05)
        assert batcher.running and batcher.restarts == 1
        assert await asyncio.wait_for(batcher.submit(["b"]), timeout=10) == ["B"]
        await batcher.stop()
        assert not batcher.running

    asyncio.run(scenario())
