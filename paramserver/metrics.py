"""The front door's Prometheus endpoint: its own call metrics, and at each scrape the jobs' and
every shard's, gathered from the actors through Ray (``serve --metrics-port``).

Why gathered at scrape time through the front door rather than each actor serving its own
endpoint or Ray's metrics export: one scrape target per service (a Kubernetes Service or a
static config names one port, not one per shard on ports that move with recoveries), no extra
port to open on worker nodes, no dependency on Ray's metrics agent (it needs ray[default] and
an OpenTelemetry pipeline), and the values are read when Prometheus asks, so they are never
older than the scrape. The cost is one Ray call per actor per scrape (about a millisecond
each); an actor that does not answer within SCRAPE_TIMEOUT_S is left out of that scrape and
counted in ``paramserver_scrape_errors_total``.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from paramserver.metric_names import CATALOG, PHASE_BUCKETS, spec
from paramserver.telemetry import Sample

#: How long a scrape waits for the actors, seconds.
SCRAPE_TIMEOUT_S = 5.0


class TelemetrySource(Protocol):
    """What the endpoint gathers from (paramserver.cluster.Cluster)."""

    async def telemetry(
        self, log_since: Mapping[str, int] | None, timeout: float = SCRAPE_TIMEOUT_S
    ) -> dict[str, dict[str, Any] | None]: ...


def families(exports: Mapping[str, Mapping[str, Any] | None]) -> list[Metric]:
    """Prometheus families of the actors' exports (see Cluster.telemetry), plus the job-level
    values the shards' exports combine into: workers pushed and waiting, and optimizer health."""
    by_name: dict[str, list[Sample]] = defaultdict(list)
    for export in exports.values():
        if export is None:
            continue
        for sample in export.get("samples", ()):
            by_name[sample.name].append(sample)
    for sample in _combined(exports):
        by_name[sample.name].append(sample)
    out: list[Metric] = []
    for m in CATALOG:
        samples = by_name.get(m.name)
        if not samples:
            continue
        labels = list(m.labels)
        if m.kind == "histogram":
            hist = HistogramMetricFamily(m.name, m.help, labels=labels)
            for s in samples:
                assert s.hist is not None
                cumulative, buckets = 0, []
                for bound, count in zip((*s.hist.bounds, math.inf), s.hist.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), float(cumulative)))
                hist.add_metric(_values(s, labels), buckets, s.hist.total)
            out.append(hist)
        else:
            family = (
                CounterMetricFamily(m.name, m.help, labels=labels)
                if m.kind == "counter"
                else GaugeMetricFamily(m.name, m.help, labels=labels)
            )
            for s in samples:
                family.add_metric(_values(s, labels), s.value)
            out.append(family)
    return out


def _values(sample: Sample, labels: list[str]) -> list[str]:
    have = dict(sample.labels)
    return [str(have.get(name, "")) for name in labels]


def _combined(exports: Mapping[str, Mapping[str, Any] | None]) -> Iterator[Sample]:
    """Job-level series from the shards: pushed/waiting workers of the open step (a worker has
    pushed when every shard holds its push), and per group the gradient norm and the
    update/parameter RMS ratio of the latest measured step (see paramserver.optimizer_health)."""
    jobs: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for source, export in exports.items():
        if source != "coordinator" and export is not None and "step" in export:
            jobs[str(export["job"])].append(export)
    for job, shards in jobs.items():
        pushed = set.intersection(*(set(e["pushed"]) for e in shards))
        members = set().union(*(set(e["members"]) for e in shards))
        yield Sample("paramserver_job_workers_pushed", (("job_id", job),), float(len(pushed & members)))
        yield Sample("paramserver_job_workers_waiting", (("job_id", job),), float(len(members - pushed)))
        health: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
        for e in shards:
            for group, entry in e.get("health", {}).items():
                health[str(group)].append(tuple(entry))
        for group, entries in health.items():
            step = max(e[0] for e in entries)
            same = [e for e in entries if e[0] == step]
            grad_sq, update_sq, param_sq = (sum(e[k] for e in same) for k in (1, 2, 3))
            labels = (("job_id", job), ("group", group))
            yield Sample("paramserver_job_grad_norm", labels, math.sqrt(grad_sq))
            yield Sample("paramserver_job_update_rms_ratio", labels, math.sqrt(update_sq / param_sq) if param_sq > 0 else 0.0)


class _ClusterCollector(Collector):
    """Gathers the actors' telemetry on the service's event loop at each scrape."""

    def __init__(self, source: TelemetrySource, loop: asyncio.AbstractEventLoop, errors: Counter) -> None:
        self.source, self.loop, self.errors = source, loop, errors

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(self.source.telemetry(None, SCRAPE_TIMEOUT_S), self.loop)
        try:
            exports = future.result(SCRAPE_TIMEOUT_S * 2 + 1)
        except Exception:  # noqa: BLE001 - the loop is stopping or the gather hung: nothing this time
            self.errors.labels(source="cluster").inc()
            return []
        for source, export in exports.items():
            if export is None:
                self.errors.labels(source="coordinator" if source == "coordinator" else "shard").inc()
        return families(exports)


class MetricsEndpoint:
    """The /metrics HTTP endpoint of a front door (started by paramserver.server.Service)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        rpc, seconds, errors = spec("paramserver_rpc"), spec("paramserver_rpc_seconds"), spec("paramserver_scrape_errors")
        self.calls = Counter(rpc.name, rpc.help, list(rpc.labels), registry=self.registry)
        self.latency = Histogram(seconds.name, seconds.help, list(seconds.labels), buckets=PHASE_BUCKETS, registry=self.registry)
        self.errors = Counter(errors.name, errors.help, list(errors.labels), registry=self.registry)
        self.port = 0
        self._server: Any = None

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        """Count one front-door call (an rpc.Observer, bound to a service's name)."""
        self.calls.labels(service=service, method=method, code=code).inc()
        self.latency.labels(service=service, method=method).observe(seconds)

    def start(
        self, host: str, port: int, source: TelemetrySource, loop: asyncio.AbstractEventLoop, certfile: str = "", keyfile: str = ""
    ) -> int:
        """Serve /metrics on host:port (0 = any free port; HTTPS with `certfile`); the bound port."""
        self.registry.register(_ClusterCollector(source, loop, self.errors))
        server, _ = start_http_server(port, host, self.registry, certfile=certfile or None, keyfile=keyfile or None)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
