"""The server's Prometheus metrics (prometheus_client), each app with a registry of its own.

A registry per app, not the library's global one: tests and benchmarks create several apps in one
process, and each must count only its own requests.

Requests and rows are labelled by `task` and `status` (the HTTP status code). `task` is the entry
named by the request, `(routed)` for a request naming none (its rows then count under the entry
each was routed to) and `(invalid)` for one that could not be read or named no entry of the bank:
client-chosen strings never become label values, so a client cannot grow the metrics without bound.
`entry` of `crpt_nan_scores` is an entry of the bank, too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTED = "(routed)"
INVALID = "(invalid)"
CLIENT_CLOSED = 499  # nginx's code for a client that went away before its answer: logged, never sent

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECOND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    """Counters and histograms of one app, exported by `text()` in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("crpt_predict_requests", "POST /v1/predict requests, by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.rows = Counter("crpt_predict_rows", "rows of POST /v1/predict requests, by task (the entry that answered, "
                            "for routed rows) and HTTP status", ["task", "status"], registry=self.registry)
        self.batch_rows = Histogram("crpt_batch_rows", "rows per forward batch (requests of any tasks merged)",
                                    buckets=ROW_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("crpt_batch_requests", "requests merged into one forward batch",
                                        buckets=ROW_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("crpt_queue_wait_seconds", "time a parsed request waits for its batch to start",
                                    buckets=SECOND_BUCKETS, registry=self.registry)
        self.latency = Histogram("crpt_request_latency_seconds", "POST /v1/predict latency, body read to answer ready",
                                 ["status"], buckets=SECOND_BUCKETS, registry=self.registry)
        self.nan_scores = Counter("crpt_nan_scores", "batches in which an entry's scores were NaN (the requests it answered "
                                  "failed with 500, the others of the batch were answered), by entry", ["entry"], registry=self.registry)
        self.entries = Gauge("crpt_bank_entries", "entries of the bank being served", registry=self.registry)
        self.generation = Gauge("crpt_bank_generation", "changes to the bank seen since the server started",
                                registry=self.registry)

    def request(self, task: str, status: int, rows: dict[str, int], seconds: float | None = None) -> None:
        """Count one predict request under `task` and `status`, its rows under the entries in `rows` (name -> count)."""
        self.requests.labels(task, str(status)).inc()
        for name, count in rows.items():
            self.rows.labels(name, str(status)).inc(count)
        if seconds is not None:
            self.latency.labels(str(status)).observe(seconds)

    def batch(self, rows: int, requests: int) -> None:
        """Record one forward batch."""
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def bank(self, entries: int, generation: int) -> None:
        """Record the size and generation of the bank being served."""
        self.entries.set(entries)
        self.generation.set(generation)

    def text(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
