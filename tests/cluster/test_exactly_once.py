"""Request ids make retries safe: a push is never applied twice, even when its answer is lost."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, Reason, ServiceError, Worker
from paramserver_client.aio import AsyncWorker
from tests.conftest import shard_tensors

SHAPES = [("w", (40, 9))]
TOTAL = 360


class AnswerDroppingProxy:
    """A loopback TCP proxy that forwards everything, but on the first connection drops the
    server's answer after the request went through and cuts the connection (UNAVAILABLE)."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop = self.connections == 1
        sreader, swriter = await asyncio.open_connection(self.host, self.target_port)
        answered = asyncio.Event()

        async def upstream() -> None:
            with contextlib.suppress(Exception):
                while data := await creader.read(65536):
                    swriter.write(data)
                    await swriter.drain()

        async def downstream() -> None:
            with contextlib.suppress(Exception):
                total = 0
                while data := await sreader.read(65536):
                    total += len(data)
                    if drop and total > 200:  # past the settings frames: the answer; drop it
                        answered.set()
                        return
                    cwriter.write(data)
                    await cwriter.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        if drop:
            await answered.wait()
            await asyncio.sleep(0.2)
            cwriter.transport.abort()
            swriter.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (cwriter, swriter):
            with contextlib.suppress(Exception):
                w.close()


def test_duplicate_request_id_gets_first_answer(address: str, job_id: str, service: object) -> None:
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=1, num_shards=2)
    with Worker(address, job_id) as w:
        w.upload(np.zeros(TOTAL, dtype=np.float32))
        g = np.ones(TOTAL, dtype=np.float32)
        first = w.push(0, g, 1, request_id="req-0")
        again = w.push(0, g, 1, request_id="req-0")  # a retry after the step was applied
        assert first.outcome == again.outcome == 2 and again.version == 1
        _, params, _ = w.pull(1)
        np.testing.assert_array_equal(params, np.full(TOTAL, -0.1, dtype=np.float32))  # applied once
        with pytest.raises(ServiceError) as err:
            w.push(1, g, 1, request_id="req-0")  # the same id for another call
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == Reason.REQUEST_ID_REUSED
        with pytest.raises(ServiceError) as dup:  # same worker, same step, another id: refused
            w.push(0, g, 1, request_id="req-x")
        assert dup.value.code == grpc.StatusCode.ABORTED


def test_lost_answer_is_retried_and_applied_once(address: str, job_id: str, service: object) -> None:
    with JobClient(address) as jc:
        job = jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", hyperparameters={"lr": 1.0}, num_workers=1, num_shards=1)
        lease = jc.join_job(job_id, "w").lease

    async def run() -> tuple[np.ndarray, int]:
        proxy = AnswerDroppingProxy(job.shards[0].address)
        proxied = jpb.Job()
        proxied.CopyFrom(job)
        proxied.shards[0].address = await proxy.start()
        w = AsyncWorker(proxied, 0, lease=lease)
        direct = AsyncWorker(job, 0, lease=lease)
        await direct.upload(np.zeros(TOTAL, dtype=np.float32))
        result = await w.push(0, np.ones(TOTAL, dtype=np.float32), 1)  # first answer is dropped -> UNAVAILABLE -> retry
        assert result.version == 1
        _, params, _ = await direct.pull(1)
        await w.close()
        await direct.close()
        return params, proxy.connections

    params, connections = asyncio.run(run())
    assert connections >= 2  # the client really retried on a new connection
    np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, dtype=np.float32))  # applied exactly once
    assert shard_tensors(service, job_id)[0]["params"][0] == -1.0
