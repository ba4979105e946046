"""The coordinator's watcher is woken by the first shard call that finds an actor dead, instead of
waiting for its next tick (pure logic: fake shards, no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from paramserver import coordinator as coordinator_module
from paramserver.coordinator import FAILED, Coordinator
from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig
from paramserver.shard_types import ShardStatus
from tests.unit.test_snapshot_policy import FakeClock, FakeLauncher, FakeShard


class DeadShard(FakeShard):
    async def status(self) -> ShardStatus:
        raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "shard status: actor died", {"actor": "dead"})


@pytest.mark.asyncio
async def test_a_get_job_that_finds_a_dead_shard_starts_the_recovery_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator_module, "WATCH_INTERVAL_S", 3600.0)  # the watcher's tick: never, in this test
    launcher = FakeLauncher(asyncio.Event())
    coordinator = Coordinator(launcher, str(tmp_path), clock=FakeClock())
    config = JobConfig(parameters=(("w", (40,), ""),), optimizer="sgd", num_workers=1, num_shards=2, worker_timeout_s=86400.0)
    await coordinator.create_job("r1", "j", config)
    await asyncio.sleep(0.2)  # the watcher is waiting for its (hour-long) tick
    assert coordinator.jobs["j"].state != FAILED
    dead = DeadShard(1, launcher.shards[1].spans, launcher.gate)
    coordinator.jobs["j"].shards[1] = dead
    view = await coordinator.get_job("j")  # shows shard 1 unreachable, and wakes the watcher
    assert not view.shards[1].reachable
    for _ in range(200):  # no snapshot and no replica: the recovery fails the job, naming the loss
        if coordinator.jobs["j"].state == FAILED:
            break
        await asyncio.sleep(0.01)
    assert coordinator.jobs["j"].state == FAILED
    assert coordinator.jobs["j"].state_reason.startswith(Reason.SHARD_LOST)


@pytest.mark.asyncio
async def test_a_failed_jobs_dead_shard_does_not_wake_the_watcher_at_every_get_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator_module, "WATCH_INTERVAL_S", 3600.0)
    launcher = FakeLauncher(asyncio.Event())
    coordinator = Coordinator(launcher, str(tmp_path), clock=FakeClock())
    config = JobConfig(parameters=(("w", (40,), ""),), optimizer="sgd", num_workers=1, num_shards=2, worker_timeout_s=86400.0)
    await coordinator.create_job("r1", "j", config)
    await asyncio.sleep(0.2)
    coordinator.jobs["j"].shards[1] = DeadShard(1, launcher.shards[1].spans, launcher.gate)
    sets: list[int] = []
    wake = coordinator._wake
    original = wake.set
    monkeypatch.setattr(wake, "set", lambda: (sets.append(1), original())[1])
    await coordinator.get_job("j")
    assert len(sets) == 1  # running: the first GetJob that sees the dead shard wakes the watcher
    for _ in range(200):
        if coordinator.jobs["j"].state == FAILED:
            break
        await asyncio.sleep(0.01)
    assert coordinator.jobs["j"].state == FAILED
    for _ in range(3):  # failed: GetJob still shows the shard unreachable, and leaves the watcher asleep
        view = await coordinator.get_job("j")
        assert not view.shards[1].reachable
    assert len(sets) == 1
