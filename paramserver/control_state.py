"""The control plane's durable state: what the coordinator journals and replays (pure: no Ray, no
gRPC, no torch).

Every change the coordinator makes to a job (created, shards started, a member joined or left, a
step decided, a recovery, a deletion) and every answer it must give again to a retried request
(the create/join/leave/delete/snapshot ledger) is one record appended to a :class:`Journal`
(``paramserver.journal``: CRC-framed msgpack, torn tails cut off). :class:`ControlState` folds the
records into plain per-job data (:class:`JobRecord`) that a restarted coordinator turns back into
its live objects; :meth:`ControlState.records` writes the folded state as the few records a
compacted journal starts with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver.journal import Journal

log = logging.getLogger(__name__)

#: Decisions kept per job in the journal's folded state (as in the coordinator).
DECISIONS_KEPT = 64
#: Ledger entries kept (as the coordinator's ledger).
LEDGER_KEPT = 65536
#: Records appended after which the journal is compacted.
COMPACT_EVERY = 20000


@dataclass
class JobRecord:
    """What the journal knows of one job."""

    job_id: str
    config: dict[str, Any]
    """``JobConfig.to_dict()``."""
    restore: dict[str, Any] | None = None
    """The snapshot it was created from (``Restore`` fields), if any."""
    generation: int = 0
    shard_names: list[str] = field(default_factory=list)
    """The shard actors of the current generation, in shard order."""
    state: str = "CREATING"
    state_reason: str = ""
    recoveries: int = 0
    members: dict[int, list[Any]] = field(default_factory=dict)
    """worker id -> [name, lease, lost]."""
    next_lease: int = 1
    removed: list[int] = field(default_factory=list)
    """Members removed since the last decision (the next step's missing workers)."""
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    """step -> the Decision's fields (the newest DECISIONS_KEPT)."""
    decided_version: int = 0
    skips: dict[str, int] = field(default_factory=dict)
    norms: list[float] = field(default_factory=list)
    """The spike guard's window (finite pre-clip norms, oldest first)."""
    tenant: str = ""
    """The tenant that owns the job ("" without credentials)."""
    quota: dict[str, int] = field(default_factory=dict)
    """The tenant's quotas when the job was created (``Quota`` fields)."""
    secured: bool = False
    """The job's ports require a worker token."""
    tokens: list[list[Any]] = field(default_factory=list)
    """[SHA-256 hex, expiry] of its accepted worker tokens."""


def _freeze(value: Any) -> Any:
    """msgpack gives lists back where the coordinator used tuples (ledger fingerprints)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class ControlState:
    """The folded records of a journal."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.ledger: dict[str, tuple[Any, Any]] = {}
        """request id -> (fingerprint, answer), oldest first."""
        self.owners: dict[str, str] = {}
        """job id -> the tenant that created it, kept after the job is deleted (its snapshots
        remain that tenant's)."""

    def apply(self, r: Mapping[str, Any]) -> None:
        """Fold one record in (unknown kinds are ignored: a newer writer's records)."""
        kind = r.get("t")
        if kind == "ledger":
            self.ledger.pop(r["id"], None)
            self.ledger[r["id"]] = (_freeze(r["fp"]), _freeze(r["answer"]))
            while len(self.ledger) > LEDGER_KEPT:
                del self.ledger[next(iter(self.ledger))]
            return
        if kind == "owner":
            self.owners[str(r["job_id"])] = str(r["tenant"])
            return
        if kind == "job":
            if r.get("tenant"):
                self.owners[str(r["job_id"])] = str(r["tenant"])
            known = {f.name for f in dataclasses.fields(JobRecord)}
            created = JobRecord(**{k: v for k, v in r.items() if k in known})
            created.members = {int(w): list(m) for w, m in created.members.items()}
            created.decisions = {int(s): dict(d) for s, d in created.decisions.items()}
            self.jobs[created.job_id] = created
            return
        job = self.jobs.get(str(r.get("job_id", "")))
        if job is None:
            return
        if kind == "delete":
            del self.jobs[job.job_id]
        elif kind == "shards":
            job.generation, job.shard_names = int(r["generation"]), list(r["names"])
        elif kind == "state":
            job.state, job.state_reason = str(r["state"]), str(r.get("reason", ""))
            job.recoveries = int(r.get("recoveries", job.recoveries))
        elif kind == "join":
            job.members[int(r["worker_id"])] = [r["name"], int(r["lease"]), False]
            job.next_lease = max(job.next_lease, int(r["lease"]) + 1)
            if int(r["worker_id"]) in job.removed:
                job.removed.remove(int(r["worker_id"]))
        elif kind == "leave":
            job.members.pop(int(r["worker_id"]), None)
            if int(r["worker_id"]) not in job.removed:
                job.removed.append(int(r["worker_id"]))
        elif kind == "lost":
            if int(r["worker_id"]) in job.members:
                job.members[int(r["worker_id"])][2] = bool(r.get("lost", True))
        elif kind == "decision":
            step = int(r["step"])
            job.decisions[step] = dict(r["decision"])
            for old in [s for s in job.decisions if s <= step - DECISIONS_KEPT]:
                del job.decisions[old]
            job.decided_version = max(job.decided_version, step + 1)
            job.skips = dict(r.get("skips", job.skips))
            job.norms = list(r.get("norms", job.norms))
            job.removed = []
        elif kind == "tokens":
            job.tokens = [list(x) for x in r["tokens"]]
        elif kind == "restored":
            version = int(r["version"])
            job.decisions = {s: d for s, d in job.decisions.items() if s < version}
            job.decided_version = version
            job.skips = dict(r.get("skips", {}))
            job.norms = list(r.get("norms", []))

    def records(self) -> list[dict[str, Any]]:
        """The folded state as records (what a compacted journal holds)."""
        out: list[dict[str, Any]] = [{"t": "ledger", "id": rid, "fp": fp, "answer": answer} for rid, (fp, answer) in self.ledger.items()]
        out += [{"t": "owner", "job_id": j, "tenant": tenant} for j, tenant in self.owners.items()]
        for job in self.jobs.values():
            d = dataclasses.asdict(job)
            d["members"] = {str(w): m for w, m in job.members.items()}  # msgpack keys: strings are safest
            d["decisions"] = {str(s): dec for s, dec in job.decisions.items()}
            out.append({"t": "job", **d})
        return out


class ControlJournal:
    """A journal and its folded state: every record appended is also applied."""

    def __init__(self, path: Path, *, sync: bool = True) -> None:
        self.journal, records = Journal.open(path, sync=sync)
        self.state = ControlState()
        for r in records:
            self.state.apply(r)
        if records:
            log.info("replayed %d journal records from %s: %d job(s)", len(records), path, len(self.state.jobs))

    def append(self, record: Mapping[str, Any]) -> None:
        """Make a record durable, then fold it in; compact now and then."""
        self.journal.append(record)
        self.state.apply(record)
        if self.journal.records_since_compaction >= COMPACT_EVERY:
            self.journal.compact(self.state.records())

    def append_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Several records with one write."""
        batch = list(records)
        self.journal.append_many(batch)
        for r in batch:
            self.state.apply(r)

    def close(self) -> None:
        """Close the file."""
        self.journal.close()
