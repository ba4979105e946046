"""Members and leases (paramserver.membership): pure logic with a fake clock."""

from __future__ import annotations

import pytest

from paramserver.errors import ParamServerError, Reason
from paramserver.membership import CONTINUE, FAIL, WAIT, Membership


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def group(policy: int = WAIT, min_workers: int = 2, max_workers: int = 2) -> tuple[Membership, Clock]:
    clock = Clock()
    return Membership(min_workers, max_workers, timeout_s=10.0, policy=policy, clock=clock), clock


def test_rejoining_under_a_name_keeps_the_id_with_a_new_lease_and_supersedes_the_old_one() -> None:
    m, _ = group()
    a = m.join("a")
    b = m.join("b")
    assert (a.worker_id, b.worker_id) == (0, 1) and a.lease != b.lease
    epoch = m.epoch
    again = m.join("b")
    assert again.worker_id == 1 and again.lease > b.lease and m.epoch > epoch
    assert m.roster().members == ((0, a.lease), (1, again.lease))
    with pytest.raises(ParamServerError) as old:
        m.check(1, b.lease)
    assert (old.value.code, old.value.reason) == ("ABORTED", Reason.LEASE_SUPERSEDED)
    with pytest.raises(ParamServerError) as unknown:
        m.check(1, again.lease + 5)
    assert (unknown.value.code, unknown.value.reason) == ("ABORTED", Reason.LEASE_EXPIRED)


def test_a_full_job_refuses_a_new_name_until_a_slot_frees() -> None:
    m, _ = group()
    m.join("a")
    m.join("b")
    with pytest.raises(ParamServerError) as full:
        m.join("c")
    assert (full.value.code, full.value.reason) == ("FAILED_PRECONDITION", Reason.JOB_FULL)
    m.leave(0)
    assert m.join("c").worker_id == 0
    assert m.take_missing({0, 1}) == ()  # rejoined slot: not missing
    with pytest.raises(ParamServerError) as gone:
        m.leave(5)
    assert gone.value.reason == Reason.WORKER_NOT_FOUND


def test_wait_keeps_a_lost_members_slot_which_renewal_or_a_newcomer_takes_back() -> None:
    m, clock = group(WAIT)
    a, b = m.join("a"), m.join("b")
    clock.now += 5
    m.renew(0, a.lease)
    clock.now += 6  # b: 11 s without a renewal
    assert [x.worker_id for x in m.overdue()] == [1]
    assert m.expire(m.members[1]) == "lost"
    assert m.members[1].lost and m.roster().lease_of(1) == b.lease  # the step still waits for it
    assert m.overdue() == []  # handled once
    m.renew(1, b.lease)  # it was only slow
    assert not m.members[1].lost
    clock.now += 11
    m.renew(0, a.lease)
    m.expire(m.overdue()[0])
    newcomer = m.join("c")  # the job is full, but b's slot is lost: c takes it with a new lease
    assert newcomer.worker_id == 1 and m.roster().lease_of(1) == newcomer.lease


def test_a_renewal_seen_by_a_shard_counts() -> None:
    m, clock = group(CONTINUE)
    m.join("a")
    clock.now += 11
    m.seen(0, 2.0)  # a shard served it 2 s ago
    assert m.overdue() == []


def test_continue_removes_the_member_and_reports_it_missing_once() -> None:
    m, clock = group(CONTINUE, min_workers=1, max_workers=3)
    m.join("a"), m.join("b"), m.join("c")
    clock.now += 11
    m.renew(0, m.members[0].lease)
    m.renew(2, m.members[2].lease)
    (lost,) = m.overdue()
    assert m.expire(lost) == "removed" and 1 not in m.members and m.roster().lease_of(1) is None
    assert m.take_missing({0, 2}) == (1,)
    assert m.take_missing({0, 2}) == ()


def test_fail_fails_the_job_and_refuses_joins() -> None:
    m, clock = group(FAIL)
    m.join("a")
    clock.now += 11
    assert m.expire(m.overdue()[0]) == "failed"
    assert "worker 0 (a) was lost" in m.failed and m.roster().failed == m.failed
    with pytest.raises(ParamServerError) as refused:
        m.join("b")
    assert (refused.value.code, refused.value.reason) == ("FAILED_PRECONDITION", Reason.JOB_FAILED)
