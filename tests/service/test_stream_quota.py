"""A tenant's `streams` quota end to end (README "Security", Quotas): each shard of the tenant's jobs
serves at most that many concurrent data-plane streams, every kind together; the next one is
RESOURCE_EXHAUSTED with reason TOO_MANY_STREAMS (metadata `scope` "shard", `limit` the quota,
`kind`), refused before it changes anything; another tenant's job on the same service is not
limited by it and trains meanwhile; once streams end, the tenant trains as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from paramserver.access import AuthConfig, Quota, Tenant, hash_token
from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import AsyncWorker, Reason, ServiceError
from paramserver_client.codec import FLOAT32, encode_chunk_message
from paramserver_client.errors import from_rpc_error
from tests.service.harness import NO_RETRY, TIMEOUT_S, InProcessService
from tests.service.test_stream_limits import servicer, until

pytestmark = pytest.mark.asyncio

ADMIN_A = "stream-quota-admin-a-0123456789"
ADMIN_B = "stream-quota-admin-b-0123456789"
STREAMS = 3
SHAPES = [("w", (10, 7))]
TOTAL = 70
SERVICE = "/paramserver.v1.ShardService"


class Held:
    """A raw data-plane call to a shard with a worker token, left open until cancelled: a pull of a
    version not reached yet, or a client stream of `messages` that is never half-closed."""

    def __init__(
        self, address: str, token: str, method: str, request: spb.PullParametersRequest | Sequence[bytes], hold: bool = True
    ) -> None:
        """`hold` False: a client stream half-closes after its messages."""
        self.channel = aio.insecure_channel(address)
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        md = (("authorization", f"Bearer {token}"),)
        if isinstance(request, spb.PullParametersRequest):
            pull = self.channel.unary_stream(
                f"{SERVICE}/{method}", request_serializer=spb.PullParametersRequest.SerializeToString, response_deserializer=None
            )
            self.task = asyncio.get_running_loop().create_task(self._drain(pull(request, timeout=TIMEOUT_S, metadata=md)))
        else:
            stream = self.channel.stream_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
            self.task = asyncio.get_running_loop().create_task(self._await(stream(self._messages(request), timeout=TIMEOUT_S, metadata=md)))

    async def _messages(self, messages: Sequence[bytes]) -> AsyncIterator[bytes]:
        for m in messages:
            yield m
        await self.release.wait()

    async def _drain(self, call: Any) -> None:
        async for _ in call:
            pass

    async def _await(self, call: Any) -> None:
        await call

    async def error(self) -> ServiceError:
        """The error the call ended with (the channel closed)."""
        try:
            with pytest.raises(grpc.RpcError) as err:
                await self.task
        finally:
            await self.channel.close(None)
        return from_rpc_error(err.value)

    async def cancel(self) -> None:
        self.task.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.RpcError)):
            await self.task
        await self.channel.close(None)


def push_messages(job: jpb.Job, shard: int, w: AsyncWorker, step: int, request_id: str, values: np.ndarray | None) -> list[bytes]:
    """A push of `w` to one shard: the header, then the shard's chunks of `values` (None: none)."""
    header = spb.PushHeader(job_id=job.job_id, worker_id=w.worker_id, step=step, request_id=request_id, loss_terms=1, lease=w.lease,
                            generation=job.generation)  # fmt: skip
    out = [spb.PushGradientsRequest(header=header).SerializeToString()]
    if values is not None:
        for r in job.shards[shard].ranges:
            a, n = int(r.start), int(r.length)
            out.append(encode_chunk_message(a, n, FLOAT32, values[a : a + n].astype("<f4").tobytes()))
    return out


def pull_request(job: jpb.Job, w: AsyncWorker, version: int) -> spb.PullParametersRequest:
    return spb.PullParametersRequest(
        job_id=job.job_id, min_version=version, worker_id=w.worker_id, lease=w.lease, generation=job.generation
    )


def over_quota(err: ServiceError, kind: str) -> None:
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_STREAMS), err
    assert (err.metadata.get("scope"), err.metadata.get("limit"), err.metadata.get("kind")) == ("shard", str(STREAMS), kind), err


async def test_a_tenants_stream_quota_refuses_the_next_stream_and_leaves_other_tenants_alone(tmp_path: Path) -> None:
    tenants = AuthConfig((Tenant("team-a", hash_token(ADMIN_A), Quota(streams=STREAMS)), Tenant("team-b", hash_token(ADMIN_B))))
    svc = InProcessService(tmp_path, auth=tenants)
    await svc.start()
    try:
        a, b = [
            await svc.jobs(token=admin).create_job(
                SHAPES, job_id=job_id, num_workers=2, num_shards=2, optimizer="sgd", hyperparameters={"lr": 0.5}
            )
            for admin, job_id in ((ADMIN_A, "quota-a"), (ADMIN_B, "quota-b"))
        ]

        async def workers(job: jpb.Job) -> list[AsyncWorker]:
            ws = [svc.adopt(await AsyncWorker.join(svc.address, job.job_id, f"w{k}", timeout=TIMEOUT_S, pull_timeout=TIMEOUT_S,
                                                   retry=NO_RETRY, token=job.worker_token)) for k in range(2)]  # fmt: skip
            await ws[0].upload(np.zeros(TOTAL, np.float32))
            return sorted(ws, key=lambda w: w.worker_id)

        a0, a1 = await workers(a)
        b0, b1 = await workers(b)
        for host in svc.launcher.hosts:  # the quota reaches every shard of tenant A's job, none of B's
            assert host.runtime is not None
            assert host.runtime.roster.max_streams == (STREAMS if host.job_id == "quota-a" else 0), host.job_id

        # tenant A's shard 0 holds STREAMS streams: two pulls waiting for a later version, a push half sent
        s0 = servicer(svc, "quota-a", 0)
        held = [Held(a.shards[0].address, a.worker_token, "PullParameters", pull_request(a, a0, 5)) for _ in range(STREAMS - 1)]
        held.append(Held(a.shards[0].address, a.worker_token, "PushGradients", push_messages(a, 0, a1, 0, "held", None)))
        await until(lambda: s0.gate.open == STREAMS, "tenant A's streams admitted")

        # the next stream of any kind is refused, whatever worker it is from, and records nothing
        push = push_messages(a, 0, a0, 0, "a0-step0", np.ones(TOTAL))
        over_quota(await Held(a.shards[0].address, a.worker_token, "PushGradients", push, hold=False).error(), "push")
        over_quota(await Held(a.shards[0].address, a.worker_token, "PullParameters", pull_request(a, a1, 0)).error(), "pull")
        upload = [spb.UploadParametersRequest(header=spb.UploadHeader(job_id="quota-a", request_id="again")).SerializeToString()]
        over_quota(await Held(a.shards[0].address, a.worker_token, "UploadParameters", upload, hold=False).error(), "upload")
        assert s0.gate.open == STREAMS and s0.runtime.waiting_for() == [a0.worker_id, a1.worker_id]
        assert (await svc.jobs(token=ADMIN_A).get_job("quota-a")).version == 0

        # the quota is per shard: the job's other shard serves meanwhile
        assert servicer(svc, "quota-a", 1).gate.open == 0

        # tenant B: more concurrent streams on one shard than A's quota, and a step trains meanwhile
        sb = servicer(svc, "quota-b", 0)
        b_held = [Held(b.shards[0].address, b.worker_token, "PullParameters", pull_request(b, b0, 9)) for _ in range(STREAMS + 2)]
        await until(lambda: sb.gate.open == STREAMS + 2, "tenant B's streams admitted")
        await b0.push(0, np.ones(TOTAL, np.float32), 1)
        await b1.push(0, np.full(TOTAL, 3.0, np.float32), 1)
        version, params, _ = await b1.pull(1)
        assert version == 1
        np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, np.float32))  # 0.5 x (1 + 3) / 2
        for h in b_held:
            await h.cancel()

        # once tenant A's streams end, its job trains as before (the refused push's request id is free)
        for h in held:
            await h.cancel()
        await until(lambda: s0.gate.open == 0, "tenant A's streams released")
        await a0.push(0, np.ones(TOTAL, np.float32), 1, request_id="a0-step0")
        await a1.push(0, np.full(TOTAL, 3.0, np.float32), 1)
        version, params, _ = await a0.pull(1)
        assert version == 1
        np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, np.float32))
    finally:
        await svc.close()
