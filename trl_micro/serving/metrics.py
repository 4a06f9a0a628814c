"""
The reward service's Prometheus metrics, in a registry of their own (one per app, so tests can run several).

Every label takes a bounded set of values: requests are labelled by route template (a path no route matches is
`unmatched`) and status, dropped rows by reason; user ids and raw paths never become labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DROP_REASONS = ("client_gone", "timed_out")


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trl_micro_requests",
            "HTTP answers by route template and status (500 included).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trl_micro_request_seconds",
            "Request latency by route template.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter("trl_micro_rows", "Rows scored.", registry=self.registry)
        self.batch_rows = Histogram(
            "trl_micro_batch_rows",
            "Rows per scored batch (dynamic batching).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.fallback_rows = Counter(
            "trl_micro_fallback_rows",
            "Rows of users the online router does not know (routed by the model).",
            registry=self.registry,
        )
        self.feedback = Counter("trl_micro_feedback", "Comparisons applied by /feedback.", registry=self.registry)
        self.dropped_rows = Counter(
            "trl_micro_dropped_rows",
            "Rows of requests answered without their scores: the client hung up, or the request timed out.",
            ["reason"],
            registry=self.registry,
        )
        self.admitted_rows = Gauge(
            "trl_micro_admitted_rows",
            "Rows admitted and not yet answered (bounded by --max_queued_rows).",
            registry=self.registry,
        )
        self.overloaded = Counter(
            "trl_micro_overloaded_requests",
            "Requests refused with 503 because --max_queued_rows rows were waiting.",
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "trl_micro_worker_restarts", "Times the batcher's worker was started again.", registry=self.registry
        )

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, num_rows: int) -> None:
        self.batch_rows.observe(num_rows)

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
