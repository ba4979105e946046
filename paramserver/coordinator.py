"""The coordinator: jobs, members, shard maps and the per-step decisions (plain class).

It runs as one Ray actor (see cluster.py) but imports no Ray: shards are
started through an injected :class:`ShardLauncher`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from paramserver.access import Quota, add_token, denied, rotate
from paramserver.control_state import ControlJournal, JobRecord
from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig, check_job_id
from paramserver.ledger import Ledger
from paramserver.manifest import Manifest, ShardEntry
from paramserver.membership import Member, Membership, Roster
from paramserver.memory_store import MEMORY_URL, Held
from paramserver.metric_names import SNAPSHOT_BUCKETS
from paramserver.placement import Span
from paramserver.shard_types import Restore, ShardMemory, ShardStatus, fault_from_env, restore_for
from paramserver.snapshot_names import shard_file
from paramserver.snapshot_policy import Clock, SnapshotPolicy
from paramserver.snapshot_store import FaultHook, SnapshotRef, iter_snapshots, prune, resolve, snapshot_name, verify
from paramserver.snapshot_stores import open_store
from paramserver.steps import Decision, Redo, ShardStats, SpikeGuard, decide
from paramserver.telemetry import Telemetry

log = logging.getLogger(__name__)

#: Decisions kept per job (a shard retrying an old step gets the same answer).
DECISIONS_KEPT = 64


#: Seconds a shard's status may take before the shard counts as unreachable in a job's view.
STATUS_TIMEOUT_S = 5.0
#: Seconds every shard gets to adopt a new roster.
ROSTER_TIMEOUT_S = 10.0
#: Seconds between two checks of every running job's shards and leases.
WATCH_INTERVAL_S = 0.5
#: Attempts at relaunching a job's shards during a recovery (the cluster may be short of nodes).
RECOVERY_ATTEMPTS = 10
#: Seconds a surviving shard gets to restore in place before it is replaced by a new one.
RESET_TIMEOUT_S = 300.0


class ShardHandle(Protocol):
    """The coordinator's view of a running shard."""

    address: str
    name: str
    """The shard's name in the cluster (a restarted coordinator finds it by it)."""

    async def status(self) -> ShardStatus:
        """The shard's version and state."""
        ...

    async def set_roster(self, roster: Roster) -> None:
        """Make the shard adopt `roster` (ignored if it holds a newer one)."""
        ...

    async def telemetry(self, log_since: int = 0) -> dict[str, Any]:
        """The shard's metrics and log records after `log_since` (ShardHost.telemetry_export)."""
        ...

    async def stop(self) -> None:
        """Stop the shard and release its resources (bounded: a hung shard is killed)."""
        ...

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        """Write the shard's part of snapshot (job_id, name) at `version` into the store at `store`."""
        ...

    async def replicate(self, job_id: str, name: str, version: int) -> tuple[ShardEntry, Held | object]:
        """The shard's state at `version` as one snapshot file in memory: (entry, the file, or a
        handle on it that the launcher's shards resolve; see Restore.replica)."""
        ...

    async def reset(self, restore: Restore, roster: Roster | None, generation: int) -> str:
        """Restore the shard in place from `restore` under `generation` (a recovery that keeps it)."""
        ...


class ShardLauncher(Protocol):
    """Starts the shards of a job."""

    async def launch(
        self,
        job_id: str,
        config: JobConfig,
        plan: Sequence[list[Span]],
        restore: Restore | None = None,
        roster: Roster | None = None,
        generation: int = 0,
        only: Sequence[int] | None = None,
    ) -> list[ShardHandle]:
        """Start one shard per plan entry (or the entries `only` names, in that order; optionally
        restored, with the job's roster and generation) and return their handles once they serve.
        Bounded: RESOURCE_EXHAUSTED (SHARDS_UNSCHEDULABLE) when the cluster cannot place them."""
        ...

    async def reattach(self, job_id: str, names: Sequence[str]) -> list[ShardHandle | None]:
        """Handles on running shards by name (None for one that is gone)."""
        ...

    async def cleanup(self, job_id: str, keep: Sequence[str]) -> int:
        """Stop the job's shards that are not in `keep` (left by an interrupted start); how many."""
        ...

    async def close(self) -> None:
        """Release what the launcher holds besides the jobs' shards (the service is stopping)."""
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
    reachable: bool = True
    """False when the shard did not answer (its actor or node is gone)."""
    node: str = ""
    """The cluster node it runs on."""
    pushed: tuple[int, ...] = ()
    """The workers whose push of the open step it holds."""


@dataclass(frozen=True)
class MemberView:
    """A member of a job as GetJob shows it."""

    worker_id: int
    name: str
    lease: int
    idle_s: float
    lost: bool


@dataclass(frozen=True)
class Progress:
    """The open step of a job, its pace and its last snapshot (Job.progress)."""

    step: int = 0
    pushed: tuple[int, ...] = ()
    waiting: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    steps_per_s: float = 0.0
    last_step_age_s: float = 0.0
    last_snapshot_version: int = 0
    last_snapshot: str = ""
    last_snapshot_age_s: float = 0.0


#: The window of the job's pace (steps per second), seconds.
PACE_WINDOW_S = 60.0


#: Job states (names of paramserver.v1.JobState without the prefix; RUNNING covers AWAITING_PARAMETERS;
#: a restarted coordinator shows a job it is reattaching to as RECOVERING).
CREATING, RUNNING, RECOVERING, FAILED = "CREATING", "RUNNING", "RECOVERING", "FAILED"


@dataclass(frozen=True)
class JobView:
    """A job as the front door shows it."""

    job_id: str
    config: JobConfig
    shards: tuple[ShardView, ...]
    workers: tuple[int, ...]
    skips: Mapping[str, int] = field(default_factory=dict)
    state: str = RUNNING
    state_reason: str = ""
    members: tuple[MemberView, ...] = ()
    generation: int = 0
    recoveries: int = 0
    recovered_from: str = ""
    tenant: str = ""
    progress: Progress = field(default_factory=lambda: Progress())

    @property
    def initialized(self) -> bool:
        """Every shard that answered holds parameters."""
        live = [s for s in self.shards if s.reachable]
        return bool(live) and all(s.initialized for s in live)

    @property
    def version(self) -> int:
        """The version every shard that answered has published."""
        return min(s.version for s in self.shards if s.reachable) if self.initialized else 0


@dataclass
class _Job:
    job_id: str
    config: JobConfig
    plan: list[list[Span]]
    shards: list[ShardHandle]
    policy: SnapshotPolicy
    membership: Membership
    state: str = RUNNING
    state_reason: str = ""
    generation: int = 0
    recoveries: int = 0
    created: asyncio.Event = field(default_factory=asyncio.Event)
    create_error: BaseException | None = None
    launching: asyncio.Task[None] | None = None
    deleted: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises this job's membership changes (never held across another job's calls)."""
    reports: dict[int, dict[int, ShardStats]] = field(default_factory=dict)
    waiters: dict[int, dict[int, asyncio.Future[Decision | Redo]]] = field(default_factory=dict)
    decisions: dict[int, Decision] = field(default_factory=dict)
    snapshot_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    guard: SpikeGuard | None = None
    nan_handled: bool = False
    skips: dict[str, int] = field(default_factory=dict)
    history_at: dict[int, tuple[tuple[float, ...], dict[str, int]]] = field(default_factory=dict)
    decided_version: int = 0
    """The version the latest decision publishes (Heartbeat's answer)."""
    last_recovery: dict[str, float] = field(default_factory=dict)
    """Timings of the latest recovery (seconds): detected_at, restored_at, version."""
    recovered_from: str = ""
    replica: tuple[Manifest, dict[str, Held | object]] | None = None
    """The newest complete replica: its manifest and every shard file (memory only; files or the
    launcher's handles on them)."""
    replicating: bool = False
    tenant: str = ""
    """The tenant that owns the job ("" when the service runs without credentials)."""
    quota: Quota = field(default_factory=Quota)
    """Its tenant's quotas (shared by the tenant's jobs)."""
    decided_at: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))
    """Clock times of the latest decisions (the job's pace)."""
    last_snapshot: tuple[int, str, float] | None = None
    """(version, path, clock time) of the newest snapshot this coordinator committed."""

    @property
    def workers(self) -> dict[int, str]:
        """Member worker ids and their names."""
        return {w: m.name for w, m in self.membership.members.items()}


class Coordinator:
    """Owns every job of one service."""

    def __init__(
        self, launcher: ShardLauncher, snapshot_root: str = "snapshots", *, clock: Clock = time.monotonic, journal: str = ""
    ) -> None:
        """`clock` (monotonic seconds) drives the jobs' time-based snapshot policy and the workers'
        leases. With a `journal` path, every change is made durable there first, and a coordinator
        started on an existing journal (a restart) replays it and reattaches to the jobs' shards."""
        self.launcher = launcher
        self.clock = clock
        self.store = open_store(snapshot_root)
        self.jobs: dict[str, _Job] = {}
        self.ledger: Ledger[object] = Ledger()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._control = ControlJournal(Path(journal)) if journal else None
        self._started = False
        self.instance = uuid.uuid4().hex
        """Changes with every (re)start of the coordinator."""
        self.telemetry = Telemetry()
        """The jobs' metrics and this actor's log records, for the front door (telemetry_export)."""
        self.owners: dict[str, str] = {}
        """job id -> its tenant (kept after a delete: the job's snapshots stay its tenant's)."""

    # ---- durability ---------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        """Make a change durable (before anybody learns of it)."""
        if self._control is not None:
            self._control.append(record)

    def _remember(self, request_id: str, fingerprint: tuple[Any, ...], answer: object) -> None:
        """Record a request's first answer (durably: a retry after a restart gets it too)."""
        self.ledger.record(request_id, fingerprint, answer)
        self._log({"t": "ledger", "id": request_id, "fp": list(fingerprint), "answer": answer})

    async def start(self) -> None:
        """Replay the journal (once) and reattach to the jobs' shards: jobs whose shards are all
        alive go on where they were; a job that lost a shard meanwhile is recovered; one whose
        start was interrupted is started again."""
        if self._started:
            return
        self._started = True
        if self._control is not None:
            for rid, (fp, answer) in self._control.state.ledger.items():
                self.ledger.record(rid, fp, answer)
            self.owners.update(self._control.state.owners)
            for rec in list(self._control.state.jobs.values()):
                try:
                    self._revive(rec)
                except Exception:
                    log.exception("job %s: cannot rebuild it from the journal; leaving it out", rec.job_id)
        self._watch()

    def _revive(self, rec: JobRecord) -> None:
        config = JobConfig.from_dict(rec.config)
        policy = SnapshotPolicy(every_steps=config.snapshot_every_steps, every_seconds=config.snapshot_every_seconds, clock=self.clock)
        membership = Membership(
            config.min_members, config.max_members, config.worker_timeout_s, config.on_worker_lost, self.clock, rec.next_lease
        )
        membership.grace_s = config.grace_window_s
        now = self.clock()
        membership.members = {int(w): Member(int(w), str(n), int(lease), now, bool(lost)) for w, (n, lease, lost) in rec.members.items()}
        membership.removed = set(rec.removed)
        # above any epoch the shards hold from before the restart (epochs are not journaled): a
        # roster sent after a restart must not be ignored as older than theirs
        membership.epoch = time.time_ns() // 1_000_000
        membership.tokens = tuple((str(h), float(e)) for h, e in rec.tokens)
        membership.secured = rec.secured
        quota = Quota(**{k: int(v) for k, v in rec.quota.items()})
        membership.max_streams = quota.streams
        job = _Job(rec.job_id, config, config.plan(), [], policy, membership, state=RECOVERING, generation=rec.generation)
        job.tenant, job.quota = rec.tenant, quota
        job.recoveries = rec.recoveries
        job.state_reason = "reattaching after a coordinator restart"
        job.skips = dict(rec.skips)
        job.decided_version = rec.decided_version
        job.decisions = {int(s): _decision(d) for s, d in rec.decisions.items()}
        if config.spike_window:
            job.guard = SpikeGuard(config.spike_window, config.spike_warmup, config.spike_threshold_std, rec.norms)
        job.nan_handled = config.nan_handled_by_optimizers()
        self.jobs[rec.job_id] = job
        if rec.state == FAILED:
            job.state, job.state_reason = FAILED, rec.state_reason
            job.created.set()
            return
        restore = Restore(**rec.restore) if rec.restore else None
        if rec.state == CREATING or not rec.shard_names:
            job.state = CREATING
            job.launching = asyncio.get_running_loop().create_task(self._restart_launch(job, restore))
            return
        job.created.set()
        self._spawn(self._reattach(job, rec.shard_names))

    async def _restart_launch(self, job: _Job, restore: Restore | None) -> None:
        """Start again a job whose start the previous coordinator did not finish, first stopping
        the shards that start left behind (they never served it)."""
        try:
            await self.launcher.cleanup(job.job_id, ())
        except Exception:  # left running, but the job still starts
            log.warning("job %s: could not stop what its interrupted start left", job.job_id, exc_info=True)
        await self._launch(job, "", restore)

    async def _reattach(self, job: _Job, names: list[str]) -> None:
        handles = await self.launcher.reattach(job.job_id, names)
        await self.launcher.cleanup(job.job_id, names)
        lost = [i for i, h in enumerate(handles) if h is None]
        if lost:
            job.last_recovery = {"detected_at": self.clock()}
            job.state_reason = f"{Reason.SHARD_LOST}: shard(s) {lost} lost while the coordinator was away; restoring"
            await self._recover(job, lost, {i: h for i, h in enumerate(handles) if h is not None})
            return
        job.shards = [h for h in handles if h is not None]
        job.state, job.state_reason = RUNNING, ""
        log.info("job %s: reattached to its %d shards (generation %d)", job.job_id, len(job.shards), job.generation)
        async with job.lock:
            await self._push_roster(job)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    def _job(self, job_id: str) -> _Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"no job {job_id!r}", job_id=job_id)
        return job

    def _running(self, job: _Job) -> None:
        """Raise unless the job can take workers' calls."""
        if job.state == FAILED:
            raise ParamServerError.precondition(Reason.JOB_FAILED, f"job {job.job_id!r} failed: {job.state_reason}", job_id=job.job_id)
        if job.state == RECOVERING:
            raise ParamServerError(
                "UNAVAILABLE", Reason.JOB_RECOVERING, f"job {job.job_id!r} is recovering; retry shortly", {"job_id": job.job_id}
            )
        if job.state == CREATING:
            raise ParamServerError(
                "UNAVAILABLE",
                Reason.SERVICE_UNAVAILABLE,
                f"job {job.job_id!r} is starting its shards; retry shortly",
                {"job_id": job.job_id},
            )

    async def _status(self, job: _Job, shard: ShardHandle) -> ShardStatus | None:
        try:
            return await asyncio.wait_for(shard.status(), STATUS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost or hung shard is shown as unreachable
            self._noticed(job, exc)
            return None

    def _noticed(self, job: _Job, exc: BaseException) -> None:
        """A shard call of `job` failed with `exc`: when it says the actor is dead and the job is
        running (the only state the watcher recovers from), the watcher looks at once rather than
        at its next tick, so a recovery starts as soon as anyone notices. (A failed or recovering
        job's dead shards, seen by every GetJob, do not wake it again and again.)"""
        if job.state == RUNNING and isinstance(exc, ParamServerError) and exc.metadata.get("actor") == "dead":
            self._wake.set()

    async def _view(self, job: _Job) -> JobView:
        statuses = await asyncio.gather(*(self._status(job, s) for s in job.shards))
        shards = []
        for i, st in enumerate(statuses):
            if st is None:
                shards.append(ShardView(i, job.shards[i].address, tuple(job.plan[i]), 0, False, reachable=False))
            else:
                shards.append(
                    ShardView(i, st.address, tuple(job.plan[i]), st.version, st.initialized, st.memory, node=st.node, pushed=st.pushed)
                )
        now = self.clock()
        members = tuple(
            MemberView(m.worker_id, m.name, m.lease, max(0.0, now - m.renewed_at), m.lost)
            for m in sorted(job.membership.members.values(), key=lambda m: m.worker_id)
        )
        progress = self._progress(job, shards, members, now)
        return JobView(
            job.job_id,
            job.config,
            tuple(shards),
            tuple(sorted(job.workers)),
            dict(job.skips),
            job.state,
            job.state_reason,
            members,
            job.generation,
            job.recoveries,
            job.recovered_from,
            job.tenant,
            progress,
        )

    @staticmethod
    def _progress(job: _Job, shards: list[ShardView], members: tuple[MemberView, ...], now: float) -> Progress:
        """Where the open step stands (a worker has pushed when every shard that answered holds
        its push), the pace over the last PACE_WINDOW_S and the last snapshot."""
        live = [s for s in shards if s.reachable]
        pushed = set.intersection(*(set(s.pushed) for s in live)) if live else set()
        recent = [t for t in job.decided_at if now - t <= PACE_WINDOW_S]
        span = now - recent[0] if recent else 0.0
        rate = len(recent) / max(span, 1.0) if recent else 0.0
        snap = job.last_snapshot
        return Progress(
            step=min((s.version for s in live), default=0),
            pushed=tuple(sorted(w for w in pushed if any(m.worker_id == w for m in members))),
            waiting=tuple(m.worker_id for m in members if m.worker_id not in pushed and not m.lost),
            missing=tuple(m.worker_id for m in members if m.lost),
            steps_per_s=rate,
            last_step_age_s=max(0.0, now - job.decided_at[-1]) if job.decided_at else 0.0,
            last_snapshot_version=snap[0] if snap else 0,
            last_snapshot=snap[1] if snap else "",
            last_snapshot_age_s=max(0.0, now - snap[2]) if snap else 0.0,
        )

    async def create_job(
        self,
        request_id: str,
        job_id: str,
        config: JobConfig | None,
        restore_from: str = "",
        overrides: Mapping[str, Any] | None = None,
        resume: bool = False,
        tenant: str = "",
        quota: Quota | None = None,
        secured: bool = False,
    ) -> JobView:
        """Create a job and start its shards (with `resume`, return the existing job of that id
        when its description is the same; without, that is ALREADY_EXISTS).

        `tenant` owns the job (another tenant's existing job is PERMISSION_DENIED) and its `quota`
        bounds the tenant's jobs together (RESOURCE_EXHAUSTED QUOTA_EXCEEDED); `secured` jobs'
        shards accept only the worker tokens given by add_token/rotate_token.

        With `restore_from`, the configuration comes from that snapshot (after every file is
        verified), with `overrides` (num_shards, num_workers, ...) applied; the shards load
        their ranges from it and the job starts at its version. The shards start outside the
        coordinator's lock: other calls go on meanwhile, and the launcher bounds the wait."""
        await self.start()
        _require(request_id)
        restore: Restore | None = None
        history: list[float] = []
        skips: dict[str, int] = {}
        if restore_from:
            ref = await asyncio.to_thread(resolve, self.store, restore_from, "restore_from")
            if secured:
                self._check_owner(ref.job_id, tenant, "restore_from")
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
            first = self.ledger.lookup(request_id, ("create", job_id, config.key(), tenant))
            if isinstance(first, str):
                return await self._created(self._job(first))
            job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
            check_job_id(job_id)
            existing = self.jobs.get(job_id)
            if (existing is not None and existing.tenant != tenant) or self.owners.get(job_id, tenant) != tenant:
                raise denied(f"job id {job_id!r} belongs to another tenant", job_id=job_id)
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
                if not resume:
                    version = existing.decided_version
                    raise ParamServerError(
                        "ALREADY_EXISTS",
                        Reason.JOB_ALREADY_EXISTS,
                        f"job {job_id!r} already exists (at version {version}): pass resume=True to continue it, "
                        "or choose another job_id (or delete it first)",
                        {"job_id": job_id, "version": version},
                    )
                self._remember(request_id, ("create", job_id, config.key(), tenant), job_id)
            else:
                config.validate()
                quota = quota or Quota()
                self._check_create_quota(tenant, quota, config)
                plan = config.plan()
                policy = SnapshotPolicy(
                    every_steps=config.snapshot_every_steps, every_seconds=config.snapshot_every_seconds, clock=self.clock
                )
                membership = Membership(config.min_members, config.max_members, config.worker_timeout_s, config.on_worker_lost, self.clock)
                membership.secured, membership.max_streams = secured, quota.streams
                membership.grace_s = config.grace_window_s
                job = _Job(job_id, config, plan, [], policy, membership, state=CREATING, tenant=tenant, quota=quota)
                if config.spike_window:
                    job.guard = SpikeGuard(config.spike_window, config.spike_warmup, config.spike_threshold_std, history)
                job.skips = dict(skips)
                job.nan_handled = config.nan_handled_by_optimizers()
                job.decided_version = restore.version if restore is not None else 0
                self.jobs[job_id] = job
                if tenant:
                    self.owners[job_id] = tenant
                self._log({"t": "job", "job_id": job_id, "config": config.to_dict(),
                           "restore": dataclasses.asdict(restore) if restore is not None else None,
                           "decided_version": job.decided_version, "skips": dict(skips), "norms": list(history),
                           "tenant": tenant, "quota": dataclasses.asdict(quota), "secured": secured, "tokens": []})  # fmt: skip
                self._remember(request_id, ("create", job_id, config.key(), tenant), job_id)
                job.launching = asyncio.get_running_loop().create_task(self._launch(job, request_id, restore))
            job = self.jobs[job_id]
        return await self._created(job)

    def _check_owner(self, snapshot_job: str, tenant: str, field: str) -> None:
        """PERMISSION_DENIED unless the snapshots of `snapshot_job` belong to `tenant`."""
        if self.owners.get(snapshot_job) != tenant:
            raise denied(f"the snapshots of job {snapshot_job!r} do not belong to this tenant", job_id=snapshot_job, field=field)

    def _tenant_jobs(self, tenant: str) -> list[_Job]:
        return [j for j in self.jobs.values() if j.tenant == tenant and not j.deleted]

    def _check_create_quota(self, tenant: str, quota: Quota, config: JobConfig) -> None:
        jobs = self._tenant_jobs(tenant)
        quota.check("parameter_bytes", sum(4 * j.config.total_elements for j in jobs), 4 * config.total_elements)
        quota.check("shards", sum(j.config.num_shards for j in jobs), config.num_shards)

    async def access(self, job_id: str) -> tuple[str, tuple[tuple[str, float], ...]]:
        """A job's tenant and the worker tokens it accepts (hashes and expiries)."""
        await self.start()
        job = self.jobs.get(job_id)
        if job is None and job_id in self.owners:  # deleted: its snapshots stay its tenant's
            return self.owners[job_id], ()
        job = self._job(job_id)
        return job.tenant, job.membership.tokens

    async def _set_tokens(self, job: _Job, tokens: tuple[tuple[str, float], ...]) -> None:
        self._log({"t": "tokens", "job_id": job.job_id, "tokens": [list(x) for x in tokens]})
        job.membership.set_tokens(tokens)
        if job.state == RUNNING:
            await self._push_roster(job)

    async def add_token(self, job_id: str, digest: str) -> None:
        """Accept one more worker token (its SHA-256) for the job, on every shard."""
        await self.start()
        job = self._job(job_id)
        await job.created.wait()
        async with job.lock:
            tokens = add_token(job.membership.tokens, digest)
            if tokens != job.membership.tokens:
                await self._set_tokens(job, tokens)

    async def rotate_token(self, request_id: str, job_id: str, digest: str, previous_valid_s: float) -> float:
        """Accept the worker token `digest`; the job's other tokens expire `previous_valid_s` seconds
        from now (Unix time returned). A retry accepts its own token again and gets the first expiry."""
        await self.start()
        _require(request_id)
        job = self._job(job_id)
        await job.created.wait()
        async with job.lock:
            first = self.ledger.lookup(request_id, ("rotate", job_id))
            if isinstance(first, tuple):  # a retry: never brings back a token retired since
                until, issued = first
                if issued != digest:
                    raise ParamServerError.precondition(
                        Reason.REQUEST_ID_REUSED,
                        "this rotation was answered before, to a front door that has restarted since: rotate again under a new request id",
                    )
                return float(until)
            tokens, until = rotate(job.membership.tokens, digest, previous_valid_s, time.time())
            await self._set_tokens(job, tokens)
            self._remember(request_id, ("rotate", job_id), (until, digest))
            log.info("job %s: worker token rotated; previous tokens valid %.0f s more", job_id, previous_valid_s)
            return until

    async def _launch(self, job: _Job, request_id: str, restore: Restore | None) -> None:
        """Start a new job's shards (a task of its own: a caller that gives up does not cancel it)."""
        try:
            shards = await self.launcher.launch(job.job_id, job.config, job.plan, restore, job.membership.roster(), job.generation)
        except BaseException as exc:
            job.create_error = exc
            self.ledger.forget(request_id)
            if self.jobs.get(job.job_id) is job:
                del self.jobs[job.job_id]
                self._log({"t": "delete", "job_id": job.job_id})
            job.created.set()
            if not isinstance(exc, Exception) and not job.deleted:
                raise
            return
        job.shards = list(shards)
        if job.deleted:  # deleted while its shards started
            await asyncio.gather(*(s.stop() for s in shards), return_exceptions=True)
        else:
            self._log({"t": "shards", "job_id": job.job_id, "generation": job.generation, "names": [s.name for s in shards]})
            self._log({"t": "state", "job_id": job.job_id, "state": RUNNING})
            job.state = RUNNING
            if restore is not None:
                job.policy.restored(restore.version)
                log.info(
                    "job %s restored from %s/%s/%s at version %d", job.job_id, restore.store, restore.job_id, restore.name, restore.version
                )
            log.info("created job %s: %d shards, %d workers", job.job_id, len(shards), job.config.num_workers)
            self._watch()
        job.created.set()

    async def _created(self, job: _Job) -> JobView:
        """The job's view once its creation finished (its error if it failed)."""
        await job.created.wait()
        if job.deleted:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"job {job.job_id!r} was deleted", job_id=job.job_id)
        if job.create_error is not None:
            raise job.create_error
        return await self._view(job)

    async def get_job(self, job_id: str) -> JobView:
        """A job with its shard map."""
        await self.start()
        return await self._view(self._job(job_id))

    async def list_jobs(self) -> list[JobView]:
        """Every job (each shown in whatever state it is: one job's lost shard does not fail the list)."""
        await self.start()
        return list(await asyncio.gather(*(self._view(j) for j in list(self.jobs.values()))))

    async def _push_roster(self, job: _Job) -> None:
        """Send the job's roster to every shard (bounded; a shard that misses it gets the next)."""
        roster = job.membership.roster()
        results = await asyncio.gather(
            *(asyncio.wait_for(s.set_roster(roster), ROSTER_TIMEOUT_S) for s in job.shards), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ParamServerError(
                "UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, f"job {job.job_id!r}: {len(errors)} shard(s) did not take the new membership"
            )
        self._recheck(job)

    async def join_job(self, request_id: str, job_id: str, worker_name: str) -> tuple[int, JobView, bool, int, float]:
        """Admit a worker: (worker_id, job, whether it must upload the parameters, lease, lease timeout)."""
        await self.start()
        _require(request_id)
        job = self._job(job_id)
        if not isinstance(self.ledger.lookup(request_id, ("join", job_id, worker_name)), tuple):
            self._running(job)  # a recovering (or starting, or failed) job refuses now, not after its lock
        async with job.lock:
            first = self.ledger.lookup(request_id, ("join", job_id, worker_name))
            if isinstance(first, tuple):
                wid, lease = first
            else:
                self._running(job)
                if job.quota.workers and not any(m.name == worker_name and worker_name for m in job.membership.members.values()):
                    members = sum(len(j.membership.members) for j in self._tenant_jobs(job.tenant))
                    job.quota.check("workers", members, 1)
                member = job.membership.join(worker_name)
                wid, lease = member.worker_id, member.lease
                self._log({"t": "join", "job_id": job_id, "worker_id": wid, "name": worker_name, "lease": lease})
                self._remember(request_id, ("join", job_id, worker_name), (wid, lease))
                log.info("job %s: worker %d (%s) joined with lease %d", job_id, wid, worker_name or "unnamed", lease)
                await self._push_roster(job)
        view = await self._view(job)
        return wid, view, (not view.initialized) and wid == 0, lease, job.config.worker_timeout_s

    async def leave_job(self, request_id: str, job_id: str, worker_id: int, lease: int = 0) -> None:
        """Remove a member (what it pushed for the open step is discarded on every shard)."""
        await self.start()
        _require(request_id)
        job = self._job(job_id)
        async with job.lock:
            if self.ledger.lookup(request_id, ("leave", job_id, worker_id)) is not None:
                return
            job.membership.leave(worker_id, lease)
            self._log({"t": "leave", "job_id": job_id, "worker_id": worker_id})
            self._remember(request_id, ("leave", job_id, worker_id), True)
            log.info("job %s: worker %d left", job_id, worker_id)
            await self._push_roster(job)

    async def heartbeat(self, job_id: str, worker_id: int, lease: int) -> tuple[int, str, int]:
        """Renew a lease: (the latest decided version, the job's state, its generation)."""
        await self.start()
        job = self._job(job_id)
        lost = job.membership.members.get(worker_id)
        was_lost = lost is not None and lost.lost
        job.membership.renew(worker_id, lease)
        if was_lost:
            log.info("job %s: worker %d is back", job_id, worker_id)
            self._log({"t": "lost", "job_id": job_id, "worker_id": worker_id, "lost": False})
            async with job.lock:
                await self._push_roster(job)
        return job.decided_version, job.state, job.generation

    async def delete_job(self, request_id: str, job_id: str) -> None:
        """Stop a job's shards and forget it (in any state: a job still starting is stopped as soon
        as its shards are up)."""
        await self.start()
        _require(request_id)
        async with self._lock:
            if self.ledger.lookup(request_id, ("delete", job_id)) is not None:
                return
            job = self._job(job_id)
            del self.jobs[job_id]
            self.telemetry.drop("job_id", job_id)
            job.deleted = True
            self._log({"t": "delete", "job_id": job_id})
            self._remember(request_id, ("delete", job_id), True)
        if job.launching is not None and not job.launching.done():
            job.launching.cancel()  # the launcher stops whatever it had started
        for waiters in job.waiters.values():
            for fut in waiters.values():
                if not fut.done():
                    fut.set_exception(ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"job {job_id!r} was deleted", job_id=job_id))
        await asyncio.gather(*(s.stop() for s in job.shards), return_exceptions=True)
        log.info("deleted job %s", job_id)

    # ---- steps ------------------------------------------------------------------------------

    async def reduce_step(self, job_id: str, step: int, stats: ShardStats) -> Decision | Redo:
        """Record one shard's stats for a step; answer the decision once every shard reported the
        same contributions, from exactly the job's members; a :class:`Redo` to a shard that
        reduced another set."""
        await self.start()
        job = self._job(job_id)
        if stats.generation != job.generation:  # a shard a recovery replaced, still finishing its step
            raise ParamServerError(
                "ABORTED",
                Reason.JOB_ROLLED_BACK,
                f"generation {stats.generation} was replaced by {job.generation}",
                {"generation": job.generation},
            )
        if step in job.decisions:
            return job.decisions[step]
        job.reports.setdefault(step, {})[stats.shard] = stats
        waiters = job.waiters.setdefault(step, {})
        old = waiters.get(stats.shard)
        if old is not None and not old.done():
            old.cancel()  # the same shard asking again (a retry): only the newest call is answered
        fut: asyncio.Future[Decision | Redo] = asyncio.get_running_loop().create_future()
        waiters[stats.shard] = fut
        self._try_decide(job, step)
        return await fut

    def _recheck(self, job: _Job) -> None:
        """After a membership change: answer the open step's reports that no longer match."""
        for step in list(job.reports):
            self._try_decide(job, step)

    def _try_decide(self, job: _Job, step: int) -> None:
        reports = job.reports.get(step, {})
        waiters = job.waiters.get(step, {})
        roster = job.membership.roster()
        members = roster.members
        least = max(roster.min_workers, 1)
        quorum = len(members) >= least and not roster.failed

        def acceptable(contributors: tuple[tuple[int, int], ...]) -> bool:
            if roster.grace_s <= 0:
                return contributors == members
            if roster.excused_step == step:
                return contributors == roster.required(step)
            return len(contributors) >= least and set(contributors) <= set(members)

        def redo(shards: list[int], answer: Roster) -> None:
            for k in shards:  # reduced another set: redo with the members
                del reports[k]
                fut = waiters.pop(k, None)
                if fut is not None and not fut.done():
                    fut.set_result(Redo(step, answer))

        redo([k for k, r in reports.items() if not quorum or not acceptable(r.contributors)], roster)
        if len(reports) < len(job.plan) or job.state != RUNNING:
            return
        proposals = {r.contributors for r in reports.values()}
        if len(proposals) > 1:  # quorum mode: shards proposed different sets
            common = set.intersection(*(set(p) for p in proposals))
            agreed = tuple(m for m in members if m in common)
            if len(agreed) >= least:  # close with the members every shard holds
                job.membership.excuse(step, tuple(w for w, lease in members if (w, lease) not in common))
                roster = job.membership.roster()
                log.info("job %s: step %d closes with workers %s (quorum, grace window over)", job.job_id, step, [w for w, _ in agreed])
            redo([k for k, r in reports.items() if r.contributors != agreed], roster)
            return
        contributors = proposals.pop()
        decision = decide(step, list(job.reports.pop(step).values()), job.config.max_grad_norm, job.guard, job.nan_handled)
        workers = tuple(w for w, _ in contributors)
        excused = {w for w, _ in members} - set(workers)  # quorum mode: members the step closed without
        missing = tuple(sorted(set(job.membership.take_missing(set(workers))) | excused))
        decision = dataclasses.replace(decision, workers=workers, missing=missing)
        if decision.missing:
            log.warning("job %s: step %d closed without workers %s", job.job_id, step, list(decision.missing))
        if not decision.apply:
            job.skips[decision.skip_reason] = job.skips.get(decision.skip_reason, 0) + 1
            self.telemetry.inc("paramserver_job_skipped_steps", job_id=job.job_id, reason=decision.skip_reason)
        elif decision.clip_coef < 1.0:
            self.telemetry.inc("paramserver_job_clipped_steps", job_id=job.job_id)
        self.telemetry.inc("paramserver_job_steps", job_id=job.job_id)
        job.decided_at.append(self.clock())
        # what a snapshot at version step + 1 must carry (training may move on while it is written)
        job.history_at[step + 1] = (tuple(job.guard.norms) if job.guard is not None else (), dict(job.skips))
        job.history_at.pop(step + 1 - DECISIONS_KEPT, None)
        self._log({"t": "decision", "job_id": job.job_id, "step": step, "decision": dataclasses.asdict(decision),
                   "skips": dict(job.skips), "norms": list(job.guard.norms) if job.guard is not None else []})  # fmt: skip
        job.decisions[step] = decision
        job.decided_version = max(job.decided_version, step + 1)
        snapshot = job.policy.due(step) and not job.snapshot_lock.locked()  # skipped while one is being written
        if snapshot:
            job.policy.started(step + 1)
            self._spawn(self._policy_snapshot(job.job_id))
        every = job.config.replica_every_steps
        # not with a snapshot of the same version: a shard copies one at a time, and the replica
        # would make the snapshot retry at a later version; the snapshot covers this version
        if every and (step + 1) % every == 0 and not job.replicating and not snapshot:
            job.replicating = True
            self._spawn(self._replicate(job, step + 1))
        for old in [s for s in job.decisions if s < step - DECISIONS_KEPT]:
            del job.decisions[old]
        for fut in job.waiters.pop(step, {}).values():
            if not fut.done():
                fut.set_result(decision)

    # ---- leases -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Start the watcher of shards and leases (once)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_jobs())

    async def _watch_jobs(self) -> None:
        """Recover jobs that lost a shard; expire the leases of members nobody heard from."""
        while True:
            jobs = [j for j in self.jobs.values() if j.state == RUNNING]
            tick = min((j.config.worker_timeout_s / 4 for j in jobs), default=WATCH_INTERVAL_S)
            with contextlib.suppress(TimeoutError):  # a tick, or a dead shard noticed elsewhere
                await asyncio.wait_for(self._wake.wait(), min(max(tick, 0.05), WATCH_INTERVAL_S))
            self._wake.clear()
            for job in [j for j in self.jobs.values() if j.state == RUNNING]:
                try:
                    lost = await self._lost_shards(job)
                    if lost and job.state == RUNNING:
                        job.state = RECOVERING
                        job.state_reason = f"{Reason.SHARD_LOST}: shard(s) {lost} lost; restoring"
                        job.last_recovery = {"detected_at": self.clock()}
                        self._spawn(self._recover(job, lost))
                    elif job.membership.overdue():
                        await self._expire(job)
                except Exception:
                    log.exception("job %s: watching", job.job_id)

    async def _lost_shards(self, job: _Job) -> list[int]:
        """The shards whose actor is gone (a slow answer is not a loss)."""

        async def dead(shard: ShardHandle) -> bool:
            try:
                await asyncio.wait_for(shard.status(), STATUS_TIMEOUT_S)
            except ParamServerError as exc:
                return exc.metadata.get("actor") == "dead"
            except Exception:  # noqa: BLE001 - a timeout: slow, not lost
                return False
            return False

        flags = await asyncio.gather(*(dead(s) for s in job.shards))
        return [i for i, d in enumerate(flags) if d]

    # ---- recovery ---------------------------------------------------------------------------

    async def _recover(self, job: _Job, lost: list[int], survivors: Mapping[int, ShardHandle] | None = None) -> None:
        """Bring a job that lost shards back to one consistent version, under a new generation
        (workers learn it from ABORTED JOB_ROLLED_BACK): the surviving shards restore in place and
        the lost ones start again, all from the newest replica or snapshot (whichever is newer).
        Neither: the job fails."""
        if survivors is None:
            survivors = {i: s for i, s in enumerate(job.shards) if i not in lost}
        log.warning("job %s: shard(s) %s lost; recovering", job.job_id, lost)
        try:
            async with job.lock:
                self._interrupt(job, f"job {job.job_id!r} lost a shard and is being restored")
                found = await asyncio.to_thread(self._restorable, job.job_id)
                replica = job.replica
                if replica is not None and (found is None or replica[0].version >= found[1].version):
                    manifest, files = replica  # newer than any snapshot, and no disk to read
                    ref = SnapshotRef(job.job_id, f"replica-{manifest.version:010d}")
                    restore = Restore(MEMORY_URL, ref.job_id, ref.name, manifest.version, manifest.applied, files, manifest.to_json())
                    source = f"replica at version {manifest.version}"
                elif found is not None:
                    ref, manifest = found
                    restore = Restore(self.store.url, ref.job_id, ref.name, manifest.version, manifest.applied)
                    source = f"snapshot {self.store.path(ref)}"
                else:
                    await asyncio.gather(*(s.stop() for s in survivors.values()), return_exceptions=True)
                    self._fail(job, f"{Reason.SHARD_LOST}: shard(s) {lost} lost and the job has no snapshot or replica to restore from "
                                    "(set snapshot_every_steps or replica_every_steps)")  # fmt: skip
                    return
                try:
                    await self._restore_to(job, restore, manifest, survivors, source)
                except ParamServerError as exc:
                    if exc.metadata.get("replica") != "lost" or found is None:
                        raise
                    log.warning("job %s: %s; restoring from the snapshot instead", job.job_id, exc.message)
                    job.replica = None
                    ref, manifest = found
                    restore = Restore(self.store.url, ref.job_id, ref.name, manifest.version, manifest.applied)
                    await self._restore_to(job, restore, manifest, {}, f"snapshot {self.store.path(ref)} (the replica was lost)")
        except Exception as exc:
            log.exception("job %s: recovery failed", job.job_id)
            self._fail(job, f"{Reason.SHARD_LOST}: recovery failed: {exc}")

    @staticmethod
    def _interrupt(job: _Job, why: str) -> None:
        """Fail every waiter of the job's open step (UNAVAILABLE JOB_RECOVERING) and forget the step."""
        gone = ParamServerError("UNAVAILABLE", Reason.JOB_RECOVERING, why)
        for waiters in job.waiters.values():
            for fut in waiters.values():
                if not fut.done():
                    fut.set_exception(gone)
        job.waiters.clear()
        job.reports.clear()

    async def _restore_to(self, job: _Job, restore: Restore, manifest: Manifest, survivors: Mapping[int, ShardHandle], source: str) -> None:
        """(Under the job's lock.) Every shard of the job at `restore` under a new generation: the
        `survivors` restore in place, the others start anew; then the job runs again from the
        restored version."""
        self._log({"t": "state", "job_id": job.job_id, "state": RECOVERING, "reason": job.state_reason})
        job.generation += 1
        job.membership.clear_excuse()
        shards = await self._restart(job, restore, survivors)
        if shards is None:
            return
        if job.deleted:
            await asyncio.gather(*(s.stop() for s in shards), return_exceptions=True)
            return
        job.shards = list(shards)
        job.decisions = {k: v for k, v in job.decisions.items() if k < manifest.version}
        job.history_at.clear()
        job.skips = dict(manifest.skips)
        if job.guard is not None:
            c = job.config
            job.guard = SpikeGuard(c.spike_window, c.spike_warmup, c.spike_threshold_std, list(manifest.spike_norms))
        job.policy.restored(manifest.version)
        job.decided_version = manifest.version
        job.recoveries += 1
        self._log({"t": "shards", "job_id": job.job_id, "generation": job.generation, "names": [s.name for s in shards]})
        self._log({"t": "restored", "job_id": job.job_id, "version": manifest.version, "skips": dict(manifest.skips),
                   "norms": list(manifest.spike_norms)})  # fmt: skip
        self._log({"t": "state", "job_id": job.job_id, "state": RUNNING, "recoveries": job.recoveries})
        job.state, job.state_reason, job.recovered_from = RUNNING, "", source
        job.replica = None if job.replica is None or job.replica[0].version > manifest.version else job.replica
        job.last_recovery.update(restored_at=self.clock(), version=float(manifest.version))
        took = job.last_recovery["restored_at"] - job.last_recovery.get("detected_at", job.last_recovery["restored_at"])
        log.warning(
            "job %s: restored to version %d from %s in %.2f s (generation %d)",
            job.job_id, manifest.version, source, took, job.generation,
        )  # fmt: skip

    async def _replicate(self, job: _Job, version: int) -> None:
        """Copy every shard's state at `version` into memory (one round; skipped, not retried, if a
        shard moved on or is busy with a snapshot: the next round comes `replica_every_steps` later)."""
        try:
            name = f"replica-{version:010d}"
            results = await asyncio.gather(*(s.replicate(job.job_id, name, version) for s in job.shards), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for error in errors:
                self._noticed(job, error)
            if errors:
                log.info("job %s: replica at version %d skipped (%s)", job.job_id, version, errors[0])
                return
            done = [r for r in results if isinstance(r, tuple)]
            current = (tuple(job.guard.norms) if job.guard is not None else (), dict(job.skips))
            norms, skips = job.history_at.get(version, current)
            manifest = Manifest.build(job.job_id, version, job.config, [e for e, _ in done], norms, skips)
            if job.replica is None or job.replica[0].version < version:
                job.replica = (manifest, {e.file: data for e, data in done})
        except Exception:
            log.exception("job %s: replica at version %d failed", job.job_id, version)
        finally:
            job.replicating = False

    def _restorable(self, job_id: str) -> tuple[SnapshotRef, Manifest] | None:
        """The newest committed snapshot of a job whose files verify."""
        for ref in reversed(self.store.snapshots(job_id)):
            try:
                return ref, verify(self.store, ref)
            except ParamServerError as exc:
                log.error("job %s: snapshot %s is not usable for recovery: %s", job_id, self.store.path(ref), exc)
        return None

    async def _restart(self, job: _Job, restore: Restore, survivors: Mapping[int, ShardHandle]) -> list[ShardHandle] | None:
        """Every shard of the job at `restore`: the survivors restored in place (one that fails to
        is stopped and started anew), the others started; in shard order."""
        roster = job.membership.roster()
        kept: dict[int, ShardHandle] = {}

        async def reset(i: int, shard: ShardHandle) -> None:
            try:
                mine = restore_for(restore, i, shard_file)
                assert mine is not None
                await asyncio.wait_for(shard.reset(mine, roster, job.generation), RESET_TIMEOUT_S)
                kept[i] = shard
            except Exception as exc:  # noqa: BLE001 - started anew instead
                log.warning("job %s: shard %d could not restore in place (%s); starting it anew", job.job_id, i, exc)
                await shard.stop()

        await asyncio.gather(*(reset(i, s) for i, s in survivors.items()))
        missing = [i for i in range(len(job.plan)) if i not in kept]
        try:
            started = await self._relaunch(job, restore, missing) if missing else []
        except BaseException:  # a lost replica (see _recover) or a cancellation: the kept ones stop too
            await asyncio.gather(*(s.stop() for s in kept.values()), return_exceptions=True)
            raise
        if started is None:
            await asyncio.gather(*(s.stop() for s in kept.values()), return_exceptions=True)
            return None
        by_index = {**kept, **dict(zip(missing, started, strict=True))}
        return [by_index[i] for i in range(len(job.plan))]

    async def _relaunch(self, job: _Job, restore: Restore, only: Sequence[int]) -> list[ShardHandle] | None:
        """Start the job's shards `only` from `restore`, retrying while the cluster lacks room."""
        for attempt in range(1, RECOVERY_ATTEMPTS + 1):
            try:
                roster = job.membership.roster()
                return await self.launcher.launch(job.job_id, job.config, job.plan, restore, roster, job.generation, only)
            except ParamServerError as exc:
                if exc.metadata.get("replica") == "lost":
                    raise
                log.warning("job %s: relaunching its shards failed (attempt %d): %s", job.job_id, attempt, exc)
                if attempt == RECOVERY_ATTEMPTS or job.deleted:
                    self._fail(job, f"{Reason.SHARD_LOST}: its shards could not be started again: {exc.message}")
                    return None
                await asyncio.sleep(min(0.5 * attempt, 5.0))
        return None

    def _fail(self, job: _Job, reason: str) -> None:
        job.state, job.state_reason = FAILED, reason
        self._log({"t": "state", "job_id": job.job_id, "state": FAILED, "reason": reason})
        log.error("job %s failed: %s", job.job_id, reason)

    async def _expire(self, job: _Job) -> None:
        statuses = await asyncio.gather(*(self._status(job, s) for s in job.shards))
        for st in statuses:  # a push or pull on a shard renews the lease too
            for wid, age in (st.last_seen if st is not None else {}).items():
                job.membership.seen(wid, age)
        async with job.lock:
            overdue = job.membership.overdue()
            for member in overdue:
                action = job.membership.expire(member)
                log.warning("job %s: worker %d (%s) lost its lease: %s", job.job_id, member.worker_id, member.name, action)
                if action == "removed":
                    self._log({"t": "leave", "job_id": job.job_id, "worker_id": member.worker_id})
                elif action == "lost":
                    self._log({"t": "lost", "job_id": job.job_id, "worker_id": member.worker_id, "lost": True})
                else:
                    self._fail(job, f"{Reason.WORKER_LOST}: {job.membership.failed}")
            if overdue:
                await self._push_roster(job)

    async def create_snapshot(self, request_id: str, job_id: str) -> dict[str, Any]:
        """Take a consistent snapshot (all shards at one version) and commit it once durable."""
        await self.start()
        _require(request_id)
        first = self.ledger.lookup(request_id, ("snapshot", job_id))
        if isinstance(first, dict):
            return first
        job = self._job(job_id)
        if job.snapshot_lock.locked():
            raise ParamServerError("ABORTED", Reason.SNAPSHOT_IN_PROGRESS, f"a snapshot of job {job_id!r} is being written")
        async with job.snapshot_lock:
            await self._check_snapshot_quota(job)
            result = await self._snapshot(job)
        self._remember(request_id, ("snapshot", job_id), result)
        return result

    async def _policy_snapshot(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.snapshot_lock.locked():
            return  # policy: skip while one is being written
        try:
            async with job.snapshot_lock:
                await self._check_snapshot_quota(job)
                await self._snapshot(job)
        except ParamServerError as exc:
            log.error("job %s: periodic snapshot not taken: %s", job_id, exc)
        except Exception:
            log.exception("job %s: periodic snapshot failed", job_id)

    async def _check_snapshot_quota(self, job: _Job) -> None:
        """RESOURCE_EXHAUSTED (QUOTA_EXCEEDED snapshot_bytes) when the tenant's committed snapshots
        plus this one (estimated as the job's newest snapshot, or its parameter bytes) pass the quota."""
        if not job.quota.snapshot_bytes:
            return
        owned = sorted({j for j, t in self.owners.items() if t == job.tenant} | {j.job_id for j in self._tenant_jobs(job.tenant)})
        sizes = {j: [int(s["bytes"]) for s in await self.list_snapshots(j)] for j in owned}
        own = sizes.get(job.job_id, [])
        estimate = own[-1] if own else 4 * job.config.total_elements
        job.quota.check("snapshot_bytes", sum(sum(v) for v in sizes.values()), estimate)

    async def _snapshot(self, job: _Job, attempts: int = 200) -> dict[str, Any]:
        began = time.perf_counter()
        result = await self._take_snapshot(job, attempts)
        took = time.perf_counter() - began
        self.telemetry.observe("paramserver_snapshot_seconds", took, SNAPSHOT_BUCKETS, job_id=job.job_id)
        self.telemetry.inc("paramserver_snapshot_bytes", float(result.get("bytes", 0)), job_id=job.job_id)
        job.last_snapshot = (int(result["version"]), str(result["path"]), self.clock())
        return result

    async def _take_snapshot(self, job: _Job, attempts: int) -> dict[str, Any]:
        store = self.store
        await asyncio.to_thread(store.clean, job.job_id)
        for _ in range(attempts):
            statuses = await asyncio.gather(*(s.status() for s in job.shards))
            if not all(st.initialized for st in statuses):
                raise ParamServerError.precondition(Reason.PARAMETERS_NOT_INITIALIZED, "no parameters to snapshot yet")
            version = max(st.version for st in statuses)
            taken = await asyncio.to_thread(self._committed_at, job.job_id, version)
            if taken is not None:  # this version is already saved (names only tell seconds apart: never reuse one)
                return taken
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
            retry = (Reason.STEP_ALREADY_APPLIED, Reason.SNAPSHOT_IN_PROGRESS)  # moved on, or a replica being copied
            moved = [e for e in errors if isinstance(e, ParamServerError) and e.reason in retry]
            busy = any(isinstance(e, ParamServerError) and e.reason == Reason.SNAPSHOT_IN_PROGRESS for e in errors)
            if len(moved) != len(errors):
                first_error = errors[0]
                raise ParamServerError(
                    "INTERNAL", Reason.SNAPSHOT_FAILED, f"snapshot of job {job.job_id!r} failed: {first_error}"
                ) from first_error
            await asyncio.sleep(0.1 if busy else 0.01)  # a shard moved on between the version check and its copy: retry
        raise ParamServerError("UNAVAILABLE", Reason.SNAPSHOT_FAILED, f"job {job.job_id!r} never paused at a common version")

    def _committed_at(self, job_id: str, version: int) -> dict[str, Any] | None:
        """The summary of a committed snapshot of the job at `version`, if there is one."""
        prefix = snapshot_name(version).split("-", 1)[0] + "-"
        for ref in reversed(self.store.snapshots(job_id)):
            if ref.name.startswith(prefix):
                return self.store.read_manifest(ref).summary(self.store.path(ref))
        return None

    async def rollback_job(self, request_id: str, job_id: str, snapshot: str, expected_generation: int | None = None) -> JobView:
        """Restore a running job in place to `snapshot` (a snapshot of the same training, e.g. one
        a checkpoint refers to): every shard restores its state, the job goes on from the
        snapshot's version under a new generation, and workers learn it from ABORTED
        JOB_ROLLED_BACK (resume_version). Idempotent per request id. With `expected_generation`,
        only if the job is still at that generation (else ABORTED GENERATION_CHANGED)."""
        await self.start()
        _require(request_id)
        if not snapshot:
            raise ParamServerError.invalid("snapshot", "required: a snapshot path, or JOB_ID / JOB_ID:latest")
        job = self._job(job_id)
        if self.ledger.lookup(request_id, ("rollback", job_id, snapshot)) is not None:
            return await self._view(job)
        self._running(job)
        ref = await asyncio.to_thread(resolve, self.store, snapshot)
        if job.membership.secured:
            self._check_owner(ref.job_id, job.tenant, "snapshot")
        manifest = await asyncio.to_thread(verify, self.store, ref)
        if not job.config.trains_like(manifest.job_config()):
            raise ParamServerError.precondition(
                Reason.SNAPSHOT_INCOMPATIBLE,
                f"snapshot {self.store.path(ref)} was taken of another training than job {job_id!r} "
                "(parameters, rules, schedule or clipping differ)",
                field="snapshot",
            )
        async with job.lock:
            if self.ledger.lookup(request_id, ("rollback", job_id, snapshot)) is not None:
                return await self._view(job)
            self._running(job)
            if expected_generation is not None and expected_generation != job.generation:
                raise ParamServerError(
                    "ABORTED",
                    Reason.GENERATION_CHANGED,
                    f"job {job_id!r} is at generation {job.generation}, not {expected_generation}: it was rolled back or "
                    "recovered meanwhile (read it again with GetJob)",
                    {"generation": job.generation, "current_version": job.decided_version},
                )
            path = self.store.path(ref)
            job.state, job.state_reason = RECOVERING, f"rolling back to snapshot {path} (requested)"
            job.last_recovery = {"detected_at": self.clock()}
            self._interrupt(job, f"job {job_id!r} is being rolled back to snapshot {path}")
            restore = Restore(self.store.url, ref.job_id, ref.name, manifest.version, manifest.applied)
            try:
                await self._restore_to(job, restore, manifest, dict(enumerate(job.shards)), f"snapshot {path} (rollback)")
            except Exception as exc:
                log.exception("job %s: rollback failed", job_id)
                self._fail(job, f"rollback to {path} failed: {exc}")
                raise
            self._remember(request_id, ("rollback", job_id, snapshot), True)
        log.info("job %s: rolled back to version %d (snapshot %s)", job_id, manifest.version, path)
        return await self._view(job)

    async def list_snapshots(self, job_id: str) -> list[dict[str, Any]]:
        """Committed snapshots of a job, oldest first."""
        await self.start()
        check_job_id(job_id)
        found = await asyncio.to_thread(lambda: list(iter_snapshots(self.store, job_id)))
        # a snapshot with an unreadable manifest is left out here and reported by verify
        return [m.summary(self.store.path(ref)) for ref, m in found if m is not None]

    async def telemetry_export(self, log_since: int = 0) -> dict[str, Any]:
        """The jobs' metric series (gauges refreshed now), the shards to gather theirs from, and
        this actor's log records after `log_since` (see paramserver.metrics, log_relay)."""
        t = self.telemetry
        for name in ("paramserver_job_version", "paramserver_job_workers", "paramserver_job_recoveries"):
            t.forget(name)  # deleted jobs' series go
        for job in list(self.jobs.values()):
            t.set("paramserver_job_version", job.decided_version, job_id=job.job_id)
            members = list(job.membership.members.values())
            t.set("paramserver_job_workers", sum(not m.lost for m in members), job_id=job.job_id, state="live")
            t.set("paramserver_job_workers", sum(m.lost for m in members), job_id=job.job_id, state="lost")
            t.set("paramserver_job_recoveries", job.recoveries, job_id=job.job_id)
        return {
            "samples": t.export(),
            "logs": t.logs.since(log_since),
            "log_ring": t.logs.instance,
            "shards": {j.job_id: list(j.shards) for j in self.jobs.values() if j.state != CREATING},
        }

    async def shard_handles(self, job_id: str) -> list[ShardHandle]:
        """The handles of a job's shards (inspection and tests)."""
        await self.start()
        return list(self._job(job_id).shards)

    async def ping(self) -> bool:
        """True once the coordinator serves (after replaying its journal)."""
        await self.start()
        return True

    async def incarnation(self) -> str:
        """An id of this (re)start of the coordinator (tests and tools)."""
        return self.instance

    async def shutdown(self) -> None:
        """Stop every job's shards (and the launcher's spares)."""
        for job_id in list(self.jobs):
            await self.delete_job(f"shutdown-{job_id}-{uuid.uuid4().hex}", job_id)
        await self.launcher.close()


def _decision(d: Mapping[str, Any]) -> Decision:
    """A Decision from its journaled fields."""
    return Decision(**{**d, "workers": tuple(d.get("workers", ())), "missing": tuple(d.get("missing", ())), "lrs": tuple(d.get("lrs", ()))})


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
