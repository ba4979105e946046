"""A job that lost a shard, through the real front door and coordinator (no Ray): while it
recovers it refuses joins with a typed status and still answers GetJob and ListJobs; afterwards it
runs again under a new generation, from its replica in memory."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobRolledBack, Reason, ServiceError
from paramserver_client.aio import AsyncWorker
from tests.service.harness import InProcessService, assert_same_tensors
from tests.service.test_membership import HYPER, P0, SHAPES, grad, until


@pytest.mark.asyncio
async def test_a_recovering_job_refuses_joins_answers_get_and_list_and_then_takes_workers_again(svc: InProcessService) -> None:
    await svc.create(SHAPES, "rec", optimizer="adamw", hyperparameters=HYPER, num_shards=2, num_workers=1, max_workers=2,
                     replica_every_steps=1)  # fmt: skip
    other = "bystander"
    await svc.create(SHAPES, other, optimizer="adamw", hyperparameters=HYPER, num_shards=1, num_workers=1)
    w = await svc.worker("rec", "a")
    await w.upload(P0)
    for s in range(2):
        await w.push(s, *grad(s, 0))
        await w.pull(s + 1)
    for _ in range(200):  # replicas are taken in the background (a round still running skips the next)
        if (r := svc.coordinator.jobs["rec"].replica) is not None and r[0].version == 2:
            break
        await asyncio.sleep(0.05)
    replica = svc.coordinator.jobs["rec"].replica
    assert replica is not None
    v = replica[0].version
    svc.launcher.hold = asyncio.Event()  # the lost shard's relaunch waits: the job stays RECOVERING
    lost = (await svc.handles("rec"))[1]
    await lost.host.stop(grace=0)
    lost.dead = True
    jc = svc.jobs()
    job = await until(svc, "rec", lambda j: j.state == jpb.JOB_STATE_RECOVERING, "RECOVERING")
    assert job.state_reason.startswith(Reason.SHARD_LOST), job.state_reason
    with pytest.raises(ServiceError) as refused:
        await svc.worker("rec", "b")
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.JOB_RECOVERING)
    listed = {j.job_id: j.state for j in await jc.list_jobs()}
    assert listed == {"rec": jpb.JOB_STATE_RECOVERING, other: jpb.JOB_STATE_AWAITING_PARAMETERS}
    bystander = await svc.worker(other, "x")  # the other job keeps serving
    await bystander.upload(P0)
    assert (await jc.get_job(other)).state == jpb.JOB_STATE_RUNNING
    svc.launcher.hold.set()
    job = await until(svc, "rec", lambda j: j.state == jpb.JOB_STATE_RUNNING and j.generation == 1, "the recovery")
    assert (job.recoveries, job.recovered_from, job.version) == (1, f"replica at version {v}", v)
    with pytest.raises(JobRolledBack) as rolled:  # the old incarnation learns where to resume
        await w.push(2, *grad(2, 0))
    assert rolled.value.resume_version == v
    b = await svc.worker("rec", "b")  # and joins are taken again
    assert b.worker_id != w.worker_id


async def trained(svc: InProcessService, job_id: str, steps: range, w: AsyncWorker) -> None:
    for s in steps:
        await w.push(s, *grad(s, 0))
        await w.pull(s + 1)


@pytest.mark.asyncio
async def test_a_job_rolled_back_to_its_snapshot_replays_bit_for_bit(svc: InProcessService) -> None:
    await svc.create(SHAPES, "rb", optimizer="adamw", hyperparameters=HYPER, num_shards=2, num_workers=1)
    w = await svc.worker("rb", "a")
    await w.upload(P0)
    await trained(svc, "rb", range(2), w)
    jc = svc.jobs()
    snap = await jc.create_snapshot("rb")
    at2 = await svc.tensors("rb")
    await trained(svc, "rb", range(2, 4), w)
    at4 = await svc.tensors("rb")
    job = await jc.rollback_job("rb", snap.path)
    assert (job.version, job.generation, job.state) == (2, 1, jpb.JOB_STATE_RUNNING)
    assert "rollback" in job.recovered_from
    assert_same_tensors(at2, await svc.tensors("rb"))  # every shard at the snapshot's state
    with pytest.raises(JobRolledBack) as rolled:
        await w.push(4, *grad(4, 0))
    assert rolled.value.resume_version == 2
    await trained(svc, "rb", range(2, 4), w)  # the same steps again: the same state, bit for bit
    assert_same_tensors(at4, await svc.tensors("rb"))
    again = await jc.rollback_job("rb", "rb:latest")  # by job name: the newest snapshot
    assert again.version == 2 and again.generation == 2


@pytest.mark.asyncio
async def test_a_rollback_conditional_on_a_generation_happens_once(svc: InProcessService) -> None:
    """Two workers resuming from one checkpoint read the job, then both roll it back on the
    generation they read: the first rolls it back, the second is ABORTED GENERATION_CHANGED and
    the steps pushed since the first rollback stay."""
    await svc.create(SHAPES, "rbg", optimizer="adamw", hyperparameters=HYPER, num_shards=2, num_workers=1)
    w = await svc.worker("rbg", "a")
    await w.upload(P0)
    await trained(svc, "rbg", range(2), w)
    jc = svc.jobs()
    snap = await jc.create_snapshot("rbg")
    await trained(svc, "rbg", range(2, 4), w)
    read_by_both = (await jc.get_job("rbg")).generation
    first = await jc.rollback_job("rbg", snap.path, expected_generation=read_by_both)
    assert (first.version, first.generation) == (2, read_by_both + 1)
    with pytest.raises(JobRolledBack):
        await w.push(2, *grad(2, 0))
    await trained(svc, "rbg", range(2, 3), w)  # the first worker goes on from the snapshot
    after = await svc.tensors("rbg")
    with pytest.raises(ServiceError) as late:
        await jc.rollback_job("rbg", snap.path, expected_generation=read_by_both)
    assert (late.value.code, late.value.reason) == (grpc.StatusCode.ABORTED, Reason.GENERATION_CHANGED)
    assert late.value.metadata == {"generation": str(read_by_both + 1), "current_version": "3"}
    job = await jc.get_job("rbg")  # nothing changed: the step pushed after the first rollback stays
    assert (job.version, job.generation) == (3, read_by_both + 1)
    assert_same_tensors(after, await svc.tensors("rbg"))
    await trained(svc, "rbg", range(3, 4), w)


@pytest.mark.asyncio
async def test_a_bad_rollback_gets_a_clear_status_and_changes_nothing(svc: InProcessService) -> None:
    await svc.create(SHAPES, "rbx", optimizer="adamw", hyperparameters=HYPER, num_shards=2, num_workers=1)
    await svc.create(SHAPES, "other", optimizer="adamw", hyperparameters={**HYPER, "lr": 0.5}, num_shards=1, num_workers=1)
    w = await svc.worker("rbx", "a")
    await w.upload(P0)
    o = await svc.worker("other", "o")
    await o.upload(P0)
    jc = svc.jobs()
    foreign = await jc.create_snapshot("other")
    await trained(svc, "rbx", range(2), w)
    before = await svc.tensors("rbx")

    async def rollback(request_id: str, job_id: str, snapshot: str) -> None:
        req = jpb.RollbackJobRequest(request_id=request_id, job_id=job_id, snapshot=snapshot)
        await jc._unary(jc._stub.RollbackJob, req, "RollbackJob")

    cases = [
        (rollback("", "rbx", foreign.path), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "request_id"),
        (rollback("r", "", foreign.path), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "job_id"),
        (rollback("r", "rbx", ""), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "snapshot"),
        (rollback("r", "nope", foreign.path), grpc.StatusCode.NOT_FOUND, Reason.JOB_NOT_FOUND, None),
        (rollback("r", "rbx", "rbx:latest"), grpc.StatusCode.NOT_FOUND, Reason.SNAPSHOT_NOT_FOUND, None),
        (rollback("r", "rbx", foreign.path), grpc.StatusCode.FAILED_PRECONDITION, Reason.SNAPSHOT_INCOMPATIBLE, "snapshot"),
    ]
    for call, code, reason, field in cases:
        with pytest.raises(ServiceError) as err:
            await call
        assert (err.value.code, err.value.reason, err.value.metadata.get("field")) == (code, reason, field), err.value
    raw = jc._channel.unary_unary("/paramserver.v1.JobService/RollbackJob")
    with pytest.raises(grpc.RpcError) as undecodable:
        await raw(b"\xff\xff\xff", timeout=5)
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    job = await jc.get_job("rbx")  # nothing changed
    assert (job.version, job.generation, job.state) == (2, 0, jpb.JOB_STATE_RUNNING)
    assert_same_tensors(before, await svc.tensors("rbx"))
    await trained(svc, "rbx", range(2, 3), w)  # and it still trains


@pytest.mark.asyncio
async def test_a_lost_replica_falls_back_to_the_snapshot_and_the_run_replays_bit_for_bit(svc: InProcessService) -> None:
    """The replica is newer than the snapshot but gone (on Ray: its objects lost with their node):
    the job is restored from the snapshot instead, and the replayed run equals the one without a
    fault."""
    settings = {"optimizer": "adamw", "hyperparameters": HYPER, "num_shards": 2, "num_workers": 1}
    await svc.create(SHAPES, "ref", **settings)
    await svc.create(SHAPES, "lost", **settings, replica_every_steps=1)
    ref, w = await svc.worker("ref", "a"), await svc.worker("lost", "a")
    await ref.upload(P0)
    await w.upload(P0)
    await trained(svc, "ref", range(5), ref)
    await trained(svc, "lost", range(2), w)
    snap = await svc.jobs().create_snapshot("lost")
    await trained(svc, "lost", range(2, 4), w)
    for _ in range(200):
        if (r := svc.coordinator.jobs["lost"].replica) is not None and r[0].version == 4:
            break
        await asyncio.sleep(0.05)
    assert svc.coordinator.jobs["lost"].replica is not None
    svc.launcher.replica_lost = True
    dead = (await svc.handles("lost"))[1]
    await dead.host.stop(grace=0)
    dead.dead = True
    job = await until(svc, "lost", lambda j: j.state == jpb.JOB_STATE_RUNNING and j.recoveries == 1, "the recovery")
    assert job.version == snap.version == 2
    assert job.recovered_from.endswith("(the replica was lost)"), job.recovered_from
    assert svc.coordinator.jobs["lost"].replica is None or svc.coordinator.jobs["lost"].replica[0].version > 2
    svc.launcher.replica_lost = False
    with pytest.raises(JobRolledBack) as rolled:
        await w.push(4, *grad(4, 0))
    assert rolled.value.resume_version == 2
    await trained(svc, "lost", range(2, 5), w)  # the worker goes on from the snapshot's version
    assert_same_tensors(await svc.tensors("ref"), await svc.tensors("lost"))
