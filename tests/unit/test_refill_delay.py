"""The warm-spare pool's refill waits REFILL_DELAY_S after the last launch, and each launch
postpones it (pure logic of RayShardLauncher's timing: no Ray started, no spare made)."""

from __future__ import annotations

import asyncio

import pytest

from paramserver import cluster
from paramserver.cluster import RayShardLauncher


@pytest.mark.asyncio
async def test_the_refill_waits_the_delay_after_the_last_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "REFILL_DELAY_S", 0.2)
    launcher = RayShardLauncher(warm=0)  # no spare is started: only the timing is exercised
    loop = asyncio.get_running_loop()
    launcher._top_up()  # a launch ended
    first = launcher._refill_at
    assert first >= loop.time() + 0.15
    await asyncio.sleep(0.1)
    launcher._top_up()  # another launch: the refill moves on
    assert launcher._refill_at > first
    await launcher._quiet()
    assert loop.time() >= launcher._refill_at > first
