"""Network faults between a worker and a shard (a loopback TCP proxy in front of shard 0, real Ray,
real gRPC): delayed packets, connections dropped between steps, a push stream cut in the middle
(retried under its request id), a blackholed link that a pull times out on. Every step is applied
exactly once: the result equals torch.optim.AdamW bit for bit."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import ServiceError
from paramserver_client.aio import AsyncJobClient, AsyncWorker
from paramserver_client.retry import RetryPolicy
from tests.cluster.test_parity import SHAPES, TOTAL, worker_grads
from tests.faults.proxy import TcpProxy
from tests.service.harness import torch_adamw

HYPER: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1}
P0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)
STEPS = 8


def test_delays_drops_cuts_and_blackholes_on_a_shard_link_apply_every_step_exactly_once(address: str, service: Any) -> None:
    job_id = f"net-{uuid.uuid4().hex[:6]}"

    async def run() -> tuple[np.ndarray, list[str]]:
        events: list[str] = []
        async with AsyncJobClient(address) as jc:
            job = await jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=2)
            joined = [await jc.join_job(job_id, n) for n in ("a", "b")]
            proxy = TcpProxy(job.shards[0].address).start()
            try:
                proxied = jpb.Job()
                proxied.CopyFrom(joined[0].job)
                proxied.shards[0].address = proxy.address
                retry = RetryPolicy(attempts=8, initial_backoff_s=0.05)
                a = AsyncWorker(proxied, joined[0].worker_id, lease=joined[0].lease, lease_timeout_s=joined[0].lease_timeout_s,
                                address=address, retry=retry, timeout=20, pull_timeout=20)  # fmt: skip
                b = AsyncWorker(joined[1].job, joined[1].worker_id, lease=joined[1].lease, lease_timeout_s=joined[1].lease_timeout_s,
                                address=address, retry=retry, timeout=20, pull_timeout=20)  # fmt: skip
                ws = sorted([a, b], key=lambda w: w.worker_id)
                await ws[0].upload(P0)
                for s in range(STEPS):
                    if s == 1:
                        proxy.set_delay(0.02)
                        events.append("delay")
                    if s == 3:
                        proxy.set_delay(0.0)
                        proxy.drop_connections()  # between steps
                        events.append("drop")
                    if s == 5:  # cut a's next push to shard 0 in the middle of its stream
                        proxy.drop_connections()
                        proxy.drop_after_bytes(600)  # inside the ~1.6 KB of gradient data of the first push
                        events.append("cut")
                    if s == 6:  # a hung link: a pull through it runs into its deadline; the link comes back
                        impatient = AsyncWorker(proxied, a.worker_id, lease=a.lease, retry=RetryPolicy(attempts=1), pull_timeout=1.5)
                        proxy.set_blackhole(True)
                        with pytest.raises(ServiceError) as hung:
                            await impatient.pull(s)
                        assert hung.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                        await impatient.close()
                        proxy.set_blackhole(False)
                        proxy.drop_connections()
                        events.append("blackhole")
                    results = await asyncio.gather(*(w.push(s, *worker_grads(s, w.worker_id), request_id=f"{w.worker_id}-{s}") for w in ws))
                    assert max(r.version for r in results) <= s + 1
                    version, _, _ = await a.pull(s + 1)
                    assert version == s + 1
                _, final, _ = await b.pull(STEPS)
                stats = proxy.stats
                events.append(f"dropped={stats.connections_dropped}")
                await asyncio.gather(a.close(), b.close())
            finally:
                proxy.stop()
            await jc.delete_job(job_id)
        return final, events

    final, events = asyncio.run(run())
    assert "cut" in events and any(e.startswith("dropped=") and int(e.split("=")[1]) >= 3 for e in events), events
    grads = [[worker_grads(s, 0), worker_grads(s, 1)] for s in range(STEPS)]
    assert np.array_equal(final, torch_adamw(SHAPES, P0, HYPER, grads))  # no step twice, none half
