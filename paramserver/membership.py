"""A job's members and their leases (pure: no Ray, no gRPC, no torch).

A worker joins and gets a worker id and a *lease* (a number unique within the job). The lease is
renewed by heartbeats and by the worker's pushes and pulls; one not renewed for the job's
``worker_timeout_s`` is *overdue*, and the job's loss policy says what that does:

* WAIT: the member keeps its slot (marked lost) and steps wait for it, until it renews, rejoins
  under its name, or another worker joins in its slot;
* CONTINUE: the member is removed; the open step closes with the members that pushed it;
* FAIL: the job fails.

Rejoining under the same name gives the same worker id with a new lease: every shard drops what
the older lease pushed for the open step, so a step never mixes two incarnations of a worker.
What the shards must agree on is the :class:`Roster` (members and their leases, the quorum, a
failure), versioned by an epoch so that an older roster never overwrites a newer one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from paramserver.errors import ParamServerError, Reason

#: WorkerLossPolicy values (paramserver.v1.WorkerLossPolicy).
WAIT, CONTINUE, FAIL = 1, 2, 3

Clock = Callable[[], float]


@dataclass
class Member:
    """One member of a job."""

    worker_id: int
    name: str
    lease: int
    renewed_at: float
    """Clock time its lease was last renewed."""
    lost: bool = False
    """Its lease expired and the job keeps its slot (WAIT)."""


@dataclass(frozen=True)
class Roster:
    """What every shard of a job applies: the members' leases, the quorum and a failure."""

    epoch: int
    """Increases with every change; a shard ignores a roster older than the one it has."""
    members: tuple[tuple[int, int], ...] = ()
    """(worker id, lease) of every member, ascending by worker id."""
    min_workers: int = 1
    """A step closes only with at least this many contributions."""
    failed: str = ""
    """Non-empty when the job failed: the message pushes and pulls answer with."""
    tokens: tuple[tuple[str, float], ...] = ()
    """(SHA-256 hex of a worker token, Unix time it expires or 0 = never) the job's ports accept."""
    secured: bool = False
    """Every data-plane call must carry one of `tokens` (the service runs with credentials)."""
    max_streams: int = 0
    """Concurrent streams one shard of the job serves (0 = the service's default)."""
    grace_s: float = 0.0
    """Quorum mode (JobSpec.grace_window_s): once min_workers members pushed, a shard waits this
    long for the others, then proposes the step with those it holds (0 = wait for every member)."""
    excused: tuple[int, ...] = ()
    """Members step `excused_step` closes without (the coordinator's choice in quorum mode)."""
    excused_step: int = -1

    def required(self, step: int) -> tuple[tuple[int, int], ...]:
        """The members whose push step `step` needs: all of them, less those excused for it."""
        if step != self.excused_step:
            return self.members
        return tuple(m for m in self.members if m[0] not in self.excused)

    def lease_of(self, worker_id: int) -> int | None:
        """The lease `worker_id` holds, or None if it is not a member."""
        return next((lease for w, lease in self.members if w == worker_id), None)


@dataclass
class Membership:
    """The members of one job and its membership policy."""

    min_workers: int
    max_workers: int
    timeout_s: float
    policy: int = WAIT
    clock: Clock = time.monotonic
    next_lease: int = 1
    """The lease the next join gets (a restarted coordinator continues from its journal)."""
    members: dict[int, Member] = field(default_factory=dict)
    epoch: int = 0
    failed: str = ""
    removed: set[int] = field(default_factory=set)
    """Members removed since the last step closed (reported as the step's missing workers)."""
    tokens: tuple[tuple[str, float], ...] = ()
    """The worker tokens the job's shards accept (see Roster.tokens)."""
    secured: bool = False
    """The shards require one of `tokens`."""
    max_streams: int = 0
    """Concurrent streams per shard (0 = the service's default)."""
    grace_s: float = 0.0
    """See Roster.grace_s."""
    excused: tuple[int, ...] = ()
    excused_step: int = -1

    def _changed(self) -> None:
        self.epoch += 1
        self.excused, self.excused_step = (), -1  # any change re-opens the quorum question

    def roster(self) -> Roster:
        """The current roster."""
        members = tuple((w, self.members[w].lease) for w in sorted(self.members))
        return Roster(
            self.epoch,
            members,
            self.min_workers,
            self.failed,
            self.tokens,
            self.secured,
            self.max_streams,
            self.grace_s,
            self.excused,
            self.excused_step,
        )

    def excuse(self, step: int, workers: tuple[int, ...]) -> None:
        """Let step `step` close without `workers` (quorum mode; a new roster epoch)."""
        self._changed()
        self.excused, self.excused_step = tuple(sorted(workers)), step

    def clear_excuse(self) -> None:
        """Forget an excuse (the job was restored: the step is played again from the start)."""
        if self.excused_step != -1:
            self._changed()

    def set_tokens(self, tokens: tuple[tuple[str, float], ...]) -> None:
        """Change the accepted worker tokens (a new roster epoch: the shards adopt them)."""
        self.tokens = tokens
        self._changed()

    def join(self, name: str) -> Member:
        """Admit a worker: the same id (with a new lease) for a name already joined, else the lowest
        free id, else the slot of a lost member; FAILED_PRECONDITION (JOB_FULL) when every slot is
        held by a live lease."""
        self._require_running()
        now = self.clock()
        same = next((m for m in self.members.values() if name and m.name == name), None)
        if same is not None:
            wid = same.worker_id
        else:
            free = [w for w in range(self.max_workers) if w not in self.members]
            lost = sorted(m.worker_id for m in self.members.values() if m.lost)
            if not free and not lost:
                raise ParamServerError.precondition(
                    Reason.JOB_FULL, f"the job already has {self.max_workers} members (max_workers) with live leases"
                )
            wid = free[0] if free else lost[0]
        member = Member(wid, name, self.next_lease, now)
        self.next_lease += 1
        self.members[wid] = member
        self.removed.discard(wid)
        self._changed()
        return member

    def check(self, worker_id: int, lease: int) -> Member:
        """The member holding `lease`; ABORTED LEASE_SUPERSEDED (an older incarnation) or
        LEASE_EXPIRED (left or removed) otherwise."""
        member = self.members.get(worker_id)
        if member is not None and member.lease == lease:
            return member
        if member is not None and 0 < lease < member.lease:
            raise ParamServerError(
                "ABORTED",
                Reason.LEASE_SUPERSEDED,
                f"worker {worker_id} rejoined (lease {member.lease}); lease {lease} is an older incarnation",
                {"worker_id": worker_id},
            )
        raise ParamServerError(
            "ABORTED",
            Reason.LEASE_EXPIRED,
            f"worker {worker_id} holds no lease {lease} (it left or its lease expired): join again",
            {"worker_id": worker_id},
        )

    def renew(self, worker_id: int, lease: int) -> Member:
        """Renew a lease (a lost member under WAIT comes back)."""
        member = self.check(worker_id, lease)
        member.renewed_at = self.clock()
        if member.lost:
            member.lost = False
            self._changed()
        return member

    def seen(self, worker_id: int, age_s: float) -> None:
        """A shard served `worker_id` `age_s` seconds ago: that renews its lease too."""
        member = self.members.get(worker_id)
        if member is not None:
            member.renewed_at = max(member.renewed_at, self.clock() - age_s)

    def leave(self, worker_id: int, lease: int = 0) -> Member:
        """Remove a member (its lease, if given, must be the current one)."""
        member = self.members.get(worker_id)
        if member is None:
            raise ParamServerError.not_found(Reason.WORKER_NOT_FOUND, f"worker {worker_id} is not a member", worker_id=worker_id)
        if lease:
            self.check(worker_id, lease)
        del self.members[worker_id]
        self.removed.add(worker_id)
        self._changed()
        return member

    def overdue(self) -> list[Member]:
        """Members whose lease ran out and that were not handled yet."""
        now = self.clock()
        return [m for m in self.members.values() if not m.lost and now - m.renewed_at > self.timeout_s]

    def expire(self, member: Member) -> str:
        """Apply the loss policy to an overdue member; returns "lost" (WAIT: kept, marked lost),
        "removed" (CONTINUE) or "failed" (FAIL)."""
        idle = self.clock() - member.renewed_at
        if self.policy == CONTINUE:
            del self.members[member.worker_id]
            self.removed.add(member.worker_id)
            self._changed()
            return "removed"
        if self.policy == FAIL:
            self.failed = f"worker {member.worker_id} ({member.name or 'unnamed'}) was lost: no heartbeat, push or pull for {idle:.1f} s"
            self._changed()
            return "failed"
        member.lost = True
        self._changed()
        return "lost"

    def take_missing(self, contributors: set[int]) -> tuple[int, ...]:
        """The members removed while the step that just closed was open and not in it."""
        missing = tuple(sorted(self.removed - contributors))
        self.removed.clear()
        return missing

    def _require_running(self) -> None:
        if self.failed:
            raise ParamServerError.precondition(Reason.JOB_FAILED, f"the job failed: {self.failed}")


__all__ = ["CONTINUE", "FAIL", "WAIT", "Member", "Membership", "Roster"]
