"""The front door: the control-plane gRPC server with health and reflection, and its lifecycle.

``Service`` runs on an asyncio loop; :func:`serve` runs it in the foreground
until SIGTERM/SIGINT, :class:`BackgroundService` runs it on a thread (the demo
and the tests). On shutdown: health NOT_SERVING, stop accepting calls within
a grace period, stop every job's shard actors, then shut down the local Ray
if this process started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from grpc import aio

from paramserver.access import AuthConfig
from paramserver.cluster import Cluster, start_ray, stop_ray
from paramserver.gate import FrontDoorGate
from paramserver.health import add_health_and_reflection, set_serving
from paramserver.job_service import JobServicer
from paramserver.log_relay import LogRelay
from paramserver.metrics import MetricsEndpoint
from paramserver.rpc import GRPC_OPTIONS, add_unary_service
from paramserver.snapshot_stores import open_store
from paramserver.spill import clean_spill
from paramserver.spread import PortRange
from paramserver.tls import TlsConfig
from paramserver.v1 import job_service_pb2

log = logging.getLogger(__name__)

#: The service name grpc.health.v1 reports for the control plane.
HEALTH_SERVICE = "paramserver.v1.JobService"
#: Seconds between two checks that the coordinator answers, and how long one may take.
HEALTH_INTERVAL_S, HEALTH_TIMEOUT_S = 1.0, 3.0

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """How to run the service."""

    host: str = "127.0.0.1"
    """Address the control plane binds."""
    port: int = 50051
    """Control-plane port (0 = pick a free one)."""
    ray_address: str | None = None
    """Ray cluster to join; None = start a local Ray owned by this process."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None = all)."""
    shard_host: str = "127.0.0.1"
    """Address shard actors bind their data ports to ("0.0.0.0" on a real cluster)."""
    grace_s: float = 5.0
    """Seconds in-flight calls get at shutdown."""
    snapshot_dir: str = "snapshots"
    """Where snapshots are written (a local or shared directory every shard can reach)."""
    spill_dir: str = "spill"
    """Where shards over their memory budget keep spill files (local NVMe on each node)."""
    shard_start_timeout_s: float = 120.0
    """How long a CreateJob waits for the cluster to place its shards (RESOURCE_EXHAUSTED after)."""
    name: str = "default"
    """The service's name in its Ray namespace: a front door started with the same name on the same
    cluster reattaches to the running coordinator and its jobs."""
    state_dir: str = "state"
    """Where the coordinator's journal lives (a directory every node that may run it shares)."""
    coordinator_resources: Mapping[str, float] = field(default_factory=dict)
    """Ray resources the coordinator actor asks for, to pin it to nodes that have them (e.g. a custom
    resource only the head or a control node carries); empty = anywhere."""
    keep_jobs_on_exit: bool | None = None
    """Leave the coordinator and the jobs running when the front door stops (None: yes when joined
    to an existing cluster, no when the service started its own local Ray, which stops with it)."""
    auth: AuthConfig | None = None
    """Tenants and their admin tokens: every call then needs a token (None = no credentials:
    anyone who reaches a port may call anything; for loopback and trusted networks only)."""
    tls: TlsConfig | None = None
    """Certificate files of every port, front door and shards (None = plaintext)."""
    shard_port_range: PortRange | None = None
    """Ports the shards' data ports bind (each node's shards take free ones of the range); None =
    any free port."""
    warm_shards: int = 2
    """Spare shard actors the coordinator keeps started (torch loaded), so that a lost shard's
    replacement and a new job's shards serve in a fraction of a cold start; they ask for no CPU or
    GPU and serve jobs whose shards ask for none (the default). 0 = none."""
    placement: str = "spread"
    """How a job's shards are placed over the nodes: "spread" (round-robin over the alive nodes
    that can hold them; see paramserver.spread) or "pack" (Ray's default)."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint (/metrics) with the front door's, the jobs' and every
    shard's metrics; None = no endpoint; 0 = any free port."""
    metrics_host: str | None = None
    """Address the metrics endpoint binds (None = the control plane's `host`)."""
    dashboard: bool = False
    """Start the local Ray with its dashboard (needs the `dashboard` extra: ray[default])."""
    relay_logs: bool = True
    """Relay the coordinator's and the shards' log records into this process's log."""


def exposure_warning(host: str, secured: bool) -> str:
    """What the service warns about when it binds `host` ("" when nothing): no credentials on an
    address other hosts can reach."""
    if secured or host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return ""
    return "WITHOUT credentials: anyone who reaches it can create, read and delete jobs (see --admin-token-file, --tenants)"


class Service:
    """The control-plane server bound to a Cluster."""

    def __init__(self, config: ServiceConfig, owns_ray: bool = False) -> None:
        """`owns_ray`: this process started the local Ray (which stops with it)."""
        self.config = config
        self.owns_ray = owns_ray
        self.cluster: Cluster | None = None
        self.server: aio.Server | None = None
        self.health: Any = None
        self.port = 0
        self._watch: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None
        self.relay: LogRelay | None = None
        self.metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        """ "host:port" of the control plane."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Start serving (Ray must be initialised); return the bound port."""
        report = open_store(self.config.snapshot_dir).clean()  # saves cut short by a crash
        if report.removed:
            log.warning("removed %d leftovers of interrupted snapshots under %s", len(report.removed), self.config.snapshot_dir)
        for q in report.quarantined:
            log.error("snapshot %s lost its manifest: quarantined, not loaded (see quarantine.json beside it)", q)
        removed = clean_spill(Path(self.config.spill_dir))  # files of shards that died with a crash
        if removed:
            log.warning("removed %d spill files left by a previous run under %s", len(removed), self.config.spill_dir)
        self.cluster = Cluster(
            self.config.shard_host,
            self.config.snapshot_dir,
            self.config.spill_dir,
            self.config.shard_start_timeout_s,
            name=self.config.name,
            state_dir=self.config.state_dir,
            coordinator_resources=self.config.coordinator_resources,
            tls=self.config.tls,
            shard_port_range=self.config.shard_port_range,
            placement=self.config.placement,
            warm_shards=self.config.warm_shards,
        )
        await self.cluster.start()
        server = aio.server(options=GRPC_OPTIONS)
        store = open_store(self.config.snapshot_dir)
        gate = FrontDoorGate(self.config.auth, self.cluster.access)
        service = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
        servicer = JobServicer(self.cluster, store, gate)
        if self.config.metrics_port is not None:
            self.metrics = MetricsEndpoint()
            servicer.observe = functools.partial(self.metrics.observe, "JobService")
            tls = self.config.tls
            self.metrics.start(
                self.config.metrics_host or self.config.host,
                self.config.metrics_port,
                self.cluster,
                asyncio.get_running_loop(),
                tls.cert_file if tls is not None else "",
                tls.key_file if tls is not None else "",
            )
            where = self.config.metrics_host or self.config.host
            log.info("metrics on http%s://%s:%d/metrics", "s" if tls else "", where, self.metrics.port)
            if exposure_warning(where, False):
                log.warning("the metrics endpoint on %s needs no credentials: it shows job ids, shard addresses and sizes", where)
        if self.config.relay_logs:
            self.relay = LogRelay(self.cluster)
            self._relay = asyncio.get_running_loop().create_task(self.relay.run())
        add_unary_service(servicer, service, server, gate.guard if gate.secured else None)
        self.health = add_health_and_reflection(server, [service.full_name])
        bind = f"{self.config.host}:{self.config.port}"
        if self.config.tls is not None:
            self.port = server.add_secure_port(bind, self.config.tls.server_credentials())
        else:
            self.port = server.add_insecure_port(bind)
        warning = exposure_warning(self.config.host, self.config.auth is not None)
        if warning:
            log.warning("serving on %s: %s", bind, warning)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await server.start()
        self.server = server
        await self._set_health(True)
        self._watch = asyncio.get_running_loop().create_task(self._watch_coordinator())
        log.info("paramserver serving on %s", self.address)
        return self.port

    async def _set_health(self, serving: bool) -> None:
        await set_serving(self.health, [HEALTH_SERVICE], serving)

    async def _watch_coordinator(self) -> None:
        """Health follows the control plane: NOT_SERVING while the coordinator does not answer
        (it is being restarted, or its node is gone), SERVING again once it does."""
        assert self.cluster is not None
        serving = True
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                ok = await asyncio.wait_for(self.cluster.ping(), HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - any failure to answer is "not serving"
                ok = False
            if ok != serving:
                serving = ok
                log.warning("control plane %s", "serving again" if ok else "not answering: health NOT_SERVING")
                await self._set_health(ok)

    async def stop(self) -> None:
        """NOT_SERVING, stop with a grace period, stop every job's shards (unless the jobs are kept
        for the next front door: see ServiceConfig.keep_jobs_on_exit)."""
        if self._watch is not None:
            self._watch.cancel()
        if self.metrics is not None:
            self.metrics.stop()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.config.grace_s)
        keep = self.config.keep_jobs_on_exit
        if keep is None:
            keep = not self.owns_ray
        if self._relay is not None:
            self._relay.cancel()
            if self.relay is not None:  # what the actors logged since the last pass
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.relay.drain(), 2.0)
        if self.cluster is not None:
            try:
                await self.cluster.close(stop_jobs=not keep)
            except Exception:
                log.exception("while stopping jobs")
            if keep:
                log.info("jobs left running: a front door started with --name %s on this cluster reattaches", self.config.name)
        log.info("paramserver stopped")


def serve(config: ServiceConfig) -> None:
    """Run the service in the foreground until SIGTERM or Ctrl-C."""
    owned = start_ray(config.ray_address, config.num_cpus, dashboard=config.dashboard)

    async def main() -> None:
        service = Service(config, owns_ray=owned)
        await service.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"paramserver listening on {service.address} (Ctrl-C to stop)", flush=True)
        await stop.wait()
        print("paramserver: shutting down", flush=True)
        await service.stop()

    try:
        asyncio.run(main())
    finally:
        if owned:
            stop_ray()


class BackgroundService:
    """The service on a background thread with its own event loop (demo, tests)."""

    def __init__(self, config: ServiceConfig, own_ray: bool = True) -> None:
        self.config = config
        self._owned_ray = start_ray(config.ray_address, config.num_cpus, dashboard=config.dashboard) if own_ray else False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="paramserver", daemon=True)
        self._thread.start()
        self.service = Service(config, owns_ray=self._owned_ray)
        self.run(self.service.start())

    @property
    def address(self) -> str:
        """ "host:port" of the control plane."""
        return self.service.address

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the service's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        """Stop the service, its jobs and (if owned) the local Ray."""
        try:
            self.run(self.service.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if self._owned_ray:
                stop_ray()

    def __enter__(self) -> BackgroundService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
