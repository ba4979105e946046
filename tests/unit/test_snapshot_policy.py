"""The periodic snapshot policy with a fake clock (no sleeping), alone and driven by the coordinator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from paramserver import snapshot_names as names
from paramserver.coordinator import Coordinator, ShardHandle
from paramserver.gradnorm import NormPart
from paramserver.jobconfig import JobConfig
from paramserver.manifest import ShardEntry
from paramserver.membership import Roster
from paramserver.placement import Span
from paramserver.shard_types import Restore, ShardStatus
from paramserver.snapshot_policy import SnapshotPolicy
from paramserver.steps import Decision, ShardStats


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def due_steps(policy: SnapshotPolicy, steps: range) -> list[int]:
    """The steps whose decision makes a snapshot due, launching each one (as the coordinator does)."""
    out = []
    for step in steps:
        if policy.due(step):
            policy.started(step + 1)
            out.append(step)
    return out


def test_step_rule_counts_from_the_start() -> None:
    policy = SnapshotPolicy(every_steps=4, clock=FakeClock())
    assert due_steps(policy, range(13)) == [3, 7, 11]  # versions 4, 8, 12


def test_step_rule_counts_from_a_restore() -> None:
    policy = SnapshotPolicy(every_steps=4, clock=FakeClock())
    policy.restored(6)
    assert due_steps(policy, range(6, 15)) == [9, 13]  # versions 10, 14
    early = SnapshotPolicy(every_steps=4, clock=FakeClock())
    early.restored(2)
    assert due_steps(early, range(2, 8)) == [5]  # version 6 (K after the restore), not 4


def test_step_rule_takes_the_first_boundary_at_or_after_a_skipped_one() -> None:
    policy = SnapshotPolicy(every_steps=4, clock=FakeClock())
    assert [policy.due(s) for s in range(3)] == [False] * 3
    assert policy.due(3) and policy.due(4)  # not launched at version 4 (one was being written): still due
    policy.started(5)
    assert due_steps(policy, range(5, 10)) == [8]  # K steps after the snapshot actually launched (version 9)


def test_time_rule_is_due_after_t_seconds_and_restarts_when_a_snapshot_is_taken() -> None:
    clock = FakeClock()
    policy = SnapshotPolicy(every_seconds=10.0, clock=clock)
    clock.advance(9.9)
    assert not policy.due(0)
    clock.advance(0.1)
    assert policy.due(1) and policy.due(2)  # due until a snapshot is launched or committed
    policy.started(3)
    assert not policy.due(3)
    clock.advance(6.0)
    policy.committed()  # that one (or an on-demand one) committed: count from now
    clock.advance(9.0)
    assert not policy.due(4)
    clock.advance(1.0)
    assert policy.due(5)


def test_both_rules_together() -> None:
    clock = FakeClock()
    policy = SnapshotPolicy(every_steps=4, every_seconds=10.0, clock=clock)
    assert not policy.due(0)
    clock.advance(10.0)
    assert policy.due(1)  # the time rule
    policy.started(2)  # a periodic snapshot at version 2 moves the step boundary to 6
    assert [policy.due(s) for s in range(2, 5)] == [False] * 3
    assert policy.due(5)  # the step rule, with no time passed
    policy.started(6)
    clock.advance(10.0)
    assert policy.due(6)  # the time rule again, before the next boundary (10)


def test_a_committed_snapshot_restarts_only_the_time_rule() -> None:
    clock = FakeClock()
    policy = SnapshotPolicy(every_steps=4, every_seconds=10.0, clock=clock)
    clock.advance(8.0)
    policy.committed()  # an on-demand snapshot at version 2, say
    clock.advance(8.0)
    assert not policy.due(2)
    assert policy.due(3)  # the step boundary stays at version 4


def test_a_rule_at_0_is_off() -> None:
    clock = FakeClock()
    both_off = SnapshotPolicy(clock=clock)
    time_only = SnapshotPolicy(every_seconds=5.0, clock=clock)
    steps_only = SnapshotPolicy(every_steps=3, clock=clock)
    assert not any(time_only.due(s) for s in range(30))  # no time passes: no step boundary either
    assert not any(both_off.due(s) for s in range(30))
    clock.advance(1e6)
    assert not any(both_off.due(s) for s in range(30))
    assert [steps_only.due(s) for s in range(3)] == [False, False, True]  # a long time passed: only K counts


# ---- the coordinator's use of it (no Ray: a fake launcher and fake shards) -------------------------


class FakeShard:
    """A shard that publishes what the test says and whose snapshot waits for `gate` (and writes no file)."""

    def __init__(self, index: int, spans: list[Span], gate: asyncio.Event) -> None:
        self.index = index
        self.spans = spans
        self.address = f"fake:{index}"
        self.name = f"fake-{index}"
        self.version = 0
        self.gate = gate
        self.snapshots: list[int] = []
        self.started = asyncio.Event()

    async def status(self) -> ShardStatus:
        return ShardStatus(self.index, self.address, self.version, True, self.version, "cpu")

    async def stop(self) -> None:
        return None

    async def set_roster(self, roster: Roster) -> None:
        return None

    async def snapshot(self, store: str, job_id: str, name: str, version: int) -> ShardEntry:
        self.snapshots.append(version)
        self.started.set()
        await self.gate.wait()
        ranges = tuple((sp.start, sp.length) for sp in self.spans)
        return ShardEntry(self.index, names.shard_file(self.index), 8, "0" * 64, ranges, version)


class FakeLauncher:
    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.shards: list[FakeShard] = []

    async def launch(self, job_id: str, config: JobConfig, plan: Sequence[list[Span]], restore: Restore | None = None,
                     roster: Roster | None = None, generation: int = 0,
                     only: Sequence[int] | None = None) -> list[ShardHandle]:  # fmt: skip
        self.shards = [FakeShard(i, spans, self.gate) for i, spans in enumerate(plan)]
        return list(self.shards)

    async def reattach(self, job_id: str, names: Sequence[str]) -> list[ShardHandle | None]:
        return [None for _ in names]

    async def cleanup(self, job_id: str, keep: Sequence[str]) -> int:
        return 0

    async def close(self) -> None:
        pass


async def step(coordinator: Coordinator, shards: list[FakeShard], s: int) -> None:
    """Every shard reports step s; then they publish s + 1 (as real shards do after the decision)."""
    members = coordinator.jobs["j"].membership.roster().members
    decisions = await asyncio.gather(
        *(coordinator.reduce_step("j", s, ShardStats(sh.index, NormPart.of(1.0), 1, members)) for sh in shards)
    )
    assert all(isinstance(d, Decision) and d.apply for d in decisions)
    for sh in shards:
        sh.version = s + 1
    for _ in range(5):
        await asyncio.sleep(0)  # let a launched snapshot task start


async def committed(coordinator: Coordinator, count: int) -> None:
    for _ in range(500):
        if len(await coordinator.list_snapshots("j")) == count and not coordinator.jobs["j"].snapshot_lock.locked():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} snapshots never committed")


@pytest.mark.asyncio
async def test_the_coordinator_launches_time_policy_snapshots_and_skips_one_while_writing(tmp_path: Path) -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    launcher = FakeLauncher(gate)
    coordinator = Coordinator(launcher, str(tmp_path), clock=clock)
    config = JobConfig(parameters=(("w", (40,), ""),), optimizer="adamw", num_workers=1, num_shards=2, snapshot_every_seconds=10.0)
    await coordinator.create_job("r1", "j", config)
    await coordinator.join_job("r2", "j", "w0")
    shards = launcher.shards

    clock.advance(5.0)
    await step(coordinator, shards, 0)
    assert [sh.snapshots for sh in shards] == [[], []]  # 5 s since the job started: not due

    clock.advance(5.0)
    await step(coordinator, shards, 1)
    await asyncio.wait_for(asyncio.gather(*(sh.started.wait() for sh in shards)), 5)
    assert [sh.snapshots for sh in shards] == [[2], [2]]  # due at 10 s: launched at version 2, now being written

    clock.advance(20.0)
    await step(coordinator, shards, 2)
    assert [sh.snapshots for sh in shards] == [[2], [2]]  # due again, but skipped: one is being written

    gate.set()
    await committed(coordinator, 1)  # committed at the same fake time: the time rule restarts there
    clock.advance(9.0)
    await step(coordinator, shards, 3)
    assert [sh.snapshots for sh in shards] == [[2], [2]]
    clock.advance(1.0)
    await step(coordinator, shards, 4)
    await committed(coordinator, 2)
    assert [sh.snapshots for sh in shards] == [[2, 5], [2, 5]]
    assert [s["version"] for s in await coordinator.list_snapshots("j")] == [2, 5]
    await coordinator.shutdown()


class ReplicatingShard(FakeShard):
    """A fake shard that also records the versions it was asked to replicate."""

    def __init__(self, index: int, spans: list[Span], gate: asyncio.Event) -> None:
        super().__init__(index, spans, gate)
        self.replicas: list[int] = []

    async def replicate(self, job_id: str, name: str, version: int) -> tuple[ShardEntry, object]:
        self.replicas.append(version)
        ranges = tuple((sp.start, sp.length) for sp in self.spans)
        return ShardEntry(self.index, names.shard_file(self.index), 8, "0" * 64, ranges, version), b"x" * 8


class ReplicatingLauncher(FakeLauncher):
    async def launch(self, job_id: str, config: JobConfig, plan: Sequence[list[Span]], restore: Restore | None = None,
                     roster: Roster | None = None, generation: int = 0,
                     only: Sequence[int] | None = None) -> list[ShardHandle]:  # fmt: skip
        self.shards = [ReplicatingShard(i, spans, self.gate) for i, spans in enumerate(plan)]
        return list(self.shards)


@pytest.mark.asyncio
async def test_a_version_with_a_policy_snapshot_gets_no_replica_round(tmp_path: Path) -> None:
    """A shard copies one snapshot or replica at a time: a replica of the version a periodic
    snapshot is taken at would push the snapshot to a later version. The snapshot covers it."""
    gate = asyncio.Event()
    gate.set()
    launcher = ReplicatingLauncher(gate)
    coordinator = Coordinator(launcher, str(tmp_path), clock=FakeClock())
    config = JobConfig(parameters=(("w", (40,), ""),), optimizer="adamw", num_workers=1, num_shards=2,
                       snapshot_every_steps=2, replica_every_steps=1)  # fmt: skip
    await coordinator.create_job("r1", "j", config)
    await coordinator.join_job("r2", "j", "w0")
    shards = launcher.shards
    for s in range(6):
        await step(coordinator, shards, s)
        await committed(coordinator, (s + 1) // 2)
        for _ in range(100):  # the replica round of this version, if any, completes
            if not coordinator.jobs["j"].replicating:
                break
            await asyncio.sleep(0.01)
    assert [s["version"] for s in await coordinator.list_snapshots("j")] == [2, 4, 6]
    for sh in shards:
        assert isinstance(sh, ReplicatingShard)
        assert sh.replicas == [1, 3, 5]
    await coordinator.shutdown()
