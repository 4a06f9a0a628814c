"""
What `trl-micro serve` costs against scoring in process, and whether its feedback survives a crash.

1. Throughput: the same completions scored by `MiCRoReward.score` in this process, 4 rows at a time, and by a server
   (`trl-micro serve`, in a subprocess on 127.0.0.1) receiving them from 8 concurrent clients of 4 rows each; the ratio
   of rows per second, and the served requests' p50 / p99 latency. Rewards are compared too (max difference).
2. Feedback under load: two server processes with `--allow_feedback` share one SQLite user store; 4 clients send 100
   comparisons each of one user, alternating servers, each with a comparison id. Midway one server is killed with
   SIGKILL and started again; a client whose request fails retries it (same id). Reported: comparisons acknowledged,
   updates and log rows in the store.

Both use an untrained MiCRo head set over the backbone (`--model`, default the embedded SmolLM2-135M-Instruct): the
cost is the backbone's, the numbers of the heads do not matter here. Traffic goes to 127.0.0.1 only, bounded in count
and time.

    python -m benchmarks.performance.serving [--rounds 8] [--output benchmarks/performance/results/serving.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_study_report
from benchmarks.performance.server_process import STARTUP_SECONDS, Server, post, save_untrained_checkpoint
from trl_micro.bundled.catalog import resolve_model_path
from trl_micro.evaluation_reports import ensure_writable, markdown_table
from trl_micro.personalization.stores import UserStore
from trl_micro.rewards import MiCRoReward

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULTS = REPO_ROOT / "benchmarks" / "performance" / "results" / "serving.md"
CLIENTS, ROWS_PER_CLIENT = 8, 4
FEEDBACK_CLIENTS, FEEDBACK_PER_CLIENT = 4, 100


def completions(rounds: int) -> list[dict]:
    topics = ["boil an egg", "fix a flat tyre", "start running", "learn chess", "bake bread", "save money"]
    rows = []
    for i in range(rounds * CLIENTS * ROWS_PER_CLIENT):
        topic = topics[i % len(topics)]
        prompt = [
            {"role": "system", "content": ["I am a busy engineer.", "I am a patient professor."][i % 2]},
            {"role": "user", "content": f"How do I {topic}? (question {i})"},
        ]
        answer = f"To {topic}, start small and keep at it; step {i % 7} matters most." + " More detail." * (i % 5)
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]})
    return rows


def measure_throughput(checkpoint: str, rounds: int, threads: int, log: Path) -> dict:
    rows = completions(rounds)
    torch.set_num_threads(threads)
    reward = MiCRoReward.from_pretrained(checkpoint, context_column=None)
    reward.score([rows[0]["prompt"]], [rows[0]["completion"]])  # warm-up
    started = time.perf_counter()
    local = []
    for start in range(0, len(rows), ROWS_PER_CLIENT):
        chunk = rows[start : start + ROWS_PER_CLIENT]
        local += reward.score([r["prompt"] for r in chunk], [r["completion"] for r in chunk])["rewards"].tolist()
    local_seconds = time.perf_counter() - started
    del reward

    server = Server(
        "--model_name_or_path", checkpoint, "--max_batch_size", str(CLIENTS * ROWS_PER_CLIENT), log=log, threads=threads
    ).start()
    try:
        post(f"{server.url}/score", {"rows": rows[:1]})  # warm-up
        latencies, served = [], [None] * len(rows)

        def client(index: int) -> None:
            for round_ in range(rounds):
                start = (round_ * CLIENTS + index) * ROWS_PER_CLIENT
                began = time.perf_counter()
                answer = post(f"{server.url}/score", {"rows": rows[start : start + ROWS_PER_CLIENT]})
                latencies.append(time.perf_counter() - began)
                served[start : start + ROWS_PER_CLIENT] = answer["rewards"]

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        served_seconds = time.perf_counter() - started
    finally:
        server.stop()
    return {
        "rows": len(rows),
        "in_process_rows_per_second": len(rows) / local_seconds,
        "served_rows_per_second": len(rows) / served_seconds,
        "ratio": local_seconds / served_seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "max_reward_difference": float(np.max(np.abs(np.array(local) - np.array(served)))),
    }


def measure_feedback(checkpoint: str, folder: Path, threads: int, log: Path, per_client: int) -> dict:
    store = f"sqlite:///{folder / 'users.db'}"
    servers = [
        Server(
            "--model_name_or_path",
            checkpoint,
            "--user_store",
            store,
            "--feature_dir",
            str(folder / "features"),
            "--allow_feedback",
            log=log,
            threads=threads,
        ).start()
        for _ in range(2)
    ]
    acknowledged, retries, lock = [0], [0], threading.Lock()
    killed = threading.Event()
    restarter = threading.Thread(target=lambda: (servers[0].kill(), servers[0].start()), daemon=True)
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]

    def comparison(index: int, step: int) -> dict:
        chosen = f"Simmer it for {step % 9 + 4} minutes. ({index}-{step})"
        return {
            "user": "alice",
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": "Boil it. " * (step % 4 + 1)}],
            "comparison_id": f"{index}-{step}",
        }

    def client(index: int) -> None:
        for step in range(per_client):
            for attempt in range(60):
                server = servers[(index + step + attempt) % 2]
                try:
                    post(f"{server.url}/feedback", {"comparisons": [comparison(index, step)]})
                    break
                except (OSError, urllib.error.URLError):
                    with lock:
                        retries[0] += 1
                    time.sleep(0.5)
            else:
                raise RuntimeError("a comparison was refused 60 times")
            with lock:
                acknowledged[0] += 1
                if acknowledged[0] == FEEDBACK_CLIENTS * per_client // 2 and not killed.is_set():
                    killed.set()
                    restarter.start()

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(FEEDBACK_CLIENTS) as pool:
            list(pool.map(client, range(FEEDBACK_CLIENTS)))
        restarter.join(timeout=STARTUP_SECONDS)
        post(f"{servers[0].url}/feedback", {"comparisons": [comparison(FEEDBACK_CLIENTS, 0)]})  # the restarted one
        acknowledged[0] += 1
    finally:
        for server in servers:
            server.stop()
    stored = UserStore(store)
    return {
        "acknowledged": acknowledged[0],
        "stored_updates": stored.num_updates(["alice"])["alice"],
        "logged": stored.count_comparisons("alice"),
        "retried_requests": retries[0],
        "killed_and_restarted": killed.is_set(),
        "seconds": time.perf_counter() - started,
        "per_client": per_client,
    }


def render(result: dict, command: str, model: str) -> str:
    throughput, feedback = result["throughput"], result["feedback"]
    return "\n".join(
        [
            "# Serving: `trl-micro serve` against in-process scoring",
            "",
            f"Generated {time.strftime('%Y-%m-%d')} by `{command}`: backbone `{model}` with 4 untrained MiCRo heads, one "
            "torch thread in each process, the server a subprocess on 127.0.0.1.",
            "",
            "## Throughput",
            "",
            *markdown_table(
                ["scoring", "rows", "rows per second"],
                [
                    [
                        "in process, 4 rows per call",
                        throughput["rows"],
                        f"{throughput['in_process_rows_per_second']:.1f}",
                    ],
                    [
                        f"served, {CLIENTS} concurrent clients x {ROWS_PER_CLIENT} rows",
                        throughput["rows"],
                        f"{throughput['served_rows_per_second']:.1f}",
                    ],
                ],
            ),
            "",
            f"Served / in-process throughput: **{throughput['ratio']:.2f}x** (target: at least 0.9x). Served request "
            f"latency p50 {throughput['p50_ms']:.0f} ms, p99 {throughput['p99_ms']:.0f} ms. Largest difference between "
            f"served and in-process rewards: {throughput['max_reward_difference']:.1e}.",
            "",
            "## Feedback under load",
            "",
            f"{FEEDBACK_CLIENTS} clients x {feedback['per_client']} comparisons of one user through two server processes "
            "sharing one store; one server killed with SIGKILL midway and started again"
            f"{'' if feedback['killed_and_restarted'] else ' (the kill did not happen)'}; failed requests retried "
            f"({feedback['retried_requests']} retries), then one more comparison sent to the restarted server. "
            f"Acknowledged: {feedback['acknowledged']}; updates in the store: "
            f"{feedback['stored_updates']}, logged comparisons {feedback['logged']}. {feedback['seconds']:.0f} s.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="Backbone (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--rounds", type=int, default=8, help="Requests per client in the throughput run.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of each process.")
    parser.add_argument("--feedback_per_client", type=int, default=FEEDBACK_PER_CLIENT, help="Comparisons per client.")
    parser.add_argument("--output", default=str(RESULTS), help="Markdown report; the JSON goes next to it.")
    args = parser.parse_args(argv)
    output = ensure_writable(args.output)
    with tempfile.TemporaryDirectory(prefix="trl-micro-serving-") as scratch:
        folder = Path(scratch)
        checkpoint = save_untrained_checkpoint(resolve_model_path(args.model), folder / "micro-rm")
        log = folder / "servers.log"
        throughput = measure_throughput(checkpoint, args.rounds, args.threads, log)
        feedback = measure_feedback(checkpoint, folder, args.threads, log, args.feedback_per_client)
    result = {"throughput": throughput, "feedback": feedback}
    write_study_report(output, "benchmarks.performance.serving", argv, result, partial(render, model=args.model))
    print(output.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
