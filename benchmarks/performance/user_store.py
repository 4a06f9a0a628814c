"""
The user store at scale (`trl_micro.personalization.stores`): what one feedback costs in the store at 1,000 and
1,000,000 users, on SQLite and on PostgreSQL, and what a server on such a store does.

1. Store work: stores filled with N users (K = 4, bulk-written, then settled: statistics gathered, the write-ahead log
   checkpointed, PostgreSQL's pages vacuumed), then `--feedback` single comparisons of random existing users, each a durable transaction (posterior update, log row, commit): p50 / p99 per comparison.
2. `/score` under feedback: `trl-micro serve` (a tiny MiCRo checkpoint, so that the store, not the backbone, is
   measured) on the 1,000,000-user SQLite store; one client scores rows of known users, alone and then while 4 clients
   send feedback without pause: p50 / p99 of `/score` and their ratio.
3. Start-up and memory: the same server on a 1-user and on the 1,000,000-user store: seconds to the first `/health`,
   resident memory after a first `/score`.
4. Replicas and a crash: 4 server processes on one PostgreSQL store, 4 clients each sending 250 comparisons with ids
   (client i to server i, the next server on failure); midway server 0 is killed with SIGKILL and started again;
   clients retry. Checked: every acknowledged comparison is in the log exactly once, and each user's update count
   equals its applied log rows.
5. Staleness: on PostgreSQL, a comparison of a new user sent to replica A; replica B (`--store_staleness_s 0.5`)
   polled until it routes that user: time from A's acknowledgement, p50 / p99 over `--staleness_trials`.
6. Rebuild: a SQLite store whose log holds `--rebuild_comparisons` comparisons with their readings in the feature
   store, rebuilt for new heads on the same backbone (`rebuild_user_store`): comparisons per second, backbone passes.

Traffic goes to 127.0.0.1 only, bounded in count and time; the PostgreSQL server is a private one in a temporary
folder (`LocalPostgres`), stopped at the end.

    python -m benchmarks.performance.user_store [--users 1000000] [--output benchmarks/performance/results/user_store.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import insert

from benchmarks import write_study_report
from benchmarks.performance.server_process import Server, post
from trl_micro.evaluation_reports import ensure_writable, markdown_table
from trl_micro.feature_cache import FeatureStore, backbone_fingerprint, reward_model_fingerprint
from trl_micro.personalization.rebuild import rebuild_user_store
from trl_micro.personalization.stores import Comparison, UserStore, open_user_store
from trl_micro.personalization.stores.schema import user_heads_table, users_table
from trl_micro.rewards import MiCRoReward
from trl_micro.testing_utils import LocalPostgres, build_tiny_micro_model, build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]

RESULTS = REPO_ROOT / "benchmarks" / "performance" / "results" / "user_store.md"
NUM_HEADS = 4
CORPUS = ["How do I boil an egg? Simmer it for a few minutes, then cool it.", "user assistant system"] * 20


def percentiles(seconds: list[float]) -> dict:
    return {
        "p50_ms": 1000 * float(np.percentile(seconds, 50)),
        "p99_ms": 1000 * float(np.percentile(seconds, 99)),
        "n": len(seconds),
    }


def fill(store: UserStore, num_users: int, chunk: int = 20_000) -> float:
    """Write `num_users` users with random routing straight into the tables; returns the seconds it took."""
    started = time.perf_counter()
    generator = np.random.default_rng(0)
    for start in range(0, num_users, chunk):
        users = [f"user{i}" for i in range(start, min(num_users, start + chunk))]
        log_weights = generator.normal(size=(len(users), NUM_HEADS))
        with store.engine.begin() as connection:
            connection.execute(
                insert(users_table),
                [{"user_id": u, "num_updates": 1, "version": 1, "updated_at": 0.0} for u in users],
            )
            connection.execute(
                insert(user_heads_table),
                [
                    {"user_id": u, "head": k, "log_weight": float(log_weights[row, k]), "log_prior": -np.log(NUM_HEADS)}
                    for row, u in enumerate(users)
                    for k in range(NUM_HEADS)
                ],
            )
    return time.perf_counter() - started


def settle(store: UserStore) -> None:
    """Bring a freshly bulk-loaded store to the state of one long in service: statistics gathered, the write-ahead log
    checkpointed, and (PostgreSQL) every page vacuumed, so the timed writes do not pay for the bulk load's aftermath."""
    if store.backend == "postgresql":
        with store.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.exec_driver_sql("VACUUM ANALYZE")
            connection.exec_driver_sql("CHECKPOINT")
        return
    raw = store.engine.raw_connection()  # the store's SQLite connections run outside transactions until BEGIN
    try:
        raw.driver_connection.execute("ANALYZE")
        raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()


def store_work(url: str, num_users: int, feedback: int) -> dict:
    store = open_user_store(url, num_heads=NUM_HEADS)
    filled = fill(store, num_users)
    settle(store)
    generator = random.Random(1)
    seconds = []
    for i in range(feedback):
        user = f"user{generator.randrange(num_users)}"
        margins = [[generator.gauss(0, 2) for _ in range(NUM_HEADS)]]
        began = time.perf_counter()
        store.record_comparisons([Comparison(user, "prompt", f"a{i}", "b", None, f"bench-{i}")], margins)
        seconds.append(time.perf_counter() - began)
    store.close()
    return {"users": num_users, "fill_seconds": filled, **percentiles(seconds)}


def tiny_checkpoint(folder: Path) -> str:
    tokenizer = build_tiny_tokenizer(CORPUS)
    model = build_tiny_micro_model(tokenizer, num_heads=NUM_HEADS, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def score_row(user: str) -> dict:
    return {"prompt": "How do I boil an egg?", "completion": "Simmer it for a few minutes.", "user": user}


def feedback_body(user: str, tag: str) -> dict:
    return {
        "comparisons": [
            {
                "user": user,
                "prompt": "How do I boil an egg?",
                "chosen": f"Simmer it for {len(tag) % 9 + 3} minutes, then cool it. ({tag})",
                "rejected": "Boil it.",
                "comparison_id": tag,
            }
        ]
    }


def score_latencies(url: str, count: int, num_users: int, seed: int) -> list[float]:
    generator = random.Random(seed)
    seconds = []
    for _ in range(count):
        began = time.perf_counter()
        post(f"{url}/score", {"rows": [score_row(f"user{generator.randrange(num_users)}")]})
        seconds.append(time.perf_counter() - began)
    return seconds


def send_feedback(url: str, num_users: int, ready, stop, sent, clients: int = 4) -> None:
    """`clients` threads sending single comparisons to `url` without pause until `stop` is set (`ready` once the
    first is acknowledged)."""

    def client(index: int) -> None:
        generator = random.Random(100 + index)
        step = 0
        while not stop.is_set():
            post(f"{url}/feedback", feedback_body(f"user{generator.randrange(num_users)}", f"f{index}-{step}"))
            step += 1
            ready.set()
            with sent.get_lock():
                sent.value += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


def score_under_feedback(checkpoint: str, url: str, num_users: int, folder: Path, log: Path, requests: int) -> dict:
    server = Server(
        "--model_name_or_path", checkpoint, "--user_store", url, "--allow_feedback", "--feature_dir",
        str(folder / "features"), log=log,
    ).start()  # fmt: skip
    try:
        score_latencies(server.url, 20, num_users, seed=0)  # warm-up
        alone = score_latencies(server.url, requests, num_users, seed=1)
        # The feedback clients run in a process of their own, so that they do not share this process's GIL with the
        # client being timed.
        context = multiprocessing.get_context("spawn")
        ready, stop, sent = context.Event(), context.Event(), context.Value("i", 0)
        senders = context.Process(target=send_feedback, args=(server.url, num_users, ready, stop, sent))
        senders.start()
        if not ready.wait(timeout=120):
            raise RuntimeError("the feedback clients did not start")
        time.sleep(1.0)
        counted = sent.value
        started = time.perf_counter()
        loaded = score_latencies(server.url, requests, num_users, seed=2)
        elapsed = time.perf_counter() - started
        counted = sent.value - counted
        stop.set()
        senders.join(timeout=60)
        if senders.exitcode != 0:
            raise RuntimeError(f"the feedback clients failed (exit code {senders.exitcode}); see the output above")
    finally:
        server.stop()
    alone, loaded = percentiles(alone), percentiles(loaded)  # noqa: F821 (set in the try block)
    return {
        "alone": alone,
        "under_feedback": loaded,
        "p99_ratio": loaded["p99_ms"] / alone["p99_ms"],
        "feedback_per_second": counted / elapsed,
    }


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def startup(checkpoint: str, url: str, log: Path) -> dict:
    began = time.perf_counter()
    server = Server("--model_name_or_path", checkpoint, "--user_store", url, log=log).start()
    seconds = time.perf_counter() - began
    try:
        post(f"{server.url}/score", {"rows": [score_row("user0")]})
        memory = resident_mb(server.process.pid)
    finally:
        server.stop()
    return {"seconds": seconds, "resident_mb": memory}


def replicas_and_a_crash(checkpoint: str, url: str, folder: Path, log: Path, per_client: int) -> dict:
    arguments = ["--model_name_or_path", checkpoint, "--user_store", url, "--allow_feedback"]
    arguments += ["--feature_dir", str(folder / "features")]
    servers = [Server(*arguments, log=log).start() for _ in range(4)]
    acknowledged: dict[str, int] = {}
    lock, killed = threading.Lock(), threading.Event()
    retries = [0]
    restarter = threading.Thread(target=lambda: (servers[0].kill(), servers[0].start()), daemon=True)

    def client(index: int) -> None:
        for step in range(per_client):
            tag = f"c{index}-{step}"
            body = feedback_body(f"replica-user{(index + step) % 8}", tag)
            for attempt in range(120):
                server = servers[(index + attempt) % 4]
                try:
                    answer = post(f"{server.url}/feedback", body)
                    break
                except (OSError, urllib.error.URLError):
                    with lock:
                        retries[0] += 1
                    time.sleep(0.25)
            else:
                raise RuntimeError(f"comparison {tag} was refused 120 times")
            with lock:
                acknowledged[tag] = answer["num_updates"][body["comparisons"][0]["user"]]
                if len(acknowledged) == 2 * per_client and not killed.is_set():
                    killed.set()
                    restarter.start()

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, range(4)))
        restarter.join(timeout=300)
    finally:
        for server in servers:
            server.stop()
    store = UserStore(url)
    logged = [row.comparison_id for row in store.comparisons()]
    counts = store.num_updates([f"replica-user{i}" for i in range(8)])
    applied = {user: sum(row.applied for row in store.comparisons(user)) for user in counts}
    return {
        "acknowledged": len(acknowledged),
        "logged": len(logged),
        "acknowledged_logged_once": all(logged.count(tag) == 1 for tag in acknowledged),
        "updates_equal_log_rows": all(counts[user] == applied[user] for user in counts),
        "retried_requests": retries[0],
        "killed_and_restarted": killed.is_set(),
        "seconds": time.perf_counter() - started,
    }


def staleness(checkpoint: str, url: str, folder: Path, log: Path, trials: int) -> dict:
    writer = Server(
        "--model_name_or_path", checkpoint, "--user_store", url, "--allow_feedback", "--feature_dir",
        str(folder / "features"), log=log,
    ).start()  # fmt: skip
    reader = Server(
        "--model_name_or_path", checkpoint, "--user_store", url, "--store_staleness_s", "0.5", log=log
    ).start()
    seconds = []
    try:
        for trial in range(trials):
            user = f"stale-user{trial}"
            post(f"{reader.url}/score", {"rows": [score_row(user)]})  # the reader caches the user as unknown
            post(f"{writer.url}/feedback", feedback_body(user, f"stale-{trial}"))
            acknowledged = time.perf_counter()
            while not post(f"{reader.url}/score", {"rows": [score_row(user)]})["online_routed"][0]:
                if time.perf_counter() - acknowledged > 10:
                    raise RuntimeError(f"replica B did not route {user} within 10 s")
                time.sleep(0.01)
            seconds.append(time.perf_counter() - acknowledged)
    finally:
        writer.stop()
        reader.stop()
    return percentiles(seconds)


@torch.no_grad()
def rebuild(folder: Path, num_comparisons: int) -> dict:
    tokenizer = build_tiny_tokenizer(CORPUS)
    old = MiCRoReward(build_tiny_micro_model(tokenizer, num_heads=NUM_HEADS, seed=0), tokenizer, context_column=None)
    url = f"sqlite:///{folder / 'rebuild.db'}"
    store = open_user_store(url, num_heads=NUM_HEADS, model_fingerprint=reward_model_fingerprint(old.model))
    features = FeatureStore(old.model, folder / "rebuild-features")
    backbone = backbone_fingerprint(old.model.backbone)
    generator = random.Random(3)
    for start in range(0, num_comparisons, 1000):
        count = min(1000, num_comparisons - start)
        prompts = [f"Question {start + i}?" for i in range(count)]
        chosen = [f"Answer {generator.randrange(10**6)}." for _ in range(count)]
        rejected = [f"Other {generator.randrange(10**6)}." for _ in range(count)]
        scored = old.comparison_margins(prompts, chosen, rejected)
        features.add(scored["sequence_keys"], scored["readings"])
        users = [f"user{generator.randrange(max(1, num_comparisons // 10))}" for _ in range(count)]
        store.record_comparisons(
            [Comparison(u, p, c, r) for u, p, c, r in zip(users, prompts, chosen, rejected)],
            scored["head_margins"], feature_keys=scored["feature_keys"], feature_backbone=backbone,
        )  # fmt: skip
    new_model = build_tiny_micro_model(tokenizer, num_heads=NUM_HEADS + 2, seed=7)
    new_model.backbone.load_state_dict(old.model.backbone.state_dict())
    new = MiCRoReward(new_model, tokenizer, context_column=None)
    report = rebuild_user_store(store, new.model, new.encode, folder / "rebuild-features", progress=False)
    return {
        "comparisons": report.comparisons,
        "users": report.users,
        "seconds": report.seconds,
        "comparisons_per_second": report.comparisons / report.seconds,
        "sequences_from_features": report.sequences_from_features,
        "sequences_computed": report.sequences_computed,
    }


def load_note(results: dict, cores: int) -> str:
    """The load average the run saw, and whether other jobs shared the machine (a start load of half the cores)."""
    if "load_average" not in results:
        return ""
    start, end = results["load_average"]
    shared = (
        ": other jobs shared the machine, and every latency includes waiting for a core."
        if start >= cores / 2
        else "; under half the cores at the start (no other heavy job; the end figure is the benchmark's own servers)."
    )
    return f" Load average (1 min) at start {start:.1f}, at end {end:.1f}{shared}"


def render(results: dict, command: str) -> str:
    work = results["store_work"]
    rows = []
    for backend in ("sqlite", "postgresql"):
        small, large = work[backend]["small"], work[backend]["large"]
        rows.append(
            [backend, f"{small['p50_ms']:.2f} / {small['p99_ms']:.2f}", f"{large['p50_ms']:.2f} / {large['p99_ms']:.2f}",
             f"{large['p50_ms'] / small['p50_ms']:.2f}x / {large['p99_ms'] / small['p99_ms']:.2f}x",
             f"{large['fill_seconds']:.0f} s"]
        )  # fmt: skip
    score, boot, crash, stale, rebuilt = (results[k] for k in ("score", "startup", "replicas", "staleness", "rebuild"))
    cores = results.get("cores", 2)
    large_users = work["sqlite"]["large"]["users"]
    return "\n".join(
        [
            "# The user store at scale",
            "",
            f"Generated {time.strftime('%Y-%m-%d')} by `{command}` on this machine ({cores} cores), K = {NUM_HEADS}, "
            "a tiny MiCRo checkpoint for the servers. SQLite in a temporary folder, PostgreSQL 15 a private server on "
            f"127.0.0.1.{load_note(results, cores)}",
            "",
            "## One feedback's store work (posterior update, log row, durable commit)",
            "",
            *markdown_table(
                [
                    "backend",
                    f"{work['sqlite']['small']['users']:,} users p50 / p99 ms",
                    f"{large_users:,} users p50 / p99 ms",
                    "ratio",
                    f"filling {large_users:,} users",
                ],
                rows,
            ),  # fmt: skip
            "",
            f"Targets: p50 <= 5 ms and p99 <= 50 ms at {large_users:,} users, within 2x of the small store.",
            "",
            f"## `/score` while 4 clients send feedback ({large_users:,}-user SQLite store)",
            "",
            *markdown_table(
                ["", "p50 ms", "p99 ms", "requests"],
                [
                    [
                        "`/score` alone",
                        f"{score['alone']['p50_ms']:.1f}",
                        f"{score['alone']['p99_ms']:.1f}",
                        score["alone"]["n"],
                    ],
                    [
                        "`/score` under feedback",
                        f"{score['under_feedback']['p50_ms']:.1f}",
                        f"{score['under_feedback']['p99_ms']:.1f}",
                        score["under_feedback"]["n"],
                    ],
                ],
            ),  # fmt: skip
            "",
            f"p99 under feedback / alone: **{score['p99_ratio']:.2f}x** (target <= 1.5x); feedback taken meanwhile: "
            f"{score['feedback_per_second']:.0f} comparisons per second.",
            "",
            "## Start-up and memory",
            "",
            *markdown_table(
                ["store", "start-up s", "resident MB"],
                [
                    ["1 user", f"{boot['small']['seconds']:.1f}", f"{boot['small']['resident_mb']:.0f}"],
                    [
                        f"{large_users:,} users",
                        f"{boot['large']['seconds']:.1f}",
                        f"{boot['large']['resident_mb']:.0f}",
                    ],
                ],
            ),
            "",
            f"Ratios: start-up {boot['large']['seconds'] / boot['small']['seconds']:.2f}x, memory "
            f"{boot['large']['resident_mb'] / boot['small']['resident_mb']:.2f}x (target <= 1.2x each).",
            "",
            "## 4 replicas on PostgreSQL, one killed with SIGKILL",
            "",
            f"{crash['acknowledged']} comparisons acknowledged, {crash['logged']} in the log; every acknowledged one "
            f"logged exactly once: **{crash['acknowledged_logged_once']}**; each user's update count equal to its "
            f"applied log rows: **{crash['updates_equal_log_rows']}**; server 0 killed and restarted: "
            f"{crash['killed_and_restarted']}; {crash['retried_requests']} requests retried; {crash['seconds']:.0f} s.",
            "",
            "## Staleness between replicas (PostgreSQL, `--store_staleness_s 0.5`)",
            "",
            f"From A's acknowledgement to B routing the user with the new weights: p50 {stale['p50_ms']:.0f} ms, p99 "
            f"**{stale['p99_ms']:.0f} ms** over {stale['n']} trials (target <= 1,000 ms).",
            "",
            "## Rebuild for new heads on the same backbone",
            "",
            f"{rebuilt['comparisons']:,} logged comparisons of {rebuilt['users']:,} users rebuilt in "
            f"{rebuilt['seconds']:.1f} s: **{rebuilt['comparisons_per_second']:,.0f} comparisons per second** (target "
            f">= 10,000); {rebuilt['sequences_from_features']:,} sequences read from the feature store, "
            f"{rebuilt['sequences_computed']} run through the backbone.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="Users in the large stores.")
    parser.add_argument("--small_users", type=int, default=1_000, help="Users in the small stores.")
    parser.add_argument("--feedback", type=int, default=1000, help="Comparisons timed per store.")
    parser.add_argument("--score_requests", type=int, default=400, help="/score requests per phase.")
    parser.add_argument("--per_client", type=int, default=250, help="Comparisons per client in the crash run.")
    parser.add_argument("--staleness_trials", type=int, default=50, help="Staleness measurements.")
    parser.add_argument("--rebuild_comparisons", type=int, default=50_000, help="Logged comparisons rebuilt.")
    parser.add_argument("--output", default=str(RESULTS), help="Markdown report; the JSON goes next to it.")
    args = parser.parse_args(argv)
    output = ensure_writable(args.output)
    results: dict = {"store_work": {}}
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="trl-micro-user-store-") as scratch, LocalPostgres() as postgres:
        folder = Path(scratch)
        log = folder / "servers.log"
        for backend in ("sqlite", "postgresql"):
            results["store_work"][backend] = {}
            for size, users in (("small", args.small_users), ("large", args.users)):
                name = f"{backend}_{size}"
                url = f"sqlite:///{folder / name}.db" if backend == "sqlite" else postgres.create_database(name)
                results["store_work"][backend][size] = store_work(url, users, args.feedback)
                print(backend, size, results["store_work"][backend][size], flush=True)
        checkpoint = tiny_checkpoint(folder / "micro-rm")
        large_sqlite = f"sqlite:///{folder / 'sqlite_large'}.db"
        results["score"] = score_under_feedback(checkpoint, large_sqlite, args.users, folder, log, args.score_requests)
        print("score", results["score"], flush=True)
        one_user = f"sqlite:///{folder / 'one'}.db"
        fill(open_user_store(one_user, num_heads=NUM_HEADS), 1)
        results["startup"] = {
            "small": startup(checkpoint, one_user, log),
            "large": startup(checkpoint, large_sqlite, log),
        }
        print("startup", results["startup"], flush=True)
        results["replicas"] = replicas_and_a_crash(
            checkpoint, postgres.create_database("replicas"), folder, log, args.per_client
        )
        print("replicas", results["replicas"], flush=True)
        results["staleness"] = staleness(
            checkpoint, postgres.create_database("staleness"), folder, log, args.staleness_trials
        )
        print("staleness", results["staleness"], flush=True)
        results["rebuild"] = rebuild(folder, args.rebuild_comparisons)
        print("rebuild", results["rebuild"], flush=True)
    results["load_average"] = (load_at_start, os.getloadavg()[0])
    results["cores"] = os.cpu_count()
    write_study_report(output, "benchmarks.performance.user_store", argv, results, render)
    print(output.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
