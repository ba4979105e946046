"""An in-process service: the real Coordinator, ShardHosts and JobServicer on one event loop, no Ray.

* :class:`InProcessLauncher` implements ``coordinator.ShardLauncher``: it builds :class:`ShardHost`
  objects directly (each serves its own grpc.aio data port on loopback), with a reducer that calls
  ``Coordinator.reduce_step`` directly.
* :class:`HostHandle` implements ``coordinator.ShardHandle`` by calling the host's methods.
* :class:`CoordinatorFacade` has the async methods of ``paramserver.cluster.Cluster`` that
  ``JobServicer`` calls, forwarding to the coordinator; the real JobServicer serves it on port 0,
  so the real client library (AsyncJobClient, AsyncWorker.join) drives the whole thing.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from grpc import aio

from paramserver.access import AuthConfig, Quota
from paramserver.cluster import Cluster
from paramserver.coordinator import Coordinator, JobView, ShardHandle
from paramserver.errors import ParamServerError, Reason
from paramserver.gate import FrontDoorGate
from paramserver.health import add_health_and_reflection
from paramserver.job_service import JobServicer
from paramserver.jobconfig import JobConfig
from paramserver.manifest import ShardEntry
from paramserver.membership import Roster
from paramserver.memory_store import Held
from paramserver.placement import Span
from paramserver.rpc import GRPC_OPTIONS, add_unary_service
from paramserver.shard_host import ShardHost
from paramserver.shard_types import Restore, ShardStatus
from paramserver.steps import Decision, Redo, ShardStats
from paramserver.tls import TlsConfig
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client.aio import AsyncJobClient, AsyncWorker
from paramserver_client.retry import RetryPolicy

#: Deadlines of the test clients: a stuck call fails the test in seconds, not minutes.
TIMEOUT_S = 15.0
#: No retries in tests: an UNAVAILABLE is a failure to see, not to hide.
NO_RETRY = RetryPolicy(attempts=1)


class DirectReducer:
    """A shard's StepReducer that calls the coordinator in the same event loop."""

    def __init__(self, coordinator: Coordinator, job_id: str) -> None:
        self.coordinator = coordinator
        self.job_id = job_id
        self.calls: list[int] = []

    async def reduce(self, stats: ShardStats, step: int) -> Decision | Redo:
        """Report this shard's stats; wait for the shared decision."""
        self.calls.append(step)
        return await self.coordinator.reduce_step(self.job_id, step, stats)


class HostHandle:
    """The coordinator's handle on an in-process ShardHost."""

    def __init__(self, host: ShardHost, name: str = "", launcher: InProcessLauncher | None = None) -> None:
        self.host = host
        self.address = host.address
        self.name = name
        self.launcher = launcher
        self.dead = False
        """Set by a test: the host answers as an actor that died (the coordinator recovers it)."""

    async def status(self) -> ShardStatus:
        """The host's status (as a Ray handle of a dead actor answers, once `dead` is set)."""
        if self.dead:
            raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "shard actor died", {"actor": "dead"})
        return await self.host.status()

    async def telemetry(self, log_since: int = 0) -> dict[str, Any]:
        return await self.host.telemetry_export(log_since)

    async def set_roster(self, roster: Roster) -> None:
        """The host adopts the job's membership."""
        await self.host.set_roster(roster)

    async def stop(self) -> None:
        """Stop the host (no grace: nothing outlives a test)."""
        await self.host.stop(grace=0)

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        """The host's part of a snapshot."""
        return await self.host.snapshot(store, job_id, name, version)

    async def reset(self, restore: Restore, roster: Roster | None, generation: int) -> str:
        """Restore the host in place."""
        if self.launcher is not None:
            self.launcher.check_replica(restore)
        return await self.host.reset(restore, roster, generation)

    async def replicate(self, job_id: str, name: str, version: int) -> tuple[ShardEntry, Held]:
        """The host's state as a file in memory, copied as Ray's transfer copies it (the host
        reuses its replica buffers)."""
        return cast(tuple[ShardEntry, Held], pickle.loads(pickle.dumps(await self.host.replicate(job_id, name, version))))

    async def tensors(self) -> dict[str, np.ndarray]:
        """Copies of the host's parameters and optimizer state."""
        return await self.host.tensors()


class InProcessLauncher:
    """Starts every shard as a ShardHost in this process (see the module docstring)."""

    def __init__(self, spill_dir: Path, tls: TlsConfig | None = None) -> None:
        self.spill_dir = spill_dir
        self.tls = tls
        self.coordinator: Coordinator | None = None
        self.hosts: list[ShardHost] = []
        """Every host ever started (teardown checks that each was stopped)."""
        self.hold: asyncio.Event | None = None
        """Set by a test: a relaunch of lost shards waits for it (the job stays RECOVERING)."""
        self.replica_lost = False
        """Set by a test: a restore from a replica fails as on Ray when the replica's objects are
        gone (FAILED_PRECONDITION, replica=lost)."""

    def check_replica(self, restore: Restore | None) -> None:
        """Raise what a Ray shard raises for a lost replica, when the test set `replica_lost`."""
        if self.replica_lost and restore is not None and restore.replica:
            raise ParamServerError("FAILED_PRECONDITION", Reason.SNAPSHOT_NOT_FOUND, "the replica is lost", {"replica": "lost"})

    async def launch(self, job_id: str, config: JobConfig, plan: Sequence[list[Span]], restore: Restore | None = None,
                     roster: Roster | None = None, generation: int = 0,
                     only: Sequence[int] | None = None) -> list[ShardHandle]:  # fmt: skip
        """One started host per plan entry; on a failure the ones already started are stopped."""
        assert self.coordinator is not None, "set launcher.coordinator before creating jobs"
        if only is not None and self.hold is not None:
            await self.hold.wait()
        self.check_replica(restore)
        started: list[ShardHost] = []
        try:
            for i in range(len(plan)) if only is None else only:
                spans = plan[i]
                host = ShardHost(job_id, config, i, list(spans), DirectReducer(self.coordinator, job_id), "127.0.0.1", restore,
                                 str(self.spill_dir), roster, generation, self.tls)  # fmt: skip
                self.hosts.append(host)
                await host.start()
                started.append(host)
        except BaseException:
            for host in started:
                await host.stop(grace=0)
            raise
        return [HostHandle(h, f"{job_id}-{generation}-{h.index}", self) for h in started]

    async def reattach(self, job_id: str, names: Sequence[str]) -> list[ShardHandle | None]:
        """In-process hosts never outlive their coordinator: nothing to reattach to."""
        return [None for _ in names]

    async def cleanup(self, job_id: str, keep: Sequence[str]) -> int:
        """Nothing is left behind in-process."""
        return 0

    async def close(self) -> None:
        """In-process hosts keep no spares."""


class CoordinatorFacade:
    """What JobServicer needs of ``paramserver.cluster.Cluster``, forwarding to a Coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def create_job(self, request_id: str, job_id: str, config: JobConfig | None, restore_from: str = "",
                         overrides: dict[str, Any] | None = None, resume: bool = False, tenant: str = "",
                         quota: Quota | None = None, secured: bool = False) -> JobView:  # fmt: skip
        return await self.coordinator.create_job(request_id, job_id, config, restore_from, overrides, resume, tenant, quota, secured)

    async def access(self, job_id: str) -> tuple[str, tuple[tuple[str, float], ...]]:
        return await self.coordinator.access(job_id)

    async def add_token(self, job_id: str, digest: str) -> None:
        await self.coordinator.add_token(job_id, digest)

    async def rotate_token(self, request_id: str, job_id: str, digest: str, previous_valid_s: float) -> float:
        return await self.coordinator.rotate_token(request_id, job_id, digest, previous_valid_s)

    async def rollback_job(self, request_id: str, job_id: str, snapshot: str, expected_generation: int | None = None) -> JobView:
        return await self.coordinator.rollback_job(request_id, job_id, snapshot, expected_generation)

    async def create_snapshot(self, request_id: str, job_id: str) -> dict[str, Any]:
        return await self.coordinator.create_snapshot(request_id, job_id)

    async def list_snapshots(self, job_id: str) -> list[dict[str, Any]]:
        return await self.coordinator.list_snapshots(job_id)

    async def get_job(self, job_id: str) -> JobView:
        return await self.coordinator.get_job(job_id)

    async def list_jobs(self) -> list[JobView]:
        return await self.coordinator.list_jobs()

    async def join_job(self, request_id: str, job_id: str, worker_name: str) -> tuple[int, JobView, bool, int, float]:
        return await self.coordinator.join_job(request_id, job_id, worker_name)

    async def leave_job(self, request_id: str, job_id: str, worker_id: int, lease: int = 0) -> None:
        await self.coordinator.leave_job(request_id, job_id, worker_id, lease)

    async def heartbeat(self, job_id: str, worker_id: int, lease: int) -> tuple[int, str, int]:
        return await self.coordinator.heartbeat(job_id, worker_id, lease)

    async def delete_job(self, request_id: str, job_id: str) -> None:
        await self.coordinator.delete_job(request_id, job_id)


class InProcessService:
    """The front door (real JobServicer) over a real Coordinator whose shards are in-process hosts."""

    def __init__(self, root: Path, auth: AuthConfig | None = None, tls: TlsConfig | None = None) -> None:
        """`auth` and `tls` as in ServiceConfig (front door and shards)."""
        self.auth, self.tls = auth, tls
        self.snapshot_dir = root / "snapshots"
        self.launcher = InProcessLauncher(root / "spill", tls)
        self.coordinator = Coordinator(self.launcher, str(self.snapshot_dir))
        self.launcher.coordinator = self.coordinator
        self.address = ""
        self._server: aio.Server | None = None
        self._clients: list[AsyncJobClient] = []
        self._workers: list[AsyncWorker] = []

    async def start(self) -> str:
        """Serve JobService on a free loopback port; its "host:port"."""
        server = aio.server(options=GRPC_OPTIONS)
        facade = CoordinatorFacade(self.coordinator)
        gate = FrontDoorGate(self.auth, facade.access)
        add_unary_service(
            JobServicer(cast(Cluster, facade), self.coordinator.store, gate),
            jpb.DESCRIPTOR.services_by_name["JobService"],
            server,
            gate.guard if gate.secured else None,
        )
        self.health = add_health_and_reflection(server, [jpb.DESCRIPTOR.services_by_name["JobService"].full_name])
        if self.tls is not None:
            port = server.add_secure_port("127.0.0.1:0", self.tls.server_credentials())
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def close(self) -> None:
        """Close every client, delete every job (stopping its hosts), stop the front door; then
        check that no host is left serving."""
        for w in self._workers:
            await w.close()
        for c in self._clients:
            await c.close()
        try:
            await self.coordinator.shutdown()
        finally:
            if self._server is not None:
                await self._server.stop(0)
                self._server = None
            left = [h for h in self.launcher.hosts if h._server is not None]  # no public "serving?" on ShardHost
            for h in left:
                await h.stop(grace=0)
        assert not left, f"{len(left)} shard hosts were still serving after every job was deleted"

    # ---- clients ---------------------------------------------------------------------------

    def jobs(self, **credentials: Any) -> AsyncJobClient:
        """A control-plane client of the front door (closed at teardown); `credentials`: token=,
        credentials= (see AsyncJobClient)."""
        client = AsyncJobClient(self.address, timeout=TIMEOUT_S, retry=NO_RETRY, **credentials)
        self._clients.append(client)
        return client

    async def create(self, shapes: Sequence[tuple[str, Sequence[int]]], job_id: str, **settings: Any) -> jpb.Job:
        """Create a job through the front door."""
        return await self.jobs().create_job(shapes, job_id=job_id, **settings)

    async def join(self, job_id: str, n: int, prefix: str = "w") -> list[AsyncWorker]:
        """`n` workers joined through the front door, sorted by worker id (closed at teardown)."""
        workers = [await self.worker(job_id, f"{prefix}-{k}") for k in range(n)]
        return sorted(workers, key=lambda w: w.worker_id)

    async def worker(self, job_id: str, name: str = "", **kwargs: Any) -> AsyncWorker:
        """One worker joined through the front door (closed at teardown)."""
        kwargs = {"timeout": TIMEOUT_S, "pull_timeout": TIMEOUT_S, "retry": NO_RETRY, **kwargs}
        w = await AsyncWorker.join(self.address, job_id, name, **kwargs)
        self._workers.append(w)
        return w

    def adopt(self, worker: AsyncWorker) -> AsyncWorker:
        """Close `worker` at teardown."""
        self._workers.append(worker)
        return worker

    # ---- inspection ------------------------------------------------------------------------

    async def handles(self, job_id: str) -> list[HostHandle]:
        """The job's shard handles, in shard order."""
        return cast(list[HostHandle], await self.coordinator.shard_handles(job_id))

    async def tensors(self, job_id: str) -> list[dict[str, np.ndarray]]:
        """Every shard's parameters and optimizer state, read from the hosts."""
        return [await h.tensors() for h in await self.handles(job_id)]


def assert_same_tensors(before: list[dict[str, np.ndarray]], after: list[dict[str, np.ndarray]]) -> None:
    """Bit-for-bit equality of two reads of every shard's tensors."""
    assert len(before) == len(after)
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        assert b.keys() == a.keys(), f"shard {i}: {sorted(b)} != {sorted(a)}"
        for k in b:
            assert np.array_equal(b[k], a[k], equal_nan=True), f"shard {i}: {k} changed"


def torch_adamw(shapes: Sequence[tuple[str, Sequence[int]]], p0: np.ndarray, hyper: dict[str, Any],
                grads: Sequence[Sequence[tuple[np.ndarray, int]]]) -> np.ndarray:  # fmt: skip
    """The reference: torch.optim.AdamW (fused, one thread) stepped on the full-batch gradient
    (sum of the workers' summed-loss gradients / total loss terms) of each step in `grads`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, off = [], 0
        for _, shape in shapes:
            n = int(np.prod(shape))
            params.append(torch.tensor(p0[off : off + n].reshape(tuple(shape)), requires_grad=True))
            off += n
        opt = torch.optim.AdamW(params, **hyper, fused=True)
        for contributions in grads:
            total = torch.from_numpy(contributions[0][0]).clone()
            for g, _ in contributions[1:]:
                total.add_(torch.from_numpy(g))
            full = total / sum(n for _, n in contributions)
            off = 0
            for p in params:
                p.grad = full[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    finally:
        torch.set_num_threads(threads)
