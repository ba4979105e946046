"""Fixtures of the service tier: an in-process service per test (no Ray; see harness.py).

None of these tests requests the Ray fixtures of tests/conftest.py (ray_session, service, address,
job_id), so Ray is never started here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from tests.service.harness import InProcessService


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch on one thread, as in a shard actor (torch's CPU kernels split their scalar tail by
    thread count, and the parity tests compare bits with a one-thread reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest_asyncio.fixture
async def svc(tmp_path: Path) -> AsyncIterator[InProcessService]:
    """A fresh in-process service (front door, coordinator, shard hosts) on this test's loop;
    every job is deleted, every host and client closed afterwards."""
    service = InProcessService(tmp_path)
    await service.start()
    try:
        yield service
    finally:
        await service.close()
