"""A job that lost a shard, through the real front door and coordinator (no Ray): while it
recovers it refuses joins with a typed status and still answers GetJob and ListJobs; afterwards it
runs again under a new generation, from its replica in memory."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobRolledBack, Reason, ServiceError
from tests.service.harness import InProcessService
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
