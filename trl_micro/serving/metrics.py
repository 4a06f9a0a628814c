"""The reward service's Prometheus metrics, in a registry of their own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trl_micro_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trl_micro_request_seconds",
            "Request latency by endpoint.",
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

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, num_rows: int) -> None:
        self.batch_rows.observe(num_rows)

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
