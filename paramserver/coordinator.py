"""The coordinator: jobs, members, shard maps and the per-step decisions (plain class).

It runs as one Ray actor (see cluster.py) but imports no Ray: shards are
started through an injected :class:`ShardLauncher`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig, check_job_id
from paramserver.ledger import Ledger
from paramserver.manifest import Manifest, ShardEntry
from paramserver.placement import Span
from paramserver.shard_types import Restore, ShardMemory, ShardStatus, fault_from_env
from paramserver.snapshot_policy import Clock, SnapshotPolicy
from paramserver.snapshot_store import FaultHook, SnapshotRef, iter_snapshots, prune, resolve, snapshot_name, verify
from paramserver.snapshot_stores import open_store
from paramserver.steps import Decision, ShardStats, SpikeGuard, decide

log = logging.getLogger(__name__)

#: Decisions kept per job (a shard retrying an old step gets the same answer).
DECISIONS_KEPT = 64


class ShardHandle(Protocol):
    """The coordinator's view of a running shard."""

    address: str

    async def status(self) -> ShardStatus:
        """The shard's version and state."""
        ...

    async def stop(self) -> None:
        """Stop the shard and release its resources."""
        ...

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        """Write the shard's part of snapshot (job_id, name) at `version` into the store at `store`."""
        ...


class ShardLauncher(Protocol):
    """Starts the shards of a job."""

    async def launch(self, job_id: str, config: JobConfig, plan: Sequence[list[Span]], restore: Restore | None = None) -> list[ShardHandle]:
        """Start one shard per plan entry (optionally restored) and return their handles once they serve."""
        ...


@dataclass(frozen=True)
class ShardView:
    """One entry of a shard map."""

    index: int
    address: str
    spans: tuple[Span, ...]
    version: int
    initialized: bool
    memory: ShardMemory = field(default_factory=ShardMemory)
    """Budget, resident and spilled bytes, spill traffic and rates."""


@dataclass(frozen=True)
class JobView:
    """A job as the front door shows it."""

    job_id: str
    config: JobConfig
    shards: tuple[ShardView, ...]
    workers: tuple[int, ...]
    skips: Mapping[str, int] = field(default_factory=dict)

    @property
    def initialized(self) -> bool:
        """Every shard holds parameters."""
        return all(s.initialized for s in self.shards)

    @property
    def version(self) -> int:
        """The version every shard has published."""
        return min(s.version for s in self.shards) if self.initialized else 0


@dataclass
class _Job:
    job_id: str
    config: JobConfig
    plan: list[list[Span]]
    shards: list[ShardHandle]
    policy: SnapshotPolicy
    workers: dict[int, str] = field(default_factory=dict)  # worker id -> name
    reports: dict[int, dict[int, ShardStats]] = field(default_factory=dict)
    decisions: dict[int, Decision] = field(default_factory=dict)
    decided: dict[int, asyncio.Event] = field(default_factory=dict)
    snapshot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    guard: SpikeGuard | None = None
    nan_handled: bool = False
    skips: dict[str, int] = field(default_factory=dict)
    history_at: dict[int, tuple[tuple[float, ...], dict[str, int]]] = field(default_factory=dict)


class Coordinator:
    """Owns every job of one service."""

    def __init__(self, launcher: ShardLauncher, snapshot_root: str = "snapshots", *, clock: Clock = time.monotonic) -> None:
        """`clock` (monotonic seconds) drives the jobs' time-based snapshot policy."""
        self.launcher = launcher
        self.clock = clock
        self.store = open_store(snapshot_root)
        self.jobs: dict[str, _Job] = {}
        self.ledger: Ledger[object] = Ledger()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def _job(self, job_id: str) -> _Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"no job {job_id!r}", job_id=job_id)
        return job

    async def _view(self, job: _Job) -> JobView:
        statuses = await asyncio.gather(*(s.status() for s in job.shards))
        shards = tuple(ShardView(i, st.address, tuple(job.plan[i]), st.version, st.initialized, st.memory) for i, st in enumerate(statuses))
        return JobView(job.job_id, job.config, shards, tuple(sorted(job.workers)), dict(job.skips))

    async def create_job(
        self, request_id: str, job_id: str, config: JobConfig | None, restore_from: str = "", overrides: Mapping[str, Any] | None = None
    ) -> JobView:
        """Create (or, for the same description, return) a job and start its shards.

        With `restore_from`, the configuration comes from that snapshot (after every file is
        verified), with `overrides` (num_shards, num_workers, ...) applied; the shards load
        their ranges from it and the job starts at its version."""
        _require(request_id)
        restore: Restore | None = None
        history: list[float] = []
        skips: dict[str, int] = {}
        if restore_from:
            ref = await asyncio.to_thread(resolve, self.store, restore_from)
            manifest = await asyncio.to_thread(verify, self.store, ref)
            base = manifest.job_config()
            config = dataclasses.replace(base, **{k: v for k, v in (overrides or {}).items() if v})
            restore = Restore(self.store.url, ref.job_id, ref.name, manifest.version, manifest.applied)
            history = list(manifest.spike_norms)
            skips = dict(manifest.skips)
            job_id = job_id or manifest.job_id
        if config is None:
            raise ParamServerError.invalid("spec", "required unless restore_from is given")
        async with self._lock:
            first = self.ledger.lookup(request_id, ("create", job_id, config.key()))
            if isinstance(first, str):
                return await self._view(self._job(first))
            job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
            check_job_id(job_id)
            existing = self.jobs.get(job_id)
            if existing is not None:
                if restore is not None:  # a restore never returns a running job: its state is not the snapshot's
                    raise ParamServerError(
                        "ALREADY_EXISTS",
                        Reason.JOB_ALREADY_EXISTS,
                        f"job {job_id!r} is running; restore into another job_id (or delete it first)",
                        {"job_id": job_id},
                    )
                if existing.config != config:
                    raise ParamServerError(
                        "ALREADY_EXISTS", Reason.JOB_ALREADY_EXISTS, f"job {job_id!r} exists with another description", {"job_id": job_id}
                    )
                self.ledger.record(request_id, ("create", job_id, config.key()), job_id)
                return await self._view(existing)
            config.validate()
            plan = config.plan()
            shards = await self.launcher.launch(job_id, config, plan, restore)
            policy = SnapshotPolicy(every_steps=config.snapshot_every_steps, every_seconds=config.snapshot_every_seconds, clock=self.clock)
            self.jobs[job_id] = _Job(job_id, config, plan, shards, policy)
            if config.spike_window:
                self.jobs[job_id].guard = SpikeGuard(config.spike_window, config.spike_warmup, config.spike_threshold_std, history)
            self.jobs[job_id].skips = dict(skips)
            self.jobs[job_id].nan_handled = config.nan_handled_by_optimizers()
            if restore is not None:
                policy.restored(restore.version)
                log.info(
                    "job %s restored from %s/%s/%s at version %d", job_id, restore.store, restore.job_id, restore.name, restore.version
                )
            self.ledger.record(request_id, ("create", job_id, config.key()), job_id)
            log.info("created job %s: %d shards, %d workers", job_id, len(shards), config.num_workers)
            return await self._view(self.jobs[job_id])

    async def get_job(self, job_id: str) -> JobView:
        """A job with its shard map."""
        return await self._view(self._job(job_id))

    async def list_jobs(self) -> list[JobView]:
        """Every job."""
        return [await self._view(j) for j in list(self.jobs.values())]

    async def join_job(self, request_id: str, job_id: str, worker_name: str) -> tuple[int, JobView, bool]:
        """Assign a worker id: (worker_id, job, whether this worker must upload the parameters)."""
        _require(request_id)
        async with self._lock:
            job = self._job(job_id)
            first = self.ledger.lookup(request_id, ("join", job_id, worker_name))
            if isinstance(first, int):
                wid = first
            else:
                named = [w for w, n in job.workers.items() if worker_name and n == worker_name]
                if named:
                    wid = named[0]
                else:
                    free = [w for w in range(job.config.num_workers) if w not in job.workers]
                    if not free:
                        raise ParamServerError.precondition(
                            Reason.JOB_FULL, f"job {job_id!r} already has {job.config.num_workers} workers", job_id=job_id
                        )
                    wid = free[0]
                    job.workers[wid] = worker_name
                self.ledger.record(request_id, ("join", job_id, worker_name), wid)
        view = await self._view(job)
        return wid, view, (not view.initialized) and wid == 0

    async def leave_job(self, request_id: str, job_id: str, worker_id: int) -> None:
        """Free a worker id."""
        _require(request_id)
        async with self._lock:
            job = self._job(job_id)
            if self.ledger.lookup(request_id, ("leave", job_id, worker_id)) is not None:
                return
            if worker_id not in job.workers:
                raise ParamServerError.not_found(
                    Reason.WORKER_NOT_FOUND, f"worker {worker_id} is not in job {job_id!r}", worker_id=worker_id
                )
            del job.workers[worker_id]
            self.ledger.record(request_id, ("leave", job_id, worker_id), True)

    async def delete_job(self, request_id: str, job_id: str) -> None:
        """Stop a job's shards and forget it."""
        _require(request_id)
        async with self._lock:
            if self.ledger.lookup(request_id, ("delete", job_id)) is not None:
                return
            job = self._job(job_id)
            del self.jobs[job_id]
            for ev in job.decided.values():
                ev.set()
            await asyncio.gather(*(s.stop() for s in job.shards), return_exceptions=True)
            self.ledger.record(request_id, ("delete", job_id), True)
            log.info("deleted job %s", job_id)

    async def reduce_step(self, job_id: str, step: int, stats: ShardStats) -> Decision:
        """Record one shard's stats for a step; answer the decision once every shard reported."""
        job = self._job(job_id)
        if step in job.decisions:
            return job.decisions[step]
        job.reports.setdefault(step, {})[stats.shard] = stats
        event = job.decided.setdefault(step, asyncio.Event())
        if len(job.reports[step]) == len(job.shards):
            decision = decide(step, list(job.reports.pop(step).values()), job.config.max_grad_norm, job.guard, job.nan_handled)
            if not decision.apply:
                job.skips[decision.skip_reason] = job.skips.get(decision.skip_reason, 0) + 1
            # what a snapshot at version step + 1 must carry (training may move on while it is written)
            job.history_at[step + 1] = (tuple(job.guard.norms) if job.guard is not None else (), dict(job.skips))
            job.history_at.pop(step + 1 - DECISIONS_KEPT, None)
            job.decisions[step] = decision
            if job.policy.due(step) and not job.snapshot_lock.locked():  # skipped while one is being written
                job.policy.started(step + 1)
                task = asyncio.get_running_loop().create_task(self._policy_snapshot(job_id))
                self._tasks.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._tasks.discard)
            for old in [s for s in job.decisions if s < step - DECISIONS_KEPT]:
                del job.decisions[old]
                job.decided.pop(old, None)
            event.set()
            return decision
        await event.wait()
        if step not in job.decisions:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"job {job_id!r} was deleted", job_id=job_id)
        return job.decisions[step]

    async def create_snapshot(self, request_id: str, job_id: str) -> dict[str, Any]:
        """Take a consistent snapshot (all shards at one version) and commit it once durable."""
        _require(request_id)
        first = self.ledger.lookup(request_id, ("snapshot", job_id))
        if isinstance(first, dict):
            return first
        job = self._job(job_id)
        if job.snapshot_lock.locked():
            raise ParamServerError("ABORTED", Reason.SNAPSHOT_IN_PROGRESS, f"a snapshot of job {job_id!r} is being written")
        async with job.snapshot_lock:
            result = await self._snapshot(job)
        self.ledger.record(request_id, ("snapshot", job_id), result)
        return result

    async def _policy_snapshot(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.snapshot_lock.locked():
            return  # policy: skip while one is being written
        try:
            async with job.snapshot_lock:
                await self._snapshot(job)
        except Exception:
            log.exception("job %s: periodic snapshot failed", job_id)

    async def _snapshot(self, job: _Job, attempts: int = 20) -> dict[str, Any]:
        store = self.store
        await asyncio.to_thread(store.clean, job.job_id)
        for _ in range(attempts):
            statuses = await asyncio.gather(*(s.status() for s in job.shards))
            if not all(st.initialized for st in statuses):
                raise ParamServerError.precondition(Reason.PARAMETERS_NOT_INITIALIZED, "no parameters to snapshot yet")
            version = max(st.version for st in statuses)
            ref = SnapshotRef(job.job_id, snapshot_name(version))
            await asyncio.to_thread(store.begin, ref)
            results = await asyncio.gather(
                *(s.snapshot(store.url, ref.job_id, ref.name, version) for s in job.shards), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if not errors:
                entries = [r for r in results if isinstance(r, ShardEntry)]
                current = (tuple(job.guard.norms) if job.guard is not None else (), dict(job.skips))
                norms, skips = job.history_at.get(version, current)
                manifest = Manifest.build(job.job_id, version, job.config, entries, norms, skips)
                try:
                    await asyncio.to_thread(store.commit, ref, manifest, fault_for_manifest(job.job_id))
                except (OSError, ParamServerError) as exc:
                    await asyncio.to_thread(store.delete, ref)
                    raise ParamServerError("INTERNAL", Reason.SNAPSHOT_FAILED, f"committing {store.path(ref)}: {exc}") from exc
                job.policy.committed()
                await asyncio.to_thread(prune, store, job.job_id, job.config.snapshot_keep_last)
                log.info("job %s: snapshot %s committed", job.job_id, store.path(ref))
                return manifest.summary(store.path(ref))
            await asyncio.to_thread(store.delete, ref)
            moved = [e for e in errors if isinstance(e, ParamServerError) and e.reason == Reason.STEP_ALREADY_APPLIED]
            if len(moved) != len(errors):
                first_error = errors[0]
                raise ParamServerError(
                    "INTERNAL", Reason.SNAPSHOT_FAILED, f"snapshot of job {job.job_id!r} failed: {first_error}"
                ) from first_error
            await asyncio.sleep(0.01)  # a shard moved on between the version check and its copy: retry
        raise ParamServerError("UNAVAILABLE", Reason.SNAPSHOT_FAILED, f"job {job.job_id!r} never paused at a common version")

    async def list_snapshots(self, job_id: str) -> list[dict[str, Any]]:
        """Committed snapshots of a job, oldest first."""
        found = await asyncio.to_thread(lambda: list(iter_snapshots(self.store, job_id)))
        # a snapshot with an unreadable manifest is left out here and reported by verify
        return [m.summary(self.store.path(ref)) for ref, m in found if m is not None]

    async def shard_handles(self, job_id: str) -> list[ShardHandle]:
        """The handles of a job's shards (inspection and tests)."""
        return list(self._job(job_id).shards)

    async def shutdown(self) -> None:
        """Stop every job's shards."""
        for job_id in list(self.jobs):
            await self.delete_job(f"shutdown-{job_id}-{uuid.uuid4().hex}", job_id)


def _require(request_id: str) -> None:
    if not request_id:
        raise ParamServerError.invalid("request_id", "must not be empty (every mutating call carries a request id)")


def fault_for_manifest(job_id: str) -> FaultHook:
    """The injected failure for committing a manifest ("JOB_ID manifest manifest" in the fault file)."""
    hook = fault_from_env(job_id, -1)

    def at(phase: str, name: str) -> None:
        if hook is not None:
            hook(phase, name)

    return at
