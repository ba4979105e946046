"""The shard actor's class (plain Python; cluster.py is the only module that makes it a Ray actor).

A ShardHost owns one shard of one job: its state, its step runtime and its
own data-plane gRPC server on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from grpc import aio

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError, Reason
from paramserver.gate import ShardGate
from paramserver.health import add_health_and_reflection, set_serving
from paramserver.jobconfig import JobConfig
from paramserver.manifest import Manifest, ShardEntry
from paramserver.membership import Roster
from paramserver.memory_store import Held, MemoryStore, held_files
from paramserver.placement import Span
from paramserver.rpc import GRPC_OPTIONS
from paramserver.shard import ShardState, Storage
from paramserver.shard_runtime import ShardRuntime, StepReducer
from paramserver.shard_service import SERVICE_NAME, ShardServicer, add_shard_service
from paramserver.shard_types import Restore, ShardStatus, fault_from_env
from paramserver.snapshot_store import SnapshotReader, SnapshotRef, SnapshotStore
from paramserver.snapshot_stores import open_store
from paramserver.spread import PortRange, bind_in_range
from paramserver.telemetry import Telemetry, resident_set_bytes
from paramserver.tls import TlsConfig

log = logging.getLogger(__name__)

#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep 1 MiB message buffers on the heap instead of fresh mmaps (glibc only).

    Every chunk of a stream is a ~1 MiB allocation; with glibc's defaults each one is a new
    mmap that is page-faulted in and unmapped again, which costs the shard a large share of
    its stream throughput (bench/README.md). Returns False where mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1)
    except (OSError, AttributeError):
        return False


#: The data port's server options: no BDP probing, so a stream's HTTP/2 receive window stays at
#: its default and gRPC holds a few MiB of each push before the shard reads it, instead of most of
#: it (the window grows with measured bandwidth otherwise): a shard's memory at W pushing workers
#: stays within the README's bound (bench/bench_fanin.py: 137 -> 81 buffers of the shard at W=64).
SHARD_GRPC_OPTIONS: list[tuple[str, Any]] = [*GRPC_OPTIONS, ("grpc.http2.bdp_probe", 0)]


class ShardHost:
    """One shard of one job, with its own gRPC port."""

    def __init__(
        self,
        job_id: str,
        config: JobConfig,
        index: int,
        spans: list[Span],
        reducer: StepReducer,
        bind_host: str = "127.0.0.1",
        restore: Restore | None = None,
        spill_dir: str = "spill",
        roster: Roster | None = None,
        generation: int = 0,
        tls: TlsConfig | None = None,
        port_range: PortRange | None = None,
    ) -> None:
        """`tls`: serve the data port with TLS (mutual when it has a client CA); `port_range`:
        bind a port of that range (else any free port)."""
        self.job_id = job_id
        self.tls = tls
        self.port_range = port_range
        self.config = config
        self.index = index
        self.spans = spans
        self.reducer = reducer
        self.bind_host = bind_host
        self.restore = restore
        self.roster = roster
        self.generation = generation
        self.spill_dir = Path(spill_dir) / job_id
        self.address = ""
        self._server: aio.Server | None = None
        self._servicer: ShardServicer | None = None
        self._health: Any = None
        self.runtime: ShardRuntime | None = None
        self._stores: dict[str, SnapshotStore] = {}
        self.telemetry = Telemetry()
        """This shard's metrics and log records, for the front door (see telemetry())."""

    def store(self, url: str) -> SnapshotStore:
        """The snapshot store at `url` (opened once)."""
        if url not in self._stores:
            self._stores[url] = open_store(url)
        return self._stores[url]

    def device(self) -> torch.device:
        """CUDA when this actor was given a GPU, else CPU."""
        if self.config.shard_num_gpus > 0 and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def advertise_host(self) -> str:
        """The host part of the address workers use to reach this shard."""
        if self.bind_host in ("0.0.0.0", "::", "[::]"):
            return socket.gethostbyname(socket.gethostname())
        return self.bind_host

    def _load(self) -> tuple[ShardState, str]:
        """A fresh state, restored if asked to; and the ledger of answered pushes it carried."""
        state = ShardState(
            self.config,
            self.index,
            self.spans,
            self.device(),
            Storage(self.config.shard_memory_budget_bytes, self.spill_dir, device_budget=self.config.shard_device_memory_budget_bytes),
        )
        if state.spilled:
            log.info("job %s shard %d: state over its budget, spilling under %s", self.job_id, self.index, self.spill_dir)
        else:  # a spilled shard keeps glibc's trimming: its budget counts what the process holds
            tune_malloc()
        ledger = "[]"
        if self.restore is not None:
            r = self.restore
            ref = SnapshotRef(r.job_id, r.name)
            if r.replica:  # a replica held in memory: its bytes came with the restore
                manifest = Manifest.parse(r.manifest_json, MemoryStore().path(ref))
                store: SnapshotStore = MemoryStore.holding(ref, manifest, held_files(r.replica))
            else:
                store = self.store(r.store)
            reader = SnapshotReader(store, ref, store.read_manifest(ref), only=set(r.replica) if r.replica else None)
            try:
                state.restore(reader, r.version, r.applied)
                ledger = reader.metadata(0).get(names.META_LEDGER, "[]")
            finally:
                reader.close()
                if r.replica:  # loaded: its files (the replica's memory) are not held on to here
                    self.restore = dataclasses.replace(r, replica={})
        return state, ledger

    async def start(self) -> str:
        """Build the state, start the data-plane server; return its "host:port"."""
        self.telemetry.base = (("job_id", self.job_id), ("shard", str(self.index)), ("node", self.node()))
        self.telemetry.logs.context = {"job": self.job_id, "shard": self.index, "node": self.node()}
        state, ledger = self._load()
        self.runtime = ShardRuntime(state, self.reducer, self.roster, self.generation, self.telemetry)
        self.runtime.load_ledger(json.loads(ledger))
        server = aio.server(options=SHARD_GRPC_OPTIONS, interceptors=[ShardGate(self.job_id, self._roster, SERVICE_NAME)])
        self._servicer = ShardServicer(self.job_id, self.runtime, telemetry=self.telemetry)
        add_shard_service(self._servicer, server)
        self._health = add_health_and_reflection(server, [SERVICE_NAME])
        host = self.bind_host if ":" not in self.bind_host or self.bind_host.startswith("[") else f"[{self.bind_host}]"
        tls = self.tls

        def bind(port: int) -> int:
            if tls is not None:
                return server.add_secure_port(f"{host}:{port}", tls.server_credentials())
            return server.add_insecure_port(f"{host}:{port}")

        if self.port_range is None:
            port = bind(0)
        else:
            try:
                port = bind_in_range(bind, self.port_range)
            except OSError as exc:
                raise ParamServerError(
                    "RESOURCE_EXHAUSTED",
                    Reason.SHARDS_UNSCHEDULABLE,
                    f"job {self.job_id!r} shard {self.index} on {self.advertise_host()}: {exc}; widen serve --shard-port-range",
                    {"field": "shard_port_range"},
                ) from None
        await server.start()
        await set_serving(self._health, [SERVICE_NAME], True)
        self._server = server
        self.address = f"{self.advertise_host()}:{port}"
        log.info("job %s shard %d serving %s on %s", self.job_id, self.index, self.address, state.device)
        return self.address

    def _roster(self) -> Roster:
        """The current roster (its tokens are what the data port accepts)."""
        assert self.runtime is not None
        return self.runtime.roster

    async def reset(self, restore: Restore, roster: Roster | None, generation: int) -> str:
        """Restore in place (a recovery that keeps this actor and its port): the current state is
        closed (waiting calls answer UNAVAILABLE), then a new one is loaded from `restore` under
        `generation`, whose calls an older generation's workers are told about (JOB_ROLLED_BACK)."""
        old = self.runtime
        self.restore, self.roster, self.generation = restore, roster, generation
        if old is not None:
            await old.close()
        state, ledger = await asyncio.to_thread(self._load)
        runtime = ShardRuntime(state, self.reducer, roster, generation, self.telemetry)
        runtime.load_ledger(json.loads(ledger))
        self.runtime = runtime
        if self._servicer is not None:
            self._servicer.runtime = runtime
        log.info("job %s shard %d restored in place at version %d (generation %d)", self.job_id, self.index, state.version, generation)
        return self.address

    async def status(self) -> ShardStatus:
        """Version, initialisation state and memory."""
        assert self.runtime is not None
        s = self.runtime.state
        return ShardStatus(
            self.index,
            self.address,
            s.version,
            s.initialized,
            s.applied,
            str(s.device),
            s.memory(),
            self.runtime.last_seen(),
            self.node(),
            tuple(self.runtime.pushed()),
        )

    def node(self) -> str:
        """The cluster node this shard runs on ("" outside a cluster)."""
        return ""

    async def telemetry_export(self, log_since: int = 0) -> dict[str, Any]:
        """This shard's metric series (gauges refreshed now), its optimizer-health sums, the
        open step's pushed workers and members, and its log records after `log_since`."""
        t = self.telemetry
        out: dict[str, Any] = {"job": self.job_id, "logs": t.logs.since(log_since), "log_ring": t.logs.instance}
        if self.runtime is not None:
            state, runtime = self.runtime.state, self.runtime
            mem = state.memory()
            t.set("paramserver_shard_version", state.version)
            for kind, value in (("resident", mem.resident_bytes), ("spilled", mem.spilled_bytes), ("buffer", mem.buffer_bytes)):
                t.set("paramserver_shard_memory_bytes", value, kind=kind)
            t.set("paramserver_shard_memory_bytes", resident_set_bytes(), kind="rss")
            t.set("paramserver_shard_spill_read_bytes", mem.read_bytes)
            t.set("paramserver_shard_spill_write_bytes", mem.written_bytes)
            if self._servicer is not None:
                t.set("paramserver_shard_streams", self._servicer.gate.open)
            out["step"] = state.version
            out["pushed"] = runtime.pushed()
            out["members"] = sorted(w for w, _ in runtime.roster.members)
        out["samples"] = t.export()
        names = [info[0] for info in self.config.group_infos()]
        out["health"] = {names[g] if g < len(names) else str(g): v for g, v in t.extra.get("health", {}).items()}
        return out

    async def set_roster(self, roster: Roster) -> None:
        """Adopt the job's newer membership (see ShardRuntime.set_roster)."""
        assert self.runtime is not None
        await self.runtime.set_roster(roster)

    async def tensors(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and optimizer state (inspection and tests)."""
        assert self.runtime is not None
        state = self.runtime.state
        if not state.initialized:
            return {}
        with state.lock:
            return {k: v.numpy() for k, v in state.snapshot_tensors().items()}

    async def memory_probe(self, reset_peak: bool = False) -> dict[str, int]:
        """This process's resident memory now and its peak ("rss", "peak"), in bytes, from
        /proc/self/status; reset_peak first clears the peak (Linux clear_refs). Tests and tools."""
        if reset_peak:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        fields = {}
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
        return fields

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        """Write this shard's part of snapshot (job_id, name) at `version` into the store at `store`."""
        assert self.runtime is not None
        ref = SnapshotRef(job_id, name)
        return await self.runtime.snapshot(self.store(store), ref, version, fault_from_env(self.job_id, self.index))

    async def replicate(self, job_id: str, name: str, version: int) -> tuple[ShardEntry, Held]:
        """This shard's state at `version` as one snapshot file in memory: its entry and its bytes
        (a replica; the same pause and the same checks as a snapshot): a resident shard's as its
        arrays (ShardRuntime.replicate), a spilled shard's serialised as its snapshot file."""
        assert self.runtime is not None
        if not self.runtime.state.spilled:
            return await self.runtime.replicate(version)
        store, ref = MemoryStore(), SnapshotRef(job_id, name)
        entry = await self.runtime.snapshot(store, ref, version)
        return entry, store.files(ref)[entry.file]

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving; waiters get UNAVAILABLE."""
        if self.runtime is not None:
            await self.runtime.close()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
