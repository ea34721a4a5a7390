"""Prometheus metrics for dfagent: the only place its metric names are defined.

Observability layer. Each metrics object owns its own
:class:`~prometheus_client.CollectorRegistry` (never the global one), so several servers in one
process (tests, benchmarks) do not clash. Every name is in :data:`METRIC_NAMES` (histograms by
their base name); dashboards use exactly these, and a test checks that the endpoint exports
them.

Supernode metrics are served by the supernode itself at ``/metrics``. Counters are incremented
on the request path (cheap: a lock and an add); gauges describing the store's size are set from
:meth:`SupernodeMetrics.set_store_stats` just before each scrape, so they are never stale.
Nothing here may raise or block on the request path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["METRIC_NAMES", "SUPERNODE_ENDPOINTS", "SupernodeMetrics"]

# Supernode requests take tens of microseconds (memory) to milliseconds (Redis, big batches).
REQUEST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

SUPERNODE_ENDPOINTS = ("register", "heartbeat", "leave", "peer", "announce", "withdraw",
                       "lookup", "report", "healthz", "readyz", "metrics", "other")

METRIC_NAMES: tuple[str, ...] = (
    "dfagent_supernode_peers",
    "dfagent_supernode_chunks",
    "dfagent_supernode_chunk_entries",
    "dfagent_supernode_lookups_total",
    "dfagent_supernode_announces_total",
    "dfagent_supernode_withdrawals_total",
    "dfagent_supernode_registrations_total",
    "dfagent_supernode_expirations_total",
    "dfagent_supernode_reports_total",
    "dfagent_supernode_quarantines_total",
    "dfagent_supernode_requests_total",
    "dfagent_supernode_request_seconds",
    "dfagent_supernode_store_errors_total",
)


class SupernodeMetrics:
    """The supernode's metrics; the scheduler and the HTTP layer call its methods."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.peers = Gauge("dfagent_supernode_peers",
                           "Registered peers (state: registered|quarantined)", ["state"],
                           registry=r)
        self.chunks = Gauge("dfagent_supernode_chunks",
                            "Distinct chunk digests with at least one holder", registry=r)
        self.chunk_entries = Gauge("dfagent_supernode_chunk_entries",
                                   "Indexed (peer, chunk) pairs", registry=r)
        self.lookups = Counter("dfagent_supernode_lookups_total",
                               "Digests looked up (result: hit = at least one peer returned, "
                               "miss)", ["result"], registry=r)
        self.announces = Counter("dfagent_supernode_announces_total",
                                 "Digests announced by peers", registry=r)
        self.withdrawals = Counter("dfagent_supernode_withdrawals_total",
                                   "Digests withdrawn by peers", registry=r)
        self.registrations = Counter("dfagent_supernode_registrations_total",
                                     "Peer registrations (first or repeated)", registry=r)
        self.expirations = Counter("dfagent_supernode_expirations_total",
                                   "Peers dropped for missing heartbeats", registry=r)
        self.reports = Counter("dfagent_supernode_reports_total",
                               "Bad-peer reports (outcome: counted|ignored)", ["outcome"],
                               registry=r)
        self.quarantines = Counter("dfagent_supernode_quarantines_total",
                                   "Peers put in quarantine", registry=r)
        self.requests = Counter("dfagent_supernode_requests_total",
                                "API requests by endpoint and HTTP status", ["endpoint", "code"],
                                registry=r)
        self.request_seconds = Histogram("dfagent_supernode_request_seconds",
                                         "API request latency by endpoint", ["endpoint"],
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.store_errors = Counter("dfagent_supernode_store_errors_total",
                                    "Peer store operations that failed", registry=r)
        for state in ("registered", "quarantined"):
            self.peers.labels(state)
        for result in ("hit", "miss"):
            self.lookups.labels(result)
        for outcome in ("counted", "ignored"):
            self.reports.labels(outcome)
        # Children bound once: ``labels()`` takes a lock and builds a key on every call, which
        # shows in the per-request cost of small lookups.
        self.lookup_hits = self.lookups.labels("hit")
        self.lookup_misses = self.lookups.labels("miss")
        self._latency = {e: self.request_seconds.labels(e) for e in SUPERNODE_ENDPOINTS}
        self._requests: dict[tuple[str, int], Counter] = {}

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        latency = self._latency.get(endpoint)
        if latency is None:
            endpoint = "other"
            latency = self._latency[endpoint]
        latency.observe(seconds)
        child = self._requests.get((endpoint, status))
        if child is None:
            child = self._requests[(endpoint, status)] = self.requests.labels(endpoint,
                                                                              str(status))
        child.inc()

    def set_store_stats(self, *, peers: int, quarantined: int, chunks: int,
                        entries: int) -> None:
        self.peers.labels("registered").set(peers)
        self.peers.labels("quarantined").set(quarantined)
        self.chunks.set(chunks)
        self.chunk_entries.set(entries)

    def render(self) -> bytes:
        """The text exposition of every metric (what ``/metrics`` serves)."""
        return generate_latest(self.registry)
