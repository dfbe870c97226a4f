"""Prometheus metrics (docs/design.md#the-request-path), one registry per proxy so tests can run several side by
side; under ``--workers`` one exposition for all the pod's workers (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

disable_created_metrics()  # type: ignore[no-untyped-call]  # a _created series per counter only doubles the scrape

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600)
"""Up to the longest upstream timeout a config sets by default (300 s) and past it, so a slow answer lands in a
bucket rather than only in +Inf."""


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("promptcache_requests", "Requests by API, model and outcome",
                                ["api", "model", "outcome"], registry=r)
        self.read_tokens = Counter("promptcache_read_tokens", "Prompt tokens billed as cache reads",
                                   ["model"], registry=r)
        self.engine_cached_tokens = Counter(
            "promptcache_engine_cached_tokens", "Prompt tokens the upstream reported serving from its own KV cache "
            "(beside promptcache_read_tokens: the share of billed reads backed by real reuse)", ["model"], registry=r)
        self.billing_caps = Counter("promptcache_billing_caps", "Bills whose split exceeded the upstream's prompt "
                                    "count: scaled to fit, or list_price (over by more than 25 %)",
                                    ["model", "action"], registry=r)
        self.creation_tokens = Counter("promptcache_creation_tokens", "Prompt tokens billed as cache writes",
                                       ["model", "tier"], registry=r)
        self.billed_cost = Counter("promptcache_billed_cost_usd", "Billed cost in USD (the ledger is exact)",
                                   ["model"], registry=r)
        self.list_cost = Counter("promptcache_list_cost_usd", "List-price cost in USD", ["model"], registry=r)
        self.prompt_tokens = Counter("promptcache_prompt_tokens", "Prompt tokens of billed requests (the denominator "
                                     "of the read ratio)", ["model"], registry=r)
        self.billed_requests = Counter("promptcache_billed_requests", "Billed requests by whether they read from the "
                                       "cache (cache=hit: read tokens > 0; else miss)", ["model", "cache"], registry=r)
        # One series per principal that sent traffic since the proxy started: spend per tenant for the dashboard
        # (docs/design.md#dashboards-and-alerts); the ledger stays the exact record.
        self.principal_cost = Counter("promptcache_principal_billed_cost_usd", "Billed cost in USD by principal",
                                      ["principal"], registry=r)
        self.principal_list_cost = Counter("promptcache_principal_list_cost_usd", "List-price cost in USD by "
                                           "principal", ["principal"], registry=r)
        self.lookup_seconds = Histogram("promptcache_lookup_seconds", "Index lookup latency",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.classify_seconds = Histogram("promptcache_classify_seconds", "Tokenise + lookup + classify latency",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("promptcache_commit_seconds", "Group commit latency (one round trip)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.commit_batch = Histogram("promptcache_commit_batch_size", "Requests committed per group commit",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.added_seconds = Histogram(
            "promptcache_added_latency_seconds", "What the proxy adds to a request: its time to the client's "
            "response (whole body; first byte when streamed) less the upstream's time to the same point",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram("promptcache_upstream_seconds", "Upstream latency to the response head",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.index_fallbacks = Counter("promptcache_index_fallbacks", "Requests billed at list price or served "
                                       "from a lower index tier, by reason", ["reason"], registry=r)
        self.markers_rejected = Counter("promptcache_markers_rejected", "Requests rejected for invalid "
                                        "cache_control, by rule", ["rule"], registry=r)
        self.auth_throttled = Counter("promptcache_auth_throttled", "Requests answered 429 without a key lookup: "
                                      "their address sent too many invalid keys", registry=r)
        self.budget_refusals = Counter("promptcache_budget_refusals", "Requests answered 429 because their principal "
                                       "had used its monthly budget", ["model"], registry=r)
        self.classify_queue = Gauge("promptcache_classify_queue", "Classifications waiting for a turn", registry=r,
                                    multiprocess_mode="livesum")
        self.classify_wait_seconds = Histogram("promptcache_classify_wait_seconds", "Wait for a classification turn",
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.ledger_queued = Gauge("promptcache_ledger_queue_depth", "Commits in the spool, waiting for Postgres",
                                   registry=r, multiprocess_mode="livesum")
        self.ledger_spool_bytes = Gauge("promptcache_ledger_spool_bytes", "Bytes in the ledger spool", registry=r,
                                        multiprocess_mode="livesum")
        self.ledger_dropped = Counter("promptcache_ledger_dropped", "Commits dropped because the spool was full or "
                                      "Postgres refused the row (each is also logged with its full row)", registry=r)
        self.ready = Gauge("promptcache_ready", "1 if this proxy's last /readyz answered ready, else 0 (also before "
                           "its first probe)", registry=r, multiprocess_mode="livemax")
        self.config_reloads = Counter("promptcache_config_reloads", "Config reloads by result", ["result"],
                                      registry=r)
        self.routes = Counter("promptcache_routes", "Requests sent upstream by model, replica and decision (read: "
                              "the replica of the entry read; write: the ring's owner; least_loaded, round_robin, "
                              "random, single)", ["model", "replica", "decision"], registry=r)
        self.routing_fallbacks = Counter("promptcache_routing_fallbacks", "Requests whose preferred replica was "
                                         "passed over, by reason (unready, failing, overloaded)", ["model", "reason"],
                                         registry=r)
        self.replica_failures = Counter("promptcache_replica_failures", "Connections a replica refused or dropped "
                                        "(each passes it over for a few seconds)", ["model", "replica"], registry=r)
        self.replica_in_flight = Gauge("promptcache_replica_in_flight", "Requests in flight to each replica",
                                       ["model", "replica"], registry=r, multiprocess_mode="livesum")

    def exposition(self) -> bytes:
        """The text format: this registry's, or under ``--workers`` every live worker's, summed."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        return generate_latest(registry)
