"""Prometheus metrics of the server (`GET /metrics`), one registry per app."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Time to first token, turn latency, queue depth, batch sizes, memory-update lag, store latency."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("rxt_time_to_first_token_seconds", "Request arrival to first generated token.",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.turn_latency = Histogram("rxt_turn_latency_seconds", "Request arrival to the recorded reply.",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("rxt_queue_depth", "Jobs waiting for the engine.", ["kind"], registry=r)
        self.in_flight = Gauge("rxt_turns_in_flight", "Admitted turns not finished yet.", registry=r)
        self.batch_size = Histogram("rxt_batch_size", "Rows per engine batch.", ["kind"], buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.update_lag = Histogram("rxt_memory_update_lag_seconds", "Turn recorded to its memory update stored.",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.update_wait = Histogram("rxt_memory_update_wait_seconds", "Time a turn waited for its conversation's "
                                     "previous memory update (0 when it was done).", buckets=LATENCY_BUCKETS,
                                     registry=r)  # fmt: skip
        self.store_latency = Histogram("rxt_store_latency_seconds", "State-store operations.", ["op"],
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.turns = Counter("rxt_turns_total", "Turns recorded.", ["kind"], registry=r)
        self.rejected = Counter("rxt_rejected_total", "Requests answered 429 (queue full).", registry=r)
        self.tokens = Counter("rxt_generated_tokens_total", "Tokens generated.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
