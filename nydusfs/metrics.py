"""Prometheus metrics for one nydusfs mount: the only place metric names are defined.

This is the observability layer. :class:`FsMetrics` implements
:class:`~nydusfs.fs.model.FsObserver`, so the filesystem reports reads, fetches, cache hits and
verification failures as they happen; gauges that describe *state* (prefetch progress, cache
occupancy) are not pushed but read at scrape time from callables registered with
:meth:`FsMetrics.add_gauge_source`, so they can never go stale.

Each :class:`FsMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` (never the
global one), so several mounts in one process, or many tests, do not clash. The endpoint is
off by default and started by :func:`start_metrics_server` when the config says
``metrics: HOST:PORT``.

Every name is in :data:`METRIC_NAMES`; dashboards use exactly these and a test checks it.
Histograms are listed by their base name (queries use ``_bucket``/``_sum``/``_count``).

This module must never block or raise from an observer hook: they run on the read path.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

__all__ = [
    "METRIC_NAMES",
    "FsMetrics",
    "GaugeSource",
    "MetricsServer",
    "cache_gauges",
    "dragonfly_gauges",
    "prefetch_gauges",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

GaugeSource = Callable[[], dict[str, float]]

# Reads are served from memory in microseconds or from a slow backend in seconds.
READ_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

CACHE_KINDS = ("memory", "disk", "inflight")
VERIFY_WHERE = ("backend", "cache")


@dataclass(frozen=True, slots=True)
class _ScrapeFamily:
    name: str
    help: str
    label: str | None = None  # at most one label: enough for every state gauge here
    counter: bool = False  # a monotonic value read from a source (exposed with _total)


# State read at scrape time. A source returns keys ``name`` or ``name{label=value}``.
_SCRAPE_FAMILIES: tuple[_ScrapeFamily, ...] = (
    _ScrapeFamily(
        "nydusfs_prefetch_chunks", "Prefetch progress in chunks (state: done|total|failed)", "state"
    ),
    _ScrapeFamily(
        "nydusfs_prefetch_bytes", "Prefetch progress in bytes (state: done|total)", "state"
    ),
    _ScrapeFamily("nydusfs_cache_used_bytes", "Bytes held by the local chunk cache"),
    _ScrapeFamily("nydusfs_cache_quota_bytes", "Size quota of the local chunk cache"),
    _ScrapeFamily("nydusfs_cache_chunks", "Chunk files in the local chunk cache"),
    _ScrapeFamily(
        "nydusfs_cache_evictions_total", "Chunks evicted from the local cache", counter=True
    ),
    _ScrapeFamily(
        "nydusfs_cache_errors_total", "I/O errors reading or writing the local cache", counter=True
    ),
    _ScrapeFamily(
        "nydusfs_cache_written_bytes_total", "Bytes written into the local cache", counter=True
    ),
    # backend: dragonfly — where the chunks came from, and how often the agent let us down.
    _ScrapeFamily(
        "nydusfs_dragonfly_chunks_total",
        "Chunks read with backend dragonfly (origin: agent|source; source = fallback)",
        "origin", counter=True,
    ),
    _ScrapeFamily(
        "nydusfs_dragonfly_fallbacks_total",
        "Batches sent to the image's own source because the agent could not answer",
        counter=True,
    ),
    _ScrapeFamily(
        "nydusfs_dragonfly_agent_errors_total", "Failed calls to the local agent", counter=True
    ),
)
_SCRAPE_BY_NAME = {f.name: f for f in _SCRAPE_FAMILIES}

METRIC_NAMES: tuple[str, ...] = (
    "nydusfs_read_seconds",
    "nydusfs_read_bytes_total",
    "nydusfs_chunks_fetched_total",
    "nydusfs_fetched_bytes_total",
    "nydusfs_cache_hits_total",
    "nydusfs_cache_misses_total",
    "nydusfs_verification_failures_total",
    *(f.name for f in _SCRAPE_FAMILIES),
)

_KEY_RE = re.compile(r"^([a-z_][a-z0-9_]*)(?:\{([a-z_][a-z0-9_]*)=([^{}=]*)\})?$")


class _ScrapeCollector(Collector):
    """Reads the registered sources on every scrape (in the server's thread, off the loop)."""

    def __init__(self) -> None:
        self._sources: list[GaugeSource] = []
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def add(self, fn: GaugeSource) -> None:
        with self._lock:
            self._sources.append(fn)

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        with self._lock:
            sources = list(self._sources)
        merged: dict[str, float] = {}  # one sample per key: a duplicate would break the scrape
        for fn in sources:
            try:
                merged.update(fn())
            except Exception:  # a broken source must not break the whole scrape
                log.exception("metrics gauge source %r failed", fn)
        for key, value in merged.items():
            self._add_sample(families, key, value)
        return list(families.values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        out: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for f in _SCRAPE_FAMILIES:
            labels = [f.label] if f.label else None
            if f.counter:
                out[f.name] = CounterMetricFamily(f.name, f.help, labels=labels)
            else:
                out[f.name] = GaugeMetricFamily(f.name, f.help, labels=labels)
        return out

    def _add_sample(
        self,
        families: Mapping[str, GaugeMetricFamily | CounterMetricFamily],
        key: str,
        value: float,
    ) -> None:
        m = _KEY_RE.match(key)
        spec = _SCRAPE_BY_NAME.get(m.group(1)) if m else None
        if m is None or spec is None or m.group(2) != spec.label:
            if key not in self._warned:  # only names in METRIC_NAMES may be exported
                self._warned.add(key)
                log.warning("metrics gauge source gave unknown key %r; ignored", key)
            return
        labels = [m.group(3)] if spec.label else []
        families[spec.name].add_metric(labels, float(value))


class FsMetrics:
    """The :class:`~nydusfs.fs.model.FsObserver` that exports to Prometheus.

    ``backends`` pre-creates the per-backend series so they read 0 before the first fetch.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, backends: Iterable[str] = ()
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.read_seconds = Histogram(
            "nydusfs_read_seconds",
            "Latency of FUSE reads",
            ["outcome"],
            buckets=READ_BUCKETS,
            registry=r,
        )
        self.read_bytes = Counter(
            "nydusfs_read_bytes_total", "Bytes returned to readers", registry=r
        )
        self.chunks_fetched = Counter(
            "nydusfs_chunks_fetched_total", "Chunks fetched from a backend", ["backend"], registry=r
        )
        self.fetched_bytes = Counter(
            "nydusfs_fetched_bytes_total",
            "Compressed bytes fetched from a backend",
            ["backend"],
            registry=r,
        )
        self.cache_hits = Counter(
            "nydusfs_cache_hits_total",
            "Chunk lookups served without a backend fetch (kind: memory|disk|inflight)",
            ["kind"],
            registry=r,
        )
        self.cache_misses = Counter(
            "nydusfs_cache_misses_total", "Chunk lookups that needed a backend fetch", registry=r
        )
        self.verification_failures = Counter(
            "nydusfs_verification_failures_total",
            "Chunks whose digest did not match (where: backend|cache)",
            ["where"],
            registry=r,
        )
        self._scrape = _ScrapeCollector()
        r.register(self._scrape)
        # Zero series exist from the start, so rate() and dashboards see them before any event.
        for outcome in ("ok", "error"):
            self.read_seconds.labels(outcome)
        for kind in CACHE_KINDS:
            self.cache_hits.labels(kind)
        for where in VERIFY_WHERE:
            self.verification_failures.labels(where)
        for backend in backends:
            self.chunks_fetched.labels(backend)
            self.fetched_bytes.labels(backend)

    # FsObserver ----------------------------------------------------------------------------

    def read_done(self, seconds: float, nbytes: int, ok: bool) -> None:
        self.read_seconds.labels("ok" if ok else "error").observe(seconds)
        if nbytes > 0:
            self.read_bytes.inc(nbytes)

    def chunk_fetched(self, backend: str, compressed_bytes: int) -> None:
        self.chunks_fetched.labels(backend).inc()
        if compressed_bytes > 0:
            self.fetched_bytes.labels(backend).inc(compressed_bytes)

    def cache_hit(self, kind: str) -> None:
        self.cache_hits.labels(kind).inc()

    def cache_miss(self) -> None:
        self.cache_misses.inc()

    def verification_failure(self, where: str) -> None:
        self.verification_failures.labels(where).inc()

    # State read at scrape time --------------------------------------------------------------

    def add_gauge_source(self, fn: GaugeSource) -> None:
        """Call ``fn`` on every scrape; keys are ``name`` or ``name{label=value}``.

        Names must be the state families in :data:`METRIC_NAMES` (unknown keys are logged once
        and dropped). ``fn`` runs in the metrics server's thread, so it must be safe to call
        off the event loop; an exception is logged and skips that source only. If two sources
        give the same key, the later-registered one wins.
        """
        self._scrape.add(fn)


def prefetch_gauges(snapshot: Mapping[str, object]) -> dict[str, float]:
    """Convert ``Prefetcher.snapshot()`` into gauge keys: ``add_gauge_source(lambda:
    prefetch_gauges(prefetcher.snapshot()))``."""
    out: dict[str, float] = {}
    for key, name, state in (
        ("done_chunks", "nydusfs_prefetch_chunks", "done"),
        ("total_chunks", "nydusfs_prefetch_chunks", "total"),
        ("failed_chunks", "nydusfs_prefetch_chunks", "failed"),
        ("done_bytes", "nydusfs_prefetch_bytes", "done"),
        ("total_bytes", "nydusfs_prefetch_bytes", "total"),
    ):
        value = snapshot.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{name}{{state={state}}}"] = float(value)
    return out


# DiskChunkStore.stats() key → metric. Its hits/misses/corrupt are already counted through
# the observer (cache_hits_total{kind="disk"}, verification_failures_total{where="cache"}).
_CACHE_KEYS = {
    "bytes": "nydusfs_cache_used_bytes",
    "chunks": "nydusfs_cache_chunks",
    "evictions": "nydusfs_cache_evictions_total",
    "errors": "nydusfs_cache_errors_total",
    "bytes_stored": "nydusfs_cache_written_bytes_total",
}


def cache_gauges(stats: Mapping[str, int], quota: int | None = None) -> dict[str, float]:
    """Convert ``DiskChunkStore.stats()`` (and its quota) into source keys: ``add_gauge_source(
    lambda: cache_gauges(store.stats(), quota))``. Keys not in ``_CACHE_KEYS`` are dropped."""
    out = {name: float(stats[key]) for key, name in _CACHE_KEYS.items() if key in stats}
    if quota is not None:
        out["nydusfs_cache_quota_bytes"] = float(quota)
    return out


def dragonfly_gauges(stats: Mapping[str, object]) -> dict[str, float]:
    """Convert the dragonfly backend's ``stats()`` into source keys: a dead or slow agent shows
    up as fallbacks to the source, which a dashboard should make visible (reads still work)."""
    out: dict[str, float] = {}
    for key, name in (
        ("agent_chunks", "nydusfs_dragonfly_chunks_total{origin=agent}"),
        ("fallback_chunks", "nydusfs_dragonfly_chunks_total{origin=source}"),
        ("fallbacks", "nydusfs_dragonfly_fallbacks_total"),
        ("agent_errors", "nydusfs_dragonfly_agent_errors_total"),
    ):
        value = stats.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class MetricsServer:
    """A running metrics endpoint (a daemon thread); :meth:`close` stops it and frees the port."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host: str = str(httpd.server_address[0])
        self.port: int = int(httpd.server_address[1])

    def close(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()  # returns once serve_forever has stopped
        self._httpd.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(metrics: FsMetrics, host: str, port: int) -> MetricsServer:
    """Serve ``metrics`` at ``http://HOST:PORT/metrics`` from a daemon thread.

    ``port`` 0 picks a free port (read it from ``.port``). Blocking: call it before the event
    loop starts or via ``asyncio.to_thread``. Raises ``OSError`` if the address is taken.
    """
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(httpd, thread)
