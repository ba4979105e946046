"""Everything that touches Ray: the only module that imports it or applies ``ray.remote``.

* :func:`start_ray` / :func:`stop_ray`: join a cluster, or start a local Ray that we own.
* :class:`Cluster`: the front door's facade over the coordinator actor; Ray
  errors become :class:`ParamServerError` (UNAVAILABLE when an actor is gone).
* The launcher and reducer that the coordinator and shards receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from paramserver.access import Quota
from paramserver.allocator import keep_freed_memory
from paramserver.coordinator import Coordinator, JobView
from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig
from paramserver.manifest import ShardEntry
from paramserver.membership import Roster
from paramserver.memory_store import Held
from paramserver.placement import Span
from paramserver.reaper import start_reaper
from paramserver.shard_host import ShardHost
from paramserver.shard_types import Restore, ShardStatus, restore_for
from paramserver.snapshot_names import shard_file
from paramserver.spread import POLICIES, Node, PortRange, spread
from paramserver.steps import Decision, Redo, ShardStats
from paramserver.telemetry import attach
from paramserver.tls import TlsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variable: Ray address to join when --address is not given.
RAY_ADDRESS_ENV = "PARAMSERVER_RAY_ADDRESS"
#: Name of the coordinator actor in the Ray namespace of the service.
COORDINATOR_NAME = "paramserver-coordinator"
#: Default bound on starting a job's shards (they wait for cluster resources meanwhile), seconds.
SHARD_START_TIMEOUT_S = 120.0
#: How long a shard gets to stop cleanly before it is killed, seconds.
STOP_TIMEOUT_S = 10.0
#: The resource Ray gives only the head node.
HEAD_RESOURCE = "node:__internal_head__"
#: Warm spare shard actors each coordinator keeps by default (see RayShardLauncher).
WARM_SHARDS = 2
#: Seconds after a launch before the spares it took are replaced (a later launch postpones it):
#: the new or recovered shards' restore and first steps get the cores first (a spare starts by
#: importing torch, seconds of one core).
REFILL_DELAY_S = 5.0
#: How long the coordinator waits for a replica file to reach its node (it keeps the handle either way).
REPLICA_FETCH_TIMEOUT_S = 60.0
#: Bytes of Ray's "memory" resource an actor placed by a soft node affinity asks for: Ray places an
#: actor that asks for no resource at all on a random node whatever its affinity (the shards and
#: the coordinator ask for 0 CPUs by default), so the request must not be empty.
AFFINITY_MEMORY = 1


class _RayShardHost(ShardHost):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        keep_freed_memory()  # this process is the shard's: its data plane reuses warm pages
        if args or kwargs:
            self.adopt(*args, **kwargs)
        # else: a warm spare (see RayShardLauncher): torch and the shard's code are loaded, no job yet

    def adopt(self, *args: Any, **kwargs: Any) -> None:
        """Become one shard of a job (ShardHost's arguments)."""
        ShardHost.__init__(self, *args, **kwargs)
        attach(self.telemetry.logs)  # this process's records, for the front door's log

    def adopted(self) -> str:
        """The job whose shard this actor became ("" for an idle spare; a spare that became a
        shard keeps its spare's name)."""
        return str(getattr(self, "job_id", ""))

    async def adopt_and_start(self, *args: Any, **kwargs: Any) -> str:
        """A warm spare becomes a shard of a job and serves: its "host:port"."""
        self.adopt(*args, **kwargs)
        return await self.start()

    async def start(self) -> str:
        self.restore = await _resolved(self.restore)
        return await super().start()

    async def reset(self, restore: Restore, roster: Roster | None, generation: int) -> str:
        resolved = await _resolved(restore)
        assert resolved is not None
        return await super().reset(resolved, roster, generation)

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def advertise_host(self) -> str:
        if self.bind_host in ("0.0.0.0", "::", "[::]"):
            return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        return self.bind_host


async def _resolved(restore: Restore | None) -> Restore | None:
    """`restore` with the replica files it names by ObjectRef fetched (mapped from the object
    store, not copied). FAILED_PRECONDITION with metadata replica=lost when one is gone (its
    node and every copy, or its owner, the coordinator): the caller restores from a snapshot."""
    if restore is None or not any(isinstance(v, ray.ObjectRef) for v in restore.replica.values()):
        return restore
    names = list(restore.replica)
    try:
        values = await asyncio.gather(*(_fetched(restore.replica[n]) for n in names))
    except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.RayActorError) as exc:
        raise ParamServerError(
            "FAILED_PRECONDITION",
            Reason.SNAPSHOT_NOT_FOUND,
            f"the replica at version {restore.version} is lost ({type(exc).__name__})",
            {"replica": "lost"},
        ) from None
    return dataclasses.replace(restore, replica=dict(zip(names, values, strict=True)))


async def _fetched(value: object) -> object:
    return await value if isinstance(value, ray.ObjectRef) else value


class _RayCoordinator(Coordinator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.telemetry.logs.context = {"source": "coordinator", "node": str(ray.get_runtime_context().get_node_id())}
        attach(self.telemetry.logs)

    async def node(self) -> str:
        """The cluster node the coordinator runs on (tests and tools)."""
        return str(ray.get_runtime_context().get_node_id())


# Typed as Any: actor handles are dynamic proxies.
ShardActor: Any = ray.remote(_RayShardHost)
CoordinatorActor: Any = ray.remote(_RayCoordinator)


async def _call(ref: Awaitable[T], what: str) -> T:
    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ParamServerError):
            raise cause from None
        raise ParamServerError("INTERNAL", Reason.INTERNAL_ERROR, f"{what}: {cause!r}") from exc
    except ray.exceptions.ActorUnavailableError as exc:  # restarting, or a network blip: it may come back
        raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, f"{what}: actor unavailable ({exc})") from exc
    except ray.exceptions.RayActorError as exc:  # dead for good (killed, or its node is gone)
        raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, f"{what}: actor died ({exc})", {"actor": "dead"}) from exc


class RayStepReducer:
    """A shard's link to the coordinator's per-step reduction (picklable). When the coordinator
    actor is gone for good, it looks it up again by name: a coordinator started anew (a restarted
    front door) takes over the job."""

    def __init__(self, coordinator: Any, job_id: str, coordinator_name: str = "") -> None:
        self.coordinator = coordinator
        self.job_id = job_id
        self.coordinator_name = coordinator_name

    async def reduce(self, stats: ShardStats, step: int) -> Decision | Redo:
        """Report stats, wait for the decision."""
        try:
            result: Decision | Redo = await _call(self.coordinator.reduce_step.remote(self.job_id, step, stats), "reduce_step")
        except ParamServerError as exc:
            if exc.metadata.get("actor") == "dead" and self.coordinator_name:
                with contextlib.suppress(ValueError):  # not there (yet): the caller retries
                    self.coordinator = ray.get_actor(self.coordinator_name)
            raise
        return result


class RayShardHandle:
    """The coordinator's handle on one shard actor."""

    def __init__(self, actor: Any, address: str, name: str = "") -> None:
        self.actor = actor
        self.address = address
        self.name = name

    async def status(self) -> ShardStatus:
        """The shard's status."""
        result: ShardStatus = await _call(self.actor.status.remote(), "shard status")
        return result

    async def set_roster(self, roster: Roster) -> None:
        """Make the shard adopt the job's membership."""
        await _call(self.actor.set_roster.remote(roster), "shard set_roster")

    async def telemetry(self, log_since: int = 0) -> dict[str, Any]:
        """The shard's metrics and log records (see ShardHost.telemetry_export)."""
        result: dict[str, Any] = await _call(self.actor.telemetry_export.remote(log_since), "shard telemetry")
        return result

    async def tensors(self) -> dict[str, np.ndarray]:
        """Copies of the shard's parameters and state."""
        result: dict[str, np.ndarray] = await _call(self.actor.tensors.remote(), "shard tensors")
        return result

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        """Write the shard's part of a snapshot."""
        result: ShardEntry = await _call(self.actor.snapshot.remote(store, job_id, name, version), "shard snapshot")
        return result

    async def reset(self, restore: Restore, roster: Roster | None, generation: int) -> str:
        """Restore the shard in place (see ShardHost.reset)."""
        result: str = await _call(self.actor.reset.remote(restore, roster, generation), "shard reset")
        return result

    async def replicate(self, job_id: str, name: str, version: int) -> tuple[ShardEntry, Held | object]:
        """The shard's state at `version` as one snapshot file in memory: its entry, and a handle
        on the file (an ObjectRef owned by this process). The file stays in Ray's object store,
        copied to this process's node but never mapped into it (mapping it costs more than the
        shard's copy); the shard that restores from it resolves it (`_RayShardHost._resolved`)."""
        entry_ref, file_ref = self.actor.replicate.options(num_returns=2).remote(job_id, name, version)
        entry: ShardEntry = await _call(entry_ref, "shard replicate")
        await asyncio.to_thread(ray.wait, [file_ref], num_returns=1, timeout=REPLICA_FETCH_TIMEOUT_S, fetch_local=True)  # here too
        return entry, file_ref

    async def memory_probe(self, reset_peak: bool = False) -> dict[str, int]:
        """The shard process's resident memory now and at its peak (see ShardHost.memory_probe)."""
        result: dict[str, int] = await _call(self.actor.memory_probe.remote(reset_peak), "shard memory probe")
        return result

    async def stop(self) -> None:
        """Stop serving (at most STOP_TIMEOUT_S: a hung actor is not waited for) and kill the actor."""
        try:
            await asyncio.wait_for(self.actor.stop.remote(), STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - already gone, or hung: it is killed anyway
            pass
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)


@dataclasses.dataclass
class _Spare:
    actor: Any
    name: str
    node: str


class RayShardLauncher:
    """Starts shard actors (runs inside the coordinator actor)."""

    def __init__(
        self,
        bind_host: str = "127.0.0.1",
        spill_dir: str = "spill",
        start_timeout_s: float = SHARD_START_TIMEOUT_S,
        coordinator_name: str = "",
        tls: TlsConfig | None = None,
        port_range: PortRange | None = None,
        placement: str = "spread",
        warm: int = WARM_SHARDS,
    ) -> None:
        """`port_range`: the shards' data ports come from it; `placement`: "spread" or "pack"
        (see paramserver.spread); `warm`: spare shard actors kept started (0 = none)."""
        if placement not in POLICIES:
            raise ValueError(f"placement {placement!r}: expected one of {', '.join(POLICIES)}")
        self.tls = tls
        self.port_range = port_range
        self.placement = placement
        self._jobs_placed = 0  # each job's round-robin starts one node further along
        self.bind_host = bind_host
        self.spill_dir = spill_dir
        self.start_timeout_s = start_timeout_s
        self.coordinator_name = coordinator_name
        self.warm = max(int(warm), 0)
        self._spares: list[_Spare] = []
        self._refill: asyncio.Task[None] | None = None
        self._refill_at = 0.0  # the event loop's time from which the refill may start
        self._swept = False

    def __getstate__(self) -> dict[str, Any]:
        # The launcher travels to the coordinator actor; its pool starts empty there.
        return {**self.__dict__, "_spares": [], "_refill": None, "_swept": False}

    async def launch(
        self,
        job_id: str,
        config: JobConfig,
        plan: Sequence[list[Span]],
        restore: Restore | None = None,
        roster: Roster | None = None,
        generation: int = 0,
        only: Sequence[int] | None = None,
    ) -> list[RayShardHandle]:
        """One actor per shard (or per index of `only`), each serving its own port.
        RESOURCE_EXHAUSTED (SHARDS_UNSCHEDULABLE) at once when no node of the cluster could ever
        hold them, or when they are not all placed within the start timeout (the cluster is busy)."""
        indices = list(range(len(plan))) if only is None else list(only)
        await asyncio.to_thread(check_fits, config, len(indices))
        me = ray.get_runtime_context().current_actor
        reducer = RayStepReducer(me, job_id, self.coordinator_name)
        names = [f"{shard_prefix(job_id)}{i}-g{generation}-{uuid.uuid4().hex[:6]}" for i in indices]
        where = await asyncio.to_thread(self._spread, config, indices)
        actors: list[Any] = [None] * len(indices)

        async def start(k: int, i: int) -> str:
            args = (job_id, config, i, list(plan[i]), reducer, self.bind_host, restore_for(restore, i, shard_file), self.spill_dir,
                    roster, generation, self.tls, self.port_range)  # fmt: skip
            spare = self._take_spare(config, where.get(i))
            if spare is not None:  # torch already loaded: it serves in a fraction of a cold start
                actors[k] = spare.actor
                try:
                    address: str = await _call(spare.actor.adopt_and_start.remote(*args), "shard start")
                    names[k] = spare.name
                    return address
                except ParamServerError as exc:
                    if exc.metadata.get("actor") != "dead":
                        raise
                    log.warning("job %s: a warm spare died before it served (%s); starting shard %d cold", job_id, exc.message, i)
            actors[k] = ShardActor.options(
                num_cpus=config.shard_num_cpus,
                num_gpus=config.shard_num_gpus,
                max_concurrency=1000,
                name=names[k],
                lifetime="detached",  # owned by nobody: the coordinator's death does not take it along
                scheduling_strategy=NodeAffinitySchedulingStrategy(where[i], soft=True) if i in where else "DEFAULT",
                memory=AFFINITY_MEMORY if i in where else None,
            ).remote(*args)
            started: str = await _call(actors[k].start.remote(), "shard start")
            return started

        try:
            async with asyncio.timeout(self.start_timeout_s):
                addresses = await asyncio.gather(*(start(k, i) for k, i in enumerate(indices)))
        except TimeoutError:
            for actor in [a for a in actors if a is not None]:
                ray.kill(actor, no_restart=True)
            free = await asyncio.to_thread(ray.available_resources)
            raise ParamServerError(
                "RESOURCE_EXHAUSTED",
                Reason.SHARDS_UNSCHEDULABLE,
                f"the {len(indices)} shards of job {job_id!r} ({config.shard_num_cpus:g} CPU and {config.shard_num_gpus:g} GPU each) "
                f"were not all placed within {self.start_timeout_s:g} s; available now: {free.get('CPU', 0.0):g} CPU, "
                f"{free.get('GPU', 0.0):g} GPU. Free resources (delete jobs) or ask for fewer.",
                {"field": "spec.shard_num_gpus" if config.shard_num_gpus else "spec.shard_num_cpus"},
            ) from None
        except BaseException:
            for actor in [a for a in actors if a is not None]:
                ray.kill(actor, no_restart=True)
            raise
        finally:
            self._top_up()  # the spares taken are replaced once the shards serve (not competing with their start)
        return [RayShardHandle(a, addr, n) for a, addr, n in zip(actors, addresses, names, strict=True)]

    # ---- warm spares ---------------------------------------------------------------------------
    # A shard actor's start is dominated by its process importing torch (~2 s of CPU here): a lost
    # shard's replacement, and a new job's shards, take a spare that has done it already.
    # Spares ask for no CPU and no GPU (they hold no resources a job could need), run on the
    # coordinator's node and serve only jobs whose shards ask for none either (the default).

    def _take_spare(self, config: JobConfig, node: str | None) -> _Spare | None:
        """A ready spare for a shard of `config` on `node` (None: any node), if one is kept."""
        if config.shard_num_cpus or config.shard_num_gpus:
            return None
        for k, spare in enumerate(self._spares):
            if node is None or spare.node == node:
                return self._spares.pop(k)
        return None

    def _top_up(self) -> None:
        """Start spares in the background until `warm` are ready, from REFILL_DELAY_S on."""
        loop = asyncio.get_running_loop()
        self._refill_at = loop.time() + REFILL_DELAY_S
        if self.warm and (self._refill is None or self._refill.done()):
            self._refill = loop.create_task(self._fill())

    async def _quiet(self) -> None:
        """Until the refill may start (each launch postpones it)."""
        loop = asyncio.get_running_loop()
        while (wait := self._refill_at - loop.time()) > 0:
            await asyncio.sleep(wait)

    async def _fill(self) -> None:
        prefix = self._spare_prefix()
        try:
            if not self._swept:
                self._swept = True
                await self._sweep(prefix)
            here = ray.get_runtime_context().get_node_id()
            while len(self._spares) < self.warm:
                await self._quiet()
                name = f"{prefix}{uuid.uuid4().hex[:8]}"
                actor = ShardActor.options(
                    num_cpus=0,
                    max_concurrency=1000,
                    name=name,
                    lifetime="detached",
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
                    memory=AFFINITY_MEMORY,
                ).remote()
                try:
                    async with asyncio.timeout(self.start_timeout_s):
                        node = str(await actor.node.remote())
                except BaseException:
                    ray.kill(actor, no_restart=True)
                    raise
                self._spares.append(_Spare(actor, name, node))
        except Exception:  # no spare: shards start cold, as without a pool
            log.warning("starting a warm spare shard failed", exc_info=True)

    def _spare_prefix(self) -> str:
        return f"{self.coordinator_name or COORDINATOR_NAME}-spare-"

    async def _sweep(self, prefix: str) -> None:
        """Kill a previous incarnation's idle spares (nobody will use them); one that became a
        shard keeps its spare's name and is left alone."""
        listed = await asyncio.to_thread(ray.util.list_named_actors)
        for name in [n for n in listed if isinstance(n, str) and n.startswith(prefix)]:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name)
                if await asyncio.wait_for(actor.adopted.remote(), STOP_TIMEOUT_S):
                    continue
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - gone already, or not answering: left to Ray
                continue

    async def close(self) -> None:
        """Stop the spares (the service is stopping)."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(BaseException):
                await self._refill
        for spare in self._spares:
            with contextlib.suppress(Exception):
                ray.kill(spare.actor, no_restart=True)
        self._spares.clear()

    def _spread(self, config: JobConfig, indices: Sequence[int]) -> dict[int, str]:
        """Shard index -> node id under the "spread" policy (empty under "pack")."""
        if self.placement != "spread":
            return {}
        where = spread(alive_nodes(), config.shard_num_cpus, config.shard_num_gpus, indices, self._jobs_placed)
        self._jobs_placed += 1
        return where

    async def reattach(self, job_id: str, names: Sequence[str]) -> list[RayShardHandle | None]:
        """Handles on the job's running shards by name (None for one that is gone)."""

        async def one(name: str) -> RayShardHandle | None:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name)
                handle = RayShardHandle(actor, "", name)
                handle.address = (await asyncio.wait_for(handle.status(), 10.0)).address
                return handle
            except Exception:  # noqa: BLE001 - gone, dead or not answering: recovered from a snapshot
                return None

        return list(await asyncio.gather(*(one(n) for n in names)))

    async def cleanup(self, job_id: str, keep: Sequence[str]) -> int:
        """Kill the job's shard actors that are not in `keep` (an interrupted start's): those named
        for the job, and this coordinator's spares that became shards of it."""
        prefix, spares = shard_prefix(job_id), self._spare_prefix()
        listed = [n for n in await asyncio.to_thread(ray.util.list_named_actors) if isinstance(n, str) and n not in keep]

        async def adopted_by_job(name: str) -> bool:
            with contextlib.suppress(Exception):  # gone, or not answering: not known to be the job's
                actor = await asyncio.to_thread(ray.get_actor, name)
                return bool(await asyncio.wait_for(actor.adopted.remote(), STOP_TIMEOUT_S) == job_id)
            return False

        candidates = [n for n in listed if n.startswith(spares)]
        adopted = await asyncio.gather(*(adopted_by_job(n) for n in candidates))
        named = [n for n in listed if n.startswith(prefix) and _SHARD_SUFFIX.fullmatch(n[len(prefix) :])]  # not job "j-shard-x"'s
        stray = named + [n for n, a in zip(candidates, adopted, strict=True) if a]
        for name in stray:
            with contextlib.suppress(Exception):
                ray.kill(await asyncio.to_thread(ray.get_actor, name), no_restart=True)
        if stray:
            log.warning("job %s: stopped %d shard actor(s) left by an interrupted start: %s", job_id, len(stray), stray)
        return len(stray)


#: A log position past every record (a telemetry call for metrics only).
NO_LOGS = 1 << 62


def _since(log_since: Mapping[str, int], source: str) -> int:
    if isinstance(log_since, defaultdict):
        return int(log_since[source])
    return int(log_since.get(source, 0))


#: What follows shard_prefix in a shard actor's name: index, generation, a random tag.
_SHARD_SUFFIX = re.compile(r"\d+-g\d+-[0-9a-f]{6}")


def shard_prefix(job_id: str) -> str:
    """The start of the names of a job's shard actors."""
    return f"paramserver-{job_id}-shard-"


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes with their total CPUs and GPUs (the placement's view)."""
    head = _head_node_id()
    out = []
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        if n.get("Alive"):
            have = n.get("Resources", {})
            node_id = str(n["NodeID"])
            out.append(
                Node(
                    node_id, str(n.get("NodeManagerAddress", "")), float(have.get("CPU", 0.0)), float(have.get("GPU", 0.0)), node_id == head
                )
            )
    return out


def _head_node_id() -> str:
    """The head node's id: the one carrying Ray's head marker resource ("" if none does)."""
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {}):
            return str(n["NodeID"])
    return ""


def check_fits(config: JobConfig, count: int) -> None:
    """RESOURCE_EXHAUSTED (SHARDS_UNSCHEDULABLE) naming the setting when the cluster's live nodes
    could not hold `count` shards even if idle."""
    cpu, gpu = config.shard_num_cpus, config.shard_num_gpus
    if not cpu and not gpu:
        return
    totals = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]

    def slots(have: float, need: float) -> float:
        return math.floor(have / need + 1e-9) if need else math.inf

    fits = sum(min(slots(r.get("CPU", 0.0), cpu), slots(r.get("GPU", 0.0), gpu)) for r in totals)
    if fits >= count:
        return
    short_gpu = gpu > 0 and sum(slots(r.get("GPU", 0.0), gpu) for r in totals) < count
    field, need, have = (
        ("shard_num_gpus", gpu, max((r.get("GPU", 0.0) for r in totals), default=0.0))
        if short_gpu
        else ("shard_num_cpus", cpu, max((r.get("CPU", 0.0) for r in totals), default=0.0))
    )
    raise ParamServerError(
        "RESOURCE_EXHAUSTED",
        Reason.SHARDS_UNSCHEDULABLE,
        f"spec.{field}: {count} shards of {need:g} {field[10:13].upper()} each do not fit on this cluster's {len(totals)} "
        f"node(s) (the largest has {have:g}); lower spec.{field} or spec.num_shards, or add nodes",
        {"field": f"spec.{field}", "needed": need * count, "available": have},
    )


def start_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False) -> bool:
    """Connect to Ray; start a local one when no address is given (with Ray's dashboard when
    `dashboard`: it needs ray[default], the `dashboard` extra). Returns True if we own it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get(RAY_ADDRESS_ENV) or None
    # The actors' log records reach this process through the front door's relay (log_relay), with
    # their job, shard and step; Ray's forwarding of their raw output would print each line twice.
    if address:
        ray.init(address=address, namespace="paramserver", logging_level=logging.WARNING, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus, namespace="paramserver", include_dashboard=dashboard, logging_level=logging.WARNING, log_to_driver=False)
    start_reaper()  # if this process is killed, Ray's processes go with it
    return True


def stop_ray() -> None:
    """Shut down the Ray connection (and the local Ray, if we started it)."""
    if ray.is_initialized():
        ray.shutdown()


class Cluster:
    """The front door's facade over the coordinator actor."""

    def __init__(
        self,
        bind_host: str = "127.0.0.1",
        snapshot_root: str = "snapshots",
        spill_root: str = "spill",
        shard_start_timeout_s: float = SHARD_START_TIMEOUT_S,
        *,
        name: str = "default",
        state_dir: str = "state",
        coordinator_resources: Mapping[str, float] | None = None,
        tls: TlsConfig | None = None,
        shard_port_range: PortRange | None = None,
        placement: str = "spread",
        warm_shards: int = WARM_SHARDS,
    ) -> None:
        """Attach to the service's coordinator actor `name` if it runs (a restarted front door),
        else start it: detached (it outlives this process) and restarted by Ray if it dies (it
        replays its journal under `state_dir` and reattaches to the jobs' shards). It runs on
        this process's node (the front door's; another node when that one is gone), or on the
        nodes with `coordinator_resources` when given."""
        self.coordinator_name = f"{COORDINATOR_NAME}-{name}"
        journal = os.path.join(os.path.abspath(state_dir), f"coordinator-{name}.journal")
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        launcher = RayShardLauncher(
            bind_host, os.path.abspath(spill_root), shard_start_timeout_s, self.coordinator_name, tls, shard_port_range, placement,
            warm_shards,
        )  # fmt: skip
        self.coordinator: Any = CoordinatorActor.options(
            num_cpus=0,
            max_concurrency=1000,
            name=self.coordinator_name,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            resources=dict(coordinator_resources or {}),
            scheduling_strategy="DEFAULT" if coordinator_resources else here,
            memory=None if coordinator_resources else AFFINITY_MEMORY,
        ).remote(
            launcher,
            snapshot_root if "://" in snapshot_root else os.path.abspath(snapshot_root),
            journal=journal,
        )

    async def start(self) -> None:
        """Wait until the coordinator serves (it replays its journal first)."""
        await _call(self.coordinator.start.remote(), "coordinator start")

    async def rollback_job(self, request_id: str, job_id: str, snapshot: str, expected_generation: int | None = None) -> JobView:
        """See Coordinator.rollback_job."""
        call = self.coordinator.rollback_job.remote(request_id, job_id, snapshot, expected_generation)
        result: JobView = await _call(call, "rollback_job")
        return result

    async def ping(self) -> bool:
        """Whether the coordinator answers."""
        result: bool = await _call(self.coordinator.ping.remote(), "coordinator ping")
        return result

    async def create_job(
        self,
        request_id: str,
        job_id: str,
        config: JobConfig | None,
        restore_from: str = "",
        overrides: dict[str, Any] | None = None,
        resume: bool = False,
        tenant: str = "",
        quota: Quota | None = None,
        secured: bool = False,
    ) -> JobView:
        """See Coordinator.create_job."""
        ref = self.coordinator.create_job.remote(request_id, job_id, config, restore_from, overrides, resume, tenant, quota, secured)
        result: JobView = await _call(ref, "create_job")
        return result

    async def access(self, job_id: str) -> tuple[str, tuple[tuple[str, float], ...]]:
        """See Coordinator.access."""
        result: tuple[str, tuple[tuple[str, float], ...]] = await _call(self.coordinator.access.remote(job_id), "access")
        return result

    async def add_token(self, job_id: str, digest: str) -> None:
        """See Coordinator.add_token."""
        await _call(self.coordinator.add_token.remote(job_id, digest), "add_token")

    async def rotate_token(self, request_id: str, job_id: str, digest: str, previous_valid_s: float) -> float:
        """See Coordinator.rotate_token."""
        result: float = await _call(self.coordinator.rotate_token.remote(request_id, job_id, digest, previous_valid_s), "rotate_token")
        return result

    async def create_snapshot(self, request_id: str, job_id: str) -> dict[str, Any]:
        """See Coordinator.create_snapshot."""
        result: dict[str, Any] = await _call(self.coordinator.create_snapshot.remote(request_id, job_id), "create_snapshot")
        return result

    async def list_snapshots(self, job_id: str) -> list[dict[str, Any]]:
        """See Coordinator.list_snapshots."""
        result: list[dict[str, Any]] = await _call(self.coordinator.list_snapshots.remote(job_id), "list_snapshots")
        return result

    async def get_job(self, job_id: str) -> JobView:
        """See Coordinator.get_job."""
        result: JobView = await _call(self.coordinator.get_job.remote(job_id), "get_job")
        return result

    async def list_jobs(self) -> list[JobView]:
        """See Coordinator.list_jobs."""
        result: list[JobView] = await _call(self.coordinator.list_jobs.remote(), "list_jobs")
        return result

    async def join_job(self, request_id: str, job_id: str, worker_name: str) -> tuple[int, JobView, bool, int, float]:
        """See Coordinator.join_job."""
        ref = self.coordinator.join_job.remote(request_id, job_id, worker_name)
        result: tuple[int, JobView, bool, int, float] = await _call(ref, "join_job")
        return result

    async def leave_job(self, request_id: str, job_id: str, worker_id: int, lease: int = 0) -> None:
        """See Coordinator.leave_job."""
        await _call(self.coordinator.leave_job.remote(request_id, job_id, worker_id, lease), "leave_job")

    async def heartbeat(self, job_id: str, worker_id: int, lease: int) -> tuple[int, str, int]:
        """See Coordinator.heartbeat."""
        result: tuple[int, str, int] = await _call(self.coordinator.heartbeat.remote(job_id, worker_id, lease), "heartbeat")
        return result

    async def delete_job(self, request_id: str, job_id: str) -> None:
        """See Coordinator.delete_job."""
        await _call(self.coordinator.delete_job.remote(request_id, job_id), "delete_job")

    async def telemetry(self, log_since: Mapping[str, int] | None, timeout: float = 5.0) -> dict[str, dict[str, Any] | None]:
        """Every actor's metrics and log records (after `log_since[source]`, from the first one
        kept when the source is not in it; none when `log_since` is None): the coordinator's
        under "coordinator", each shard's under its actor name; None for an actor that did not
        answer within `timeout` seconds."""
        out: dict[str, dict[str, Any] | None] = {}
        if log_since is None:
            log_since = defaultdict(lambda: NO_LOGS)
        try:
            top: dict[str, Any] = await asyncio.wait_for(
                _call(self.coordinator.telemetry_export.remote(_since(log_since, "coordinator")), "telemetry"), timeout
            )
        except Exception:  # noqa: BLE001 - not answering: counted by the caller
            return {"coordinator": None}
        out["coordinator"] = top
        handles: list[RayShardHandle] = [h for hs in top["shards"].values() for h in hs]

        async def one(h: RayShardHandle) -> dict[str, Any] | None:
            try:
                return await asyncio.wait_for(h.telemetry(_since(log_since, h.name)), timeout)
            except Exception:  # noqa: BLE001 - gone or hung
                return None

        for h, result in zip(handles, await asyncio.gather(*(one(h) for h in handles)), strict=True):
            out[h.name] = result
        return out

    async def shard_memory(self, job_id: str, reset_peak: bool = False) -> list[dict[str, int]]:
        """Every shard process's resident memory now and at its peak (tests and tools)."""
        handles = await _call(self.coordinator.shard_handles.remote(job_id), "shard_handles")
        return [await h.memory_probe(reset_peak) for h in handles]

    async def shard_tensors(self, job_id: str) -> list[dict[str, np.ndarray]]:
        """Every shard's parameters and optimizer state (inspection and tests)."""
        handles = await _call(self.coordinator.shard_handles.remote(job_id), "shard_handles")
        return [await h.tensors() for h in handles]

    async def close(self, stop_jobs: bool = True) -> None:
        """Stop every job and the coordinator; or, without `stop_jobs`, leave both running for the
        next front door (a restart of the front door alone)."""
        if not stop_jobs:
            return
        try:
            await _call(self.coordinator.shutdown.remote(), "shutdown")
        finally:
            ray.kill(self.coordinator, no_restart=True)
