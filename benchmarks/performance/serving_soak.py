"""
A soak of `trl-micro serve` under mixed, partly hostile traffic: what a few minutes of it cost and break.

One server (`trl-micro serve` in a subprocess on 127.0.0.1, with a token, a SQLite user store, `--allow_feedback`,
users in `labels`, 2 s body and header timeouts) and `--clients` client threads (16) for `--duration` seconds, each
request drawn at random (seeded) from:

- good traffic: `/get_reward` (OpenRLHF's protocol, users in `labels`), `/score` (text and messages, users, contexts),
  `/feedback` (each comparison with a `comparison_id`, retried with it on a 503 or a broken connection);
- malformed bodies (broken JSON, float / boolean / NaN user ids, role-less messages, lone surrogates, text prompts with
  message responses, empty rows, oversized bodies): each must get a 4xx;
- requests without the token: 401;
- slow bodies (headers and part of the body, then nothing): 408 within the body timeout, or the connection closed;
- clients that hang up right after sending 64 rows: their rows should be dropped before they are scored.

Reported (Markdown and JSON, with the command that made them): requests and answers by kind, p50 / p99 latency, errors
by kind (a 5xx anywhere, a good request not answered 200, a malformed one not answered 4xx, an exception), the server's
memory (RSS) after warm-up, at the end and at its peak, feedback acknowledged against feedback in the store (none may
be lost), and the server's own counters (rows scored and dropped, refusals). Exits 1 if a good request got a 5xx or an
acknowledged comparison is missing from the store.

The model is a tiny random MiCRo checkpoint built here (the server's machinery is what is soaked), or `--model` (a
MiCRo checkpoint, or a backbone given 4 untrained heads). Traffic goes to 127.0.0.1 only, bounded in time.

    python -m benchmarks.performance.serving_soak [--duration 180] [--clients 16] \\
        [--output benchmarks/performance/results/serving_soak.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import psutil
import requests

from benchmarks import write_study_report
from benchmarks.performance.server_process import Server, save_untrained_checkpoint
from trl_micro.evaluation_reports import ensure_writable, markdown_table
from trl_micro.scripts.serve import API_KEY_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULTS = REPO_ROOT / "benchmarks" / "performance" / "results" / "serving_soak.md"
KINDS = {  # kind: share of the requests
    "get_reward": 0.24,
    "score": 0.24,
    "feedback": 0.16,
    "malformed": 0.14,
    "no_token": 0.06,
    "slow_body": 0.06,
    "hang_up": 0.10,
}
GOOD = ("get_reward", "score", "feedback")
QUOTE = '"'  # label values are quoted: reason="client_gone"
TIMEOUT_S = 2.0  # the server's body and header timeouts
REQUEST_SECONDS = 60
TOPICS = ["boil an egg", "fix a flat tyre", "start running", "learn chess", "bake bread", "save money"]
CONTEXTS = ["I am a busy engineer; answer in one line.", "I am a patient professor; explain every step."]


# ---------------------------------------------------------------------------------------------- raw HTTP client
def connect(url: str, timeout: float = 10.0) -> socket.socket:
    """A socket to `url`'s host and port (127.0.0.1)."""
    host, port = url.split("//", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def head(path: str, *headers: str, method: str = "POST") -> bytes:
    """A request line and headers, ending the header block."""
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def read_answer(sock: socket.socket, timeout: float) -> tuple[int | None, str]:
    """(status, body) of the answer on `sock` within `timeout` seconds; (None, what came) if no answer came."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        headers, _, body = data.partition(b"\r\n\r\n")
        lengths = [
            line.split(b":")[1] for line in headers.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ]
        while lengths and len(body) < int(lengths[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data.decode(errors="replace")
    return int(data.split()[1]), body.decode(errors="replace")


# --------------------------------------------------------------------------------------------------- requests
def chat_row(rng: random.Random, index: int) -> tuple[list, list]:
    topic = rng.choice(TOPICS)
    prompt = [{"role": "user", "content": f"How do I {topic}? (question {index})"}]
    answer = f"To {topic}, start small; step {index % 7} matters most." + " More detail." * rng.randrange(6)
    return prompt, [{"role": "assistant", "content": answer}]


def get_reward_body(rng: random.Random, index: int) -> dict:
    prompts, queries, labels = [], [], []
    for row in range(rng.randrange(1, 17)):
        prompt = f"How do I {rng.choice(TOPICS)}? (question {index}-{row})\n"
        prompts.append(prompt)
        queries.append(prompt + "Start small." + " Then keep at it." * rng.randrange(5))
        labels.append(rng.choice([f"user-{rng.randrange(8)}", rng.randrange(8), f"stranger-{index}-{row}"]))
    return {"query": queries, "prompts": prompts, "labels": labels}


def score_body(rng: random.Random, index: int) -> dict:
    rows = []
    for row in range(rng.randrange(1, 17)):
        prompt, completion = chat_row(rng, index * 100 + row)
        if rng.random() < 0.3:
            prompt, completion = prompt[0]["content"] + "\n", completion[0]["content"]
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "user": f"user-{rng.randrange(8)}",
                "context": rng.choice(CONTEXTS),
            }
        )
    return {"rows": rows, "return_heads": rng.random() < 0.5}


def feedback_body(rng: random.Random, client: int, step: int) -> dict:
    comparisons = []
    for part in range(rng.randrange(1, 5)):
        prompt, chosen = chat_row(rng, step)
        comparisons.append(
            {
                "user": f"user-{client % 8}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": [{"role": "assistant", "content": "No." * (part + 1)}],
                "comparison_id": f"soak-{client}-{step}-{part}",
            }
        )
    return {"comparisons": comparisons}


MESSAGE = [{"role": "assistant", "content": "Sure."}]
MALFORMED = [  # (path, raw body)
    ("/score", b"{not json"),
    ("/score", b'{"rows": []}'),
    ("/score", b'{"rows": [{"prompt": "a", "completion": "b", "user": 17.0}]}'),
    ("/score", b'{"rows": [{"prompt": "a", "completion": "b", "user": true}]}'),
    ("/score", b'{"rows": [{"prompt": "a", "completion": "b", "user": NaN}]}'),
    ("/score", b'{"rows": [{"prompt": "a", "completion": "b"}], "return_heads": NaN}'),
    ("/score", json.dumps({"rows": [{"prompt": [{"content": "Hi?"}], "completion": MESSAGE}]}).encode()),
    ("/score", json.dumps({"rows": [{"prompt": [{"role": 3, "content": "Hi?"}], "completion": MESSAGE}]}).encode()),
    ("/get_reward", b'{"query": ["ab"], "prompts": ["a"], "labels": [1.5]}'),
    ("/get_reward", b'{"query": ["a b\\ud800"], "prompts": ["a"]}'),
    ("/get_reward", b'{"query": ["hello"], "prompts": ["bye"]}'),
    (
        "/feedback",
        json.dumps({"comparisons": [{"user": "u", "prompt": "Hi?", "chosen": MESSAGE, "rejected": MESSAGE}]}).encode(),
    ),
    ("/score", json.dumps({"rows": [{"prompt": "a", "completion": "b" * 2**21}]}).encode()),  # over --max_request_bytes
]


class Soak:
    """The clients and what they saw."""

    def __init__(self, url: str, token: str, duration: float, seed: int):
        self.url, self.duration, self.seed = url, duration, seed
        self.auth = {"Authorization": f"Bearer {token}"}
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.errors: dict[str, Counter] = defaultdict(Counter)
        self.acknowledged: set[str] = set()
        self.lock = threading.Lock()

    def record(self, kind: str, seconds: float, answer: int | str, error: str | None = None) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            self.answers[kind][answer] += 1
            if error is not None:
                self.errors[kind][error] += 1

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        session = requests.Session()
        deadline, step = time.monotonic() + self.duration, 0
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            step += 1
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                answer, error = getattr(self, kind)(session, rng, index, step)
            except (requests.RequestException, OSError) as exception:
                answer, error = type(exception).__name__, f"{type(exception).__name__}"
            self.record(kind, time.perf_counter() - started, answer, error)

    def post(self, session: requests.Session, path: str, **kwargs) -> requests.Response:
        return session.post(self.url + path, timeout=REQUEST_SECONDS, **kwargs)

    def expect_ok(self, response: requests.Response) -> tuple[int, str | None]:
        if response.status_code == 200:
            return 200, None
        return response.status_code, f"{response.status_code}: {response.text[:120]}"

    def get_reward(self, session, rng, index, step):
        return self.expect_ok(self.post(session, "/get_reward", json=get_reward_body(rng, step), headers=self.auth))

    def score(self, session, rng, index, step):
        return self.expect_ok(self.post(session, "/score", json=score_body(rng, step), headers=self.auth))

    def feedback(self, session, rng, index, step):
        body = feedback_body(rng, index, step)
        for _ in range(5):  # a 503 or a broken connection: the same comparisons again, with their ids
            try:
                response = self.post(session, "/feedback", json=body, headers=self.auth)
            except (requests.ConnectionError, requests.Timeout):
                continue
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("Retry-After", 1)))
        else:
            return "gave up", "not acknowledged after 5 tries"
        if response.status_code == 200:
            with self.lock:
                self.acknowledged.update(c["comparison_id"] for c in body["comparisons"])
        return self.expect_ok(response)

    def malformed(self, session, rng, index, step):
        path, raw = rng.choice(MALFORMED)
        try:
            response = self.post(session, path, data=raw, headers={**self.auth, "Content-Type": "application/json"})
        except requests.ConnectionError:  # an oversized body may be cut off before its 413 is read
            return "connection closed", None
        status = response.status_code
        return status, None if 400 <= status < 500 else f"{path} {raw[:40]!r} answered {status}"

    def no_token(self, session, rng, index, step):
        response = self.post(session, "/score", json=score_body(rng, step))
        return response.status_code, None if response.status_code == 401 else f"answered {response.status_code}"

    def slow_body(self, session, rng, index, step):
        with connect(self.url) as sock:
            sock.sendall(head("/score", "Content-Type: application/json", "Content-Length: 1000", *self.header_lines()))
            sock.sendall(b'{"rows": [{"prompt": "')
            status, _ = read_answer(sock, timeout=TIMEOUT_S + 10)
        return status or "closed", None if status in (408, None) else f"answered {status}"

    def hang_up(self, session, rng, index, step):
        body = json.dumps({"rows": [score_body(rng, step)["rows"][0]] * 64}).encode()
        with connect(self.url) as sock:
            sock.sendall(
                head("/score", "Content-Type: application/json", f"Content-Length: {len(body)}", *self.header_lines())
                + body
            )
        return "hung up", None

    def header_lines(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.auth.items()]


def metric_values(text: str, prefix: str) -> dict[str, float]:
    """`{labels: value}` of the samples of Prometheus text whose name is `prefix`."""
    values = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith(prefix + "_created"):
            name, value = line.rsplit(" ", 1)
            values[name[len(prefix) :] or "total"] = float(value)
    return values


def stored_comparison_ids(store_url: str) -> list[str]:
    from trl_micro.personalization.stores import UserStore

    store = UserStore(store_url)
    try:
        return [logged.comparison_id for logged in store.comparisons()]
    finally:
        store.close()


def tiny_checkpoint(folder: Path) -> str:
    """A tiny random MiCRo reward model and a byte-level tokenizer trained on a few sentences."""
    from trl_micro.testing_utils import build_tiny_micro_model, build_tiny_tokenizer

    corpus = [
        f"How do I {topic}? Start small; step {i} matters most." for topic in TOPICS for i in range(20)
    ] + CONTEXTS
    tokenizer = build_tiny_tokenizer(corpus * 4)
    model = build_tiny_micro_model(tokenizer, num_heads=4, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def is_micro_checkpoint(path: str) -> bool:
    config = Path(path, "config.json")
    return config.exists() and json.loads(config.read_text()).get("model_type") == "micro"


def soak(args: argparse.Namespace, folder: Path) -> dict:
    if args.model is None:
        checkpoint, model = tiny_checkpoint(folder / "micro-rm"), "a tiny random MiCRo model (2 layers, 4 heads)"
    elif is_micro_checkpoint(args.model):
        checkpoint, model = args.model, f"`{args.model}`"
    else:
        from trl_micro.bundled.catalog import resolve_model_path

        checkpoint = save_untrained_checkpoint(resolve_model_path(args.model), folder / "micro-rm")
        model = f"`{args.model}` with 4 untrained MiCRo heads"
    store = f"sqlite:///{folder / 'users.db'}"
    token, previous = secrets.token_hex(16), os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = token  # the server's token, off its command line
    try:
        server = Server(
            *("--model_name_or_path", checkpoint, "--user_store", store, "--feature_dir", str(folder / "features")),
            *("--allow_feedback", "--user_field", "labels", "--max_request_bytes", str(2**20)),
            *("--body_timeout_s", str(TIMEOUT_S), "--header_timeout_s", str(TIMEOUT_S)),
            log=folder / "server.log",
            threads=args.threads,
        ).start()
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV)
        else:
            os.environ[API_KEY_ENV] = previous
    clients = Soak(server.url, token, args.duration, args.seed)
    process = psutil.Process(server.process.pid)
    try:
        warm = requests.post(
            f"{server.url}/score", json=score_body(random.Random(0), 0), headers=clients.auth, timeout=60
        )
        warm.raise_for_status()
        memory_before = process.memory_info().rss
        peak, done = [memory_before], threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                peak.append(process.memory_info().rss)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        threads = [threading.Thread(target=clients.client, args=(index,)) for index in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.duration + 120)
        seconds = time.perf_counter() - started
        time.sleep(TIMEOUT_S + 1)  # slow and hung-up connections run out
        done.set()
        memory_after = process.memory_info().rss
        metrics = requests.get(f"{server.url}/metrics", headers=clients.auth, timeout=60).text
        health = requests.get(f"{server.url}/health", timeout=60).json()
    finally:
        server.stop()
    stored = stored_comparison_ids(store)
    return {
        "model": model,
        "clients": args.clients,
        "seconds": seconds,
        "kinds": {
            kind: {
                "requests": len(clients.latencies[kind]),
                "p50_ms": 1000 * float(np.percentile(clients.latencies[kind], 50)) if clients.latencies[kind] else None,
                "p99_ms": 1000 * float(np.percentile(clients.latencies[kind], 99)) if clients.latencies[kind] else None,
                "answers": {str(answer): count for answer, count in sorted(clients.answers[kind].items(), key=str)},
                "errors": dict(clients.errors[kind]),
            }
            for kind in KINDS
        },
        "good_5xx": sum(
            count
            for kind in GOOD
            for answer, count in clients.answers[kind].items()
            if isinstance(answer, int) and answer >= 500
        ),
        "any_5xx": sum(
            count
            for kind in KINDS
            for answer, count in clients.answers[kind].items()
            if isinstance(answer, int) and answer >= 500
        ),
        "feedback": {
            "acknowledged": len(clients.acknowledged),
            "stored": len(stored),
            "stored_distinct": len(set(stored)),
            "lost": len(clients.acknowledged - set(stored)),
        },
        "memory_mb": {
            "after_warm_up": memory_before / 2**20,
            "at_the_end": memory_after / 2**20,
            "peak": max(peak) / 2**20,
        },
        "server": {
            "rows_scored": metric_values(metrics, "trl_micro_rows_total").get("total", 0.0),
            "dropped_rows": metric_values(metrics, "trl_micro_dropped_rows_total"),
            "overloaded_requests": metric_values(metrics, "trl_micro_overloaded_requests_total").get("total", 0.0),
            "worker_restarts": metric_values(metrics, "trl_micro_worker_restarts_total").get("total", 0.0),
            "answers": metric_values(metrics, "trl_micro_requests_total"),
            "health": health,
        },
    }


def render(report: dict, command: str) -> str:
    rows = [
        [
            kind,
            result["requests"],
            "-" if result["p50_ms"] is None else f"{result['p50_ms']:.0f}",
            "-" if result["p99_ms"] is None else f"{result['p99_ms']:.0f}",
            ", ".join(f"{answer}: {count}" for answer, count in result["answers"].items()),
        ]
        for kind, result in report["kinds"].items()
    ]
    errors = [
        [kind, error, count] for kind, result in report["kinds"].items() for error, count in result["errors"].items()
    ]
    feedback, memory, server = report["feedback"], report["memory_mb"], report["server"]
    dropped = (
        ", ".join(f"{reason.split(QUOTE)[1]}: {count:.0f}" for reason, count in server["dropped_rows"].items())
        or "none"
    )
    return "\n".join(
        [
            "# Serving soak: `trl-micro serve` under mixed, partly hostile traffic",
            "",
            f"Generated {time.strftime('%Y-%m-%d')} by `{command}`: {report['model']}, the server a subprocess on "
            f"127.0.0.1 with a token, a SQLite user store, feedback, users in `labels`, 1 MiB bodies, {TIMEOUT_S:g} s "
            f"body and header timeouts; {report['clients']} client threads for {report['seconds']:.0f} s on "
            f"{os.cpu_count()} CPU cores.",
            "",
            "## Requests by kind",
            "",
            *markdown_table(["kind", "requests", "p50 ms", "p99 ms", "answers"], rows),
            "",
            "Good requests (`get_reward`, `score`, `feedback`) must get 200; malformed ones a 4xx; those without the "
            "token 401; slow bodies 408 (or a closed connection); hung-up clients get nothing.",
            "",
            "## Errors by kind",
            "",
            *(markdown_table(["kind", "error", "count"], errors) if errors else ["None."]),
            "",
            "## Outcome",
            "",
            f"- Answers of 5xx to good requests: **{report['good_5xx']}** (to any request: {report['any_5xx']}).",
            f"- Feedback: {feedback['acknowledged']} comparisons acknowledged, {feedback['stored']} in the store "
            f"({feedback['stored_distinct']} distinct ids); acknowledged but missing: **{feedback['lost']}**.",
            f"- Server memory (RSS): {memory['after_warm_up']:.0f} MB after warm-up, {memory['at_the_end']:.0f} MB at "
            f"the end (**{memory['at_the_end'] - memory['after_warm_up']:+.0f} MB**), peak {memory['peak']:.0f} MB.",
            f"- Server counters: {server['rows_scored']:.0f} rows scored; rows dropped unanswered: {dropped}; "
            f"{server['overloaded_requests']:.0f} requests refused as overload; {server['worker_restarts']:.0f} worker "
            f"restarts; `/health` at the end: {server['health']['status']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="Seconds of traffic.")
    parser.add_argument("--clients", type=int, default=16, help="Client threads.")
    parser.add_argument("--model", default=None, help="A MiCRo checkpoint or a backbone (default: a tiny random one).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the server.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clients' choices.")
    parser.add_argument("--output", default=str(RESULTS), help="Markdown report; the JSON goes next to it.")
    args = parser.parse_args(argv)
    output = ensure_writable(args.output)
    with tempfile.TemporaryDirectory(prefix="trl-micro-soak-") as scratch:
        report = soak(args, Path(scratch))
    write_study_report(output, "benchmarks.performance.serving_soak", argv, report, render)
    print(output.read_text(encoding="utf-8"))
    return 1 if report["good_5xx"] or report["feedback"]["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
