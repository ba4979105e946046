"""Credentials: admin tokens per tenant, a worker token per job checked on the front door and on
every shard port, rotation without stopping training, tenants kept apart, quotas.

Real front door, coordinator and shard hosts (each its own grpc.aio port on loopback)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc import aio

from paramserver.access import AuthConfig, Quota, Tenant, hash_token
from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import AsyncJobClient, AsyncWorker, Reason, ServiceError, make_spec
from paramserver_client.errors import from_rpc_error
from tests.service.harness import NO_RETRY, TIMEOUT_S, InProcessService

ADMIN_A = "admin-token-of-tenant-a-0123456789"
ADMIN_B = "admin-token-of-tenant-b-0123456789"
pytestmark = pytest.mark.asyncio

SHAPES = [("w", (6, 5)), ("b", (5,))]
TOTAL = 35


def tenants(quota_a: Quota | None = None) -> AuthConfig:
    return AuthConfig((Tenant("team-a", hash_token(ADMIN_A), quota_a or Quota()), Tenant("team-b", hash_token(ADMIN_B))))


@pytest_asyncio.fixture
async def secured(tmp_path: Path) -> AsyncIterator[InProcessService]:
    service = InProcessService(tmp_path, auth=tenants())
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def create(svc: InProcessService, job_id: str, token: str = ADMIN_A, shards: int = 2, **settings: object) -> jpb.Job:
    settings = {"num_workers": 1, "num_shards": shards, "optimizer": "sgd", "hyperparameters": {"lr": 0.5}, **settings}
    return await svc.jobs(token=token).create_job(SHAPES, job_id=job_id, **settings)


async def worker(svc: InProcessService, job_id: str, token: str, name: str = "w") -> AsyncWorker:
    w = await AsyncWorker.join(svc.address, job_id, name, timeout=TIMEOUT_S, pull_timeout=TIMEOUT_S, retry=NO_RETRY, token=token)
    return svc.adopt(w)


async def step(w: AsyncWorker, s: int) -> np.ndarray:
    """Push a gradient of ones for step s; the parameters of version s + 1."""
    await w.push(s, np.ones(TOTAL, np.float32), 1)
    _, params, _ = await w.pull(s + 1)
    return params


async def shard_call(address: str, token: str | None, job_id: str) -> ServiceError:
    """A PullParameters straight to a shard port with `token` (None: no metadata); its error."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    request = spb.PullParametersRequest(job_id=job_id, min_version=0)
    async with aio.insecure_channel(address) as channel:
        call = channel.unary_stream("/paramserver.v1.ShardService/PullParameters", request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call(request, metadata=metadata, timeout=5):
                pass
    return from_rpc_error(info.value)


async def test_no_or_unknown_token_is_unauthenticated_and_creates_nothing(secured: InProcessService) -> None:
    for token in ("", "not-a-token", "psj.job-x.forged"):
        with pytest.raises(ServiceError) as info:
            await create(secured, "j-none", token=token)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.reason == Reason.UNAUTHENTICATED
    assert not secured.coordinator.jobs


async def test_worker_token_trains_on_every_shard_and_is_refused_elsewhere(
    secured: InProcessService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    job = await create(secured, "j-a")
    other = await create(secured, "j-b")
    token = job.worker_token
    assert token.startswith("psj.j-a.") and other.worker_token.startswith("psj.j-b.") and job.tenant == "team-a"
    w = await worker(secured, "j-a", token)
    await w.upload(np.zeros(TOTAL, np.float32))
    params = await step(w, 0)
    np.testing.assert_array_equal(params, np.full(TOTAL, -0.5, np.float32))

    # a worker token: not on admin calls, not on another job (front door and shard ports)
    wjobs = secured.jobs(token=token)
    with pytest.raises(ServiceError) as info:
        await wjobs.delete_job("j-a")
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED)
    with pytest.raises(ServiceError) as info:
        await wjobs.get_job("j-b")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    for shard in other.shards:
        err = await shard_call(shard.address, token, "j-b")
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED)
    # no token, or a forged one, on a shard port
    for shard in job.shards:
        assert (await shard_call(shard.address, None, "j-a")).code == grpc.StatusCode.UNAUTHENTICATED
        assert (await shard_call(shard.address, token + "x", "j-a")).code == grpc.StatusCode.UNAUTHENTICATED
    # the worker token reads its own job
    assert (await wjobs.get_job("j-a")).version == 1
    # refusals changed nothing: the job trains on
    np.testing.assert_array_equal(await step(w, 1), np.full(TOTAL, -1.0, np.float32))

    # stored as hashes only, never logged
    held = secured.coordinator.jobs["j-a"].membership.tokens
    assert [h for h, _ in held] == [hash_token(token)]
    for host in secured.launcher.hosts:
        assert host.runtime is not None and token not in repr(host.runtime.roster)
    assert token not in caplog.text and ADMIN_A not in caplog.text


async def test_admin_join_gets_a_worker_token_for_the_shards(secured: InProcessService) -> None:
    await create(secured, "j-admin")
    w = await worker(secured, "j-admin", ADMIN_A)
    assert w.credentials.token.startswith("psj.j-admin.")
    await w.upload(np.zeros(TOTAL, np.float32))
    await step(w, 0)


async def test_rotation_keeps_training_and_retires_old_tokens(secured: InProcessService) -> None:
    job = await create(secured, "j-rot")
    old = job.worker_token
    w_old = await worker(secured, "j-rot", old)
    await w_old.upload(np.zeros(TOTAL, np.float32))
    await step(w_old, 0)
    admin = secured.jobs(token=ADMIN_A)
    rotated = await admin.rotate_job_token("j-rot", previous_valid_s=3600)
    new = rotated.worker_token
    assert new != old and new.startswith("psj.j-rot.")
    await step(w_old, 1)  # the old token still works during the grace period, on every shard
    await w_old.set_token(new)  # the running worker switches without leaving
    await step(w_old, 2)
    # retire the old one at once: refused on the front door and on every shard; training goes on
    await admin.rotate_job_token("j-rot", previous_valid_s=0)
    newest = (await admin.rotate_job_token("j-rot", previous_valid_s=0)).worker_token
    with pytest.raises(ServiceError) as info:
        await secured.jobs(token=old).get_job("j-rot")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    for shard in job.shards:
        assert (await shard_call(shard.address, old, "j-rot")).code == grpc.StatusCode.UNAUTHENTICATED
        assert (await shard_call(shard.address, new, "j-rot")).code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ServiceError) as info:  # the worker still on `new` is cut off ...
        await step(w_old, 3)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    await w_old.set_token(newest)  # ... until it takes the newest token
    np.testing.assert_array_equal(await step(w_old, 3), np.full(TOTAL, -2.0, np.float32))
    with pytest.raises(ServiceError) as info:
        await admin.rotate_job_token("j-rot", previous_valid_s=float("nan"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.metadata.get("field") == "previous_valid_s"


async def test_tenants_are_kept_apart(secured: InProcessService) -> None:
    await create(secured, "j-ta")
    await create(secured, "j-tb", token=ADMIN_B)
    b = secured.jobs(token=ADMIN_B)
    assert [j.job_id for j in (await b.list_jobs())] == ["j-tb"]
    for call in (b.get_job("j-ta"), b.delete_job("j-ta"), b.rotate_job_token("j-ta")):
        with pytest.raises(ServiceError) as info:
            await call
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(ServiceError) as info:  # the same job id under another tenant
        await create(secured, "j-ta", token=ADMIN_B, resume=True)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert (await secured.jobs(token=ADMIN_A).get_job("j-ta")).job_id == "j-ta"


async def test_health_and_reflection_need_no_token(secured: InProcessService) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with aio.insecure_channel(secured.address) as channel:
        await secured.health.set("", health_pb2.HealthCheckResponse.SERVING)
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("quota", "what"),
    [
        (Quota(shards=3), "shards"),
        (Quota(parameter_bytes=4 * TOTAL + 4), "parameter_bytes"),
    ],
)
async def test_create_quotas(tmp_path: Path, quota: Quota, what: str) -> None:
    svc = InProcessService(tmp_path, auth=tenants(quota))
    await svc.start()
    try:
        await create(svc, "q-1", shards=2)
        with pytest.raises(ServiceError) as info:
            await create(svc, "q-2", shards=2)
        err = info.value
        assert (err.code, err.reason, err.metadata["quota"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUOTA_EXCEEDED, what)
        assert "q-2" not in svc.coordinator.jobs
        await create(svc, "q-3", token=ADMIN_B, shards=2)  # the other tenant is unaffected
    finally:
        await svc.close()


async def test_worker_stream_and_snapshot_quotas(tmp_path: Path) -> None:
    svc = InProcessService(tmp_path, auth=tenants(Quota(workers=1, streams=7, snapshot_bytes=4 * TOTAL * 3)))
    await svc.start()
    try:
        job = await create(svc, "q-w", num_workers=2, min_workers=1)
        w = await worker(svc, "q-w", job.worker_token, "one")
        with pytest.raises(ServiceError) as info:
            await worker(svc, "q-w", job.worker_token, "two")
        assert (info.value.code, info.value.reason, info.value.metadata["quota"]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.QUOTA_EXCEEDED,
            "workers",
        )
        await worker(svc, "q-w", job.worker_token, "one")  # the same member rejoining is not another worker
        for host in svc.launcher.hosts:
            assert host.runtime is not None and host.runtime.roster.max_streams == 7
        await w.upload(np.zeros(TOTAL, np.float32))
        admin = svc.jobs(token=ADMIN_A)
        await admin.create_snapshot("q-w")
        with pytest.raises(ServiceError) as info:
            await admin.create_snapshot("q-w")
        assert (info.value.code, info.value.metadata["quota"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "snapshot_bytes")
        async with AsyncJobClient(svc.address, timeout=TIMEOUT_S, retry=NO_RETRY, token=ADMIN_B) as b:
            await b.create_job(SHAPES, job_id="q-other", num_workers=2, num_shards=1, optimizer="sgd", hyperparameters={"lr": 0.1})
            await b.join_job("q-other", "x")
            await b.join_job("q-other", "y")  # team-b has no worker quota
    finally:
        await svc.close()


async def test_tenant_tokens_and_quota_survive_a_coordinator_restart(tmp_path: Path) -> None:
    from paramserver.coordinator import Coordinator
    from paramserver.jobconfig import JobConfig
    from tests.service.harness import InProcessLauncher

    journal = str(tmp_path / "coordinator.journal")
    config = JobConfig(parameters=(("w", (4,), ""),), optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=1, num_shards=1)
    launcher = InProcessLauncher(tmp_path / "spill")
    first = Coordinator(launcher, str(tmp_path / "snapshots"), journal=journal)
    launcher.coordinator = first
    await first.create_job("create-1", "j-journal", config, tenant="team-a", quota=Quota(streams=5), secured=True)
    await first.add_token("j-journal", hash_token("psj.j-journal.one"))
    until = await first.rotate_token("rotate-1", "j-journal", hash_token("psj.j-journal.two"), 60.0)
    before = await first.access("j-journal")
    for host in launcher.hosts:  # the first coordinator dies (its jobs stay in the journal)
        await host.stop(grace=0)
    if first._watcher is not None:
        first._watcher.cancel()

    again = Coordinator(InProcessLauncher(tmp_path / "spill2"), str(tmp_path / "snapshots"), journal=journal)
    await again.start()
    try:
        assert await again.access("j-journal") == before
        assert before == ("team-a", ((hash_token("psj.j-journal.one"), until), (hash_token("psj.j-journal.two"), 0.0)))
        roster = again.jobs["j-journal"].membership.roster()
        assert roster.secured and roster.max_streams == 5 and roster.tokens == before[1]
        # a roster sent after the restart is newer than any the shards kept (epochs are not journaled)
        assert roster.epoch > first.jobs["j-journal"].membership.epoch
        # a retried rotation gets its first answer
        assert await again.rotate_token("rotate-1", "j-journal", hash_token("psj.j-journal.two"), 0.0) == until
    finally:
        await again.shutdown()


async def test_another_tenants_snapshots_cannot_be_restored_or_rolled_back_to(secured: InProcessService) -> None:
    job = await create(secured, "j-snap", shards=1)
    w = await worker(secured, "j-snap", job.worker_token)
    await w.upload(np.arange(TOTAL, dtype=np.float32))
    a, b = secured.jobs(token=ADMIN_A), secured.jobs(token=ADMIN_B)
    await a.create_snapshot("j-snap")
    with pytest.raises(ServiceError) as info:
        await b.restore_job("j-snap", job_id="j-stolen")
    assert (info.value.code, info.value.metadata.get("field")) == (grpc.StatusCode.PERMISSION_DENIED, "restore_from")
    assert "j-stolen" not in secured.coordinator.jobs
    own = await create(secured, "j-b-own", token=ADMIN_B, shards=1)
    wb = await worker(secured, "j-b-own", own.worker_token)
    await wb.upload(np.zeros(TOTAL, np.float32))
    with pytest.raises(ServiceError) as info:
        await b.rollback_job("j-b-own", "j-snap")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    await a.delete_job("j-snap")  # the snapshots stay tenant A's after the job is gone
    with pytest.raises(ServiceError) as info:
        await b.restore_job("j-snap", job_id="j-stolen")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    restored = await a.restore_job("j-snap", job_id="j-restored")
    assert restored.version == 0 and restored.worker_token.startswith("psj.j-restored.")


async def test_an_error_quoting_a_huge_field_keeps_its_status_and_reason(secured: InProcessService) -> None:
    for job_id in ("x" * 20000, "\u4e2d" * 5000):  # quoted in the message and in ErrorInfo metadata
        with pytest.raises(ServiceError) as info:
            await secured.jobs(token=ADMIN_A).get_job(job_id)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.NOT_FOUND, Reason.JOB_NOT_FOUND)
        assert len(info.value.message.encode()) <= 600
    with pytest.raises(ServiceError) as info:  # a worker token naming a huge job on another job
        await secured.jobs(token="psj." + "y" * 400 + ".secret").get_job("x" * 20000)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


async def raw_create(svc: InProcessService, token: str, request_id: str, job_id: str) -> jpb.Job:
    client = svc.jobs(token=token)
    spec = make_spec(SHAPES, num_workers=1, num_shards=1, optimizer="sgd", hyperparameters={"lr": 0.5})
    req = jpb.CreateJobRequest(request_id=request_id, job_id=job_id, spec=spec)
    job: jpb.Job = await client._unary(client._stub.CreateJob, req, "CreateJob")
    return job


async def test_one_tenant_cannot_take_over_another_tenants_job_ids_request_ids_or_snapshots(secured: InProcessService) -> None:
    first = await raw_create(secured, ADMIN_A, "create-demo-1", "demo")
    again = await raw_create(secured, ADMIN_A, "create-demo-1", "demo")  # a retry: the same token
    assert again.worker_token == first.worker_token
    with pytest.raises(ServiceError) as info:  # tenant B replaying A's request id gets nothing of A's
        await raw_create(secured, ADMIN_B, "create-demo-1", "demo")
    assert info.value.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    assert [h for h, _ in secured.coordinator.jobs["demo"].membership.tokens] == [hash_token(first.worker_token)]
    w = await worker(secured, "demo", first.worker_token)
    await w.upload(np.zeros(TOTAL, np.float32))
    a, b = secured.jobs(token=ADMIN_A), secured.jobs(token=ADMIN_B)
    await a.create_snapshot("demo")
    await a.delete_job("demo")
    with pytest.raises(ServiceError) as info:  # a deleted job's id stays A's, and so do its snapshots
        await raw_create(secured, ADMIN_B, "create-demo-b", "demo")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    for call in (b.list_snapshots("demo"), b.restore_job("demo", job_id="demo-b")):
        with pytest.raises(ServiceError) as info:
            await call
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert len(await a.list_snapshots("demo")) == 1


async def test_rotation_replays_and_token_limits(secured: InProcessService) -> None:
    from paramserver.access import MAX_TOKENS_PER_JOB

    job = await create(secured, "j-lim")
    client = secured.jobs(token=ADMIN_A)
    req = jpb.RotateJobTokenRequest(request_id="rot-1", job_id="j-lim", previous_valid_s=0)
    first = await client._unary(client._stub.RotateJobToken, req, "RotateJobToken")
    live = (await client.rotate_job_token("j-lim", previous_valid_s=0)).worker_token  # retires first's token
    replay = await client._unary(client._stub.RotateJobToken, req, "RotateJobToken")  # the same answer ...
    assert replay.worker_token == first.worker_token and replay.previous_expire_at == first.previous_expire_at
    with pytest.raises(ServiceError) as info:  # ... but its token stays retired
        await secured.jobs(token=first.worker_token).get_job("j-lim")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    held = len(secured.coordinator.jobs["j-lim"].membership.tokens)
    for k in range(MAX_TOKENS_PER_JOB - held):
        await client.join_job("j-lim", f"admin-join-{k % 1}")  # each admin join issues a token
    lease = secured.coordinator.jobs["j-lim"].membership.members[0].lease
    with pytest.raises(ServiceError) as info:
        await client.join_job("j-lim", "admin-join-0")
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.LIMIT_EXCEEDED)
    assert secured.coordinator.jobs["j-lim"].membership.members[0].lease == lease  # refused before the join: nothing changed
    # no live token was dropped to make room: the oldest live one still works
    assert len(secured.coordinator.jobs["j-lim"].membership.tokens) == MAX_TOKENS_PER_JOB
    assert (await secured.jobs(token=live).get_job("j-lim")).job_id == job.job_id
