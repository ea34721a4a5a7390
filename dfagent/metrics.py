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

__all__ = ["METRIC_NAMES", "PEER_METRIC_NAMES", "SUPERNODE_ENDPOINTS", "PeerMetrics",
           "SupernodeMetrics"]

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
    "dfagent_supernode_leases_total",
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
        self.leases = Counter("dfagent_supernode_leases_total",
                              "Digests nobody held in lease lookups, by result: granted (the "
                              "requester fetches it from the source), fetching (pointed at "
                              "the peer that does), refused (at its limit of leases or bytes)",
                              ["result"], registry=r)
        for result in ("granted", "fetching", "refused"):
            self.leases.labels(result)
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


# -- the peer agent -------------------------------------------------------------------------

# Chunk fetches take from microseconds (store hits) to seconds (a cold source over a WAN).
FETCH_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

ORIGINS = ("local", "peer", "source")
SOURCE_REASONS = ("leased", "direct", "waited", "refused", "failed")

PEER_METRIC_NAMES: tuple[str, ...] = (
    "dfagent_peer_chunks_total",
    "dfagent_peer_bytes_total",
    "dfagent_peer_fetch_seconds",
    "dfagent_peer_p2p_hit_ratio",
    "dfagent_peer_fetch_failures_total",
    "dfagent_peer_uploads_total",
    "dfagent_peer_upload_bytes_total",
    "dfagent_peer_uploads_active",
    "dfagent_peer_upload_rejections_total",
    "dfagent_peer_cut_through_total",
    "dfagent_peer_store_bytes",
    "dfagent_peer_store_chunks",
    "dfagent_peer_store_evictions_total",
    "dfagent_peer_lookup_seconds",
    "dfagent_peer_lookup_errors_total",
    "dfagent_peer_verification_failures_total",
    "dfagent_peer_busy_answers_total",
    "dfagent_peer_duplicate_bytes_total",
    "dfagent_peer_bad_peer_reports_total",
    "dfagent_peer_source_fetches_total",
    "dfagent_peer_supernode_connected",
    "dfagent_peer_registrations_total",
)


class PeerMetrics:
    """The peer agent's metrics (served at ``/metrics`` on its local API socket and, when
    configured, on ``metrics: HOST:PORT``). Bytes are chunk-file bytes (compressed payload plus
    the 48-byte header), as they travel and are stored."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.chunks = Counter("dfagent_peer_chunks_total",
                              "Chunks delivered to local clients by origin "
                              "(local = already in the store, peer, source)", ["origin"],
                              registry=r)
        self.bytes = Counter("dfagent_peer_bytes_total",
                             "Chunk bytes delivered to local clients by origin", ["origin"],
                             registry=r)
        self.fetch_seconds = Histogram("dfagent_peer_fetch_seconds",
                                       "Time to get a chunk, by the origin that served it",
                                       ["origin"], buckets=FETCH_BUCKETS, registry=r)
        self.hit_ratio = Gauge("dfagent_peer_p2p_hit_ratio",
                               "Chunks fetched from peers / chunks fetched from peers or "
                               "sources", registry=r)
        self.fetch_failures = Counter("dfagent_peer_fetch_failures_total",
                                      "Chunks that could not be had from anywhere", registry=r)
        self.uploads = Counter("dfagent_peer_uploads_total", "Chunks served to other peers",
                               registry=r)
        self.upload_bytes = Counter("dfagent_peer_upload_bytes_total",
                                    "Chunk bytes served to other peers", registry=r)
        self.uploads_active = Gauge("dfagent_peer_uploads_active",
                                    "Upload requests being served now", registry=r)
        self.upload_rejections = Counter("dfagent_peer_upload_rejections_total",
                                         "Upload requests refused (reason: busy|unauthorized)",
                                         ["reason"], registry=r)
        self.cut_through = Counter("dfagent_peer_cut_through_total",
                                   "Chunks passed on while still arriving (outcome: sent "
                                   "whole or cut off when the chunk failed or stalled on its "
                                   "way here; lost: received cut off from a peer, asked "
                                   "again elsewhere)", ["outcome"], registry=r)
        self.store_bytes = Gauge("dfagent_peer_store_bytes", "Bytes in the chunk store",
                                 registry=r)
        self.store_chunks = Gauge("dfagent_peer_store_chunks", "Chunks in the chunk store",
                                  registry=r)
        self.evictions = Counter("dfagent_peer_store_evictions_total",
                                 "Chunks evicted from the store at the quota", registry=r)
        self.lookup_seconds = Histogram("dfagent_peer_lookup_seconds",
                                        "Supernode lookup latency (one batched call)",
                                        buckets=FETCH_BUCKETS, registry=r)
        self.lookup_errors = Counter("dfagent_peer_lookup_errors_total",
                                     "Supernode lookups that failed or timed out (the chunks "
                                     "went to the source)", registry=r)
        self.verification_failures = Counter("dfagent_peer_verification_failures_total",
                                             "Chunks that failed verification, by origin "
                                             "(peer, source, store)", ["origin"], registry=r)
        self.peer_busy = Counter("dfagent_peer_busy_answers_total",
                                 "Peer requests refused as busy (429/503) by the peer asked",
                                 registry=r)
        self.duplicate_bytes = Counter("dfagent_peer_duplicate_bytes_total",
                                       "Chunk bytes received from peers that had arrived "
                                       "already (a hedged request's second copy)", registry=r)
        self.bad_peer_reports = Counter("dfagent_peer_bad_peer_reports_total",
                                        "Peers reported to the supernode, by reason",
                                        ["reason"], registry=r)
        self.source_fetches = Counter(
            "dfagent_peer_source_fetches_total",
            "Chunks this node went to the source for, by why: leased (the supernode leased "
            "it to this node), direct (no supernode answer), waited (waiting on other "
            "peers' fetches ran out), refused (waiting for a lease ran out: this node's lease "
            "budget stayed full), failed (every peer asked failed)", ["reason"],
            registry=r)
        self.supernode_connected = Gauge("dfagent_peer_supernode_connected",
                                         "1 while registered with a supernode, else 0",
                                         registry=r)
        self.registrations = Counter("dfagent_peer_registrations_total",
                                     "Registrations with a supernode (first and again after "
                                     "it lost this peer)", registry=r)
        for origin in ORIGINS:
            self.chunks.labels(origin)
            self.bytes.labels(origin)
            self.fetch_seconds.labels(origin)
        for origin in ("peer", "source", "store"):
            self.verification_failures.labels(origin)
        for reason in ("busy", "unauthorized"):
            self.upload_rejections.labels(reason)
        for reason in SOURCE_REASONS:
            self.source_fetches.labels(reason)
        for outcome in ("sent", "cut", "lost"):
            self.cut_through.labels(outcome)

        self.delivered_by: dict[str, int] = dict.fromkeys(ORIGINS, 0)  # also for stats()
        # Per origin, the children ``delivered`` updates for every chunk (``labels`` looks
        # them up under a lock each time).
        self._by_origin = {o: (self.chunks.labels(o), self.bytes.labels(o),
                               self.fetch_seconds.labels(o)) for o in ORIGINS}

    def delivered(self, origin: str, nbytes: int, seconds: float) -> None:
        self.delivered_by[origin] = self.delivered_by.get(origin, 0) + 1
        chunks, nbytes_c, latency = self._by_origin[origin]
        chunks.inc()
        nbytes_c.inc(nbytes)
        latency.observe(seconds)

    def render(self, *, store_chunks: int, store_bytes: int) -> bytes:
        self.store_chunks.set(store_chunks)
        self.store_bytes.set(store_bytes)
        peer, source = self.delivered_by["peer"], self.delivered_by["source"]
        self.hit_ratio.set(peer / (peer + source) if peer + source else 0.0)
        return generate_latest(self.registry)
