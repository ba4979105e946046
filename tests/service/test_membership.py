"""Worker leases and elastic membership through the real front door and shard data ports (no Ray):
lost workers under each policy, rejoined incarnations, joins and leaves between steps."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.aio import AsyncWorker
from tests.service.harness import NO_RETRY, TIMEOUT_S, InProcessService, torch_adamw

SHAPES = [("w", (40, 9)), ("b", (9,))]
TOTAL = 369
HYPER: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1}
TIMEOUT = 2.0  # worker_timeout_s of these jobs (the references computed on the loop block it for a while)
WAIT, CONTINUE, FAIL = 1, 2, 3


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    """A worker's summed-loss gradient for a step and its loss terms (unequal across workers)."""
    rng = np.random.default_rng(1000 * step + worker)
    return rng.standard_normal(TOTAL).astype(np.float32), 3 + 2 * worker


P0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)


async def job(svc: InProcessService, job_id: str, names: list[str], **settings: Any) -> list[AsyncWorker]:
    """An AdamW job on 2 shards; workers joined under `names` (in that order), P0 uploaded."""
    settings = {"num_workers": len(names), "worker_timeout_s": TIMEOUT, **settings}
    await svc.create(SHAPES, job_id, optimizer="adamw", hyperparameters=HYPER, num_shards=2, **settings)
    ws = [await svc.worker(job_id, n) for n in names]
    uploader = next(w for w in ws if w.upload_parameters)
    await uploader.upload(P0)
    return ws


def only_shard(worker: AsyncWorker, k: int) -> AsyncWorker:
    """A view of `worker` that reaches shard k only: its pushes land on that shard alone, as when a
    worker dies between the shards of one push."""
    j = jpb.Job()
    j.CopyFrom(worker.job)
    del j.shards[:]
    j.shards.add().CopyFrom(worker.job.shards[k])
    return AsyncWorker(j, worker.worker_id, lease=worker.lease, retry=NO_RETRY, timeout=TIMEOUT_S)


async def until(svc: InProcessService, job_id: str, check: Any, what: str) -> jpb.Job:
    for _ in range(200):
        j = await svc.jobs().get_job(job_id)
        if check(j):
            return j
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} never happened")


async def pushed(w: AsyncWorker, step: int, g: tuple[np.ndarray, int]) -> spb.PushGradientsResponse:
    return await w.push(step, g[0], g[1])  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_continue_closes_the_step_without_a_lost_worker_and_discards_its_partial_push(svc: InProcessService) -> None:
    w0, w1, w2 = await job(svc, "cont", ["a", "b", "c"], min_workers=2, on_worker_lost=CONTINUE)
    for w in (w0, w1):
        assert (await w.push(0, *grad(0, w.worker_id))).outcome == spb.STEP_OUTCOME_PENDING  # the step waits for c
    partial = svc.adopt(only_shard(w2, 0))
    # c's push reaches shard 0 only (completing its set there: it waits for the other shard) ...
    lost_push = asyncio.create_task(partial.push(0, *grad(0, 2)))
    await asyncio.sleep(0.2)
    await w2.close()  # ... and the worker dies: no more heartbeats
    version, values, report = await w0.pull(1)  # until c's lease expires
    assert version == 1 and report is not None
    assert list(report.workers) == [0, 1] and list(report.missing_workers) == [2]
    assert report.loss_terms == grad(0, 0)[1] + grad(0, 1)[1]  # the exact mean over the data that arrived
    expected = torch_adamw(SHAPES, P0, HYPER, [[grad(0, 0), grad(0, 1)]])
    assert np.array_equal(values, expected)  # c's partial push was dropped on shard 0 too
    with pytest.raises(ServiceError) as dropped:  # its step closed without it: its push says so
        await lost_push
    assert (dropped.value.code, dropped.value.reason) == (grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED)
    j = await svc.jobs().get_job("cont")
    assert [m.worker_id for m in j.members] == [0, 1] and list(j.workers) == [0, 1]
    with pytest.raises(ServiceError) as late:  # the dead worker's lease is gone
        await partial.push(1, *grad(1, 2))
    assert (late.value.code, late.value.reason) == (grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED)
    for w in (w0, w1):  # and training goes on with two
        await w.push(1, *grad(1, w.worker_id))
    _, values, _ = await w1.pull(2)
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, [[grad(s, 0), grad(s, 1)] for s in range(2)]))


@pytest.mark.asyncio
async def test_a_rejoined_worker_never_mixes_with_its_previous_incarnation(svc: InProcessService) -> None:
    w0, old = await job(svc, "mix", ["a", "b"])
    partial = svc.adopt(only_shard(old, 0))
    stale = (np.full(TOTAL, 1e3, dtype=np.float32), 7)
    await partial.push(0, *stale)  # the first incarnation reaches shard 0, then dies
    new = await svc.worker("mix", "b")  # replaced under its name: same id, new lease
    assert new.worker_id == old.worker_id and new.lease > old.lease
    with pytest.raises(ServiceError) as superseded:
        await only_shard(old, 1).push(0, *stale)
    assert (superseded.value.code, superseded.value.reason) == (grpc.StatusCode.ABORTED, Reason.LEASE_SUPERSEDED)
    await w0.push(0, *grad(0, 0))
    done = await new.push(0, *grad(0, 1))
    assert done.outcome == spb.STEP_OUTCOME_APPLIED
    _, values, report = await w0.pull(1)
    assert report is not None and list(report.workers) == [0, 1] and list(report.missing_workers) == []
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, [[grad(0, 0), grad(0, 1)]]))


@pytest.mark.asyncio
async def test_fail_policy_fails_the_job_with_the_lost_worker_named(svc: InProcessService) -> None:
    w0, w1 = await job(svc, "fail", ["a", "b"], on_worker_lost=FAIL)
    await w0.push(0, *grad(0, 0))
    await w1.close()
    j = await until(svc, "fail", lambda j: j.state == jpb.JOB_STATE_FAILED, "the job failing")
    assert j.state_reason.startswith(Reason.WORKER_LOST) and "worker 1 (b)" in j.state_reason
    for call in (w0.pull(1), w0.push(1, *grad(1, 0))):
        with pytest.raises(ServiceError) as failed:
            await call
        assert (failed.value.code, failed.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_FAILED)
    with pytest.raises(ServiceError) as joining:
        await svc.worker("fail", "c")
    assert joining.value.reason == Reason.JOB_FAILED
    await svc.jobs().delete_job("fail")  # a failed job can be deleted
    with pytest.raises(ServiceError) as gone:
        await svc.jobs().get_job("fail")
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_wait_keeps_the_slot_of_a_silent_worker_and_takes_it_back_when_it_renews(svc: InProcessService) -> None:
    w0, w1 = await job(svc, "wait", ["a", "b"], on_worker_lost=WAIT)
    await w0.push(0, *grad(0, 0))
    await w1._stop_heartbeat()  # silent (a long pause), not gone
    j = await until(svc, "wait", lambda j: any(m.lost for m in j.members), "the lease expiring")
    assert [(m.worker_id, m.lost) for m in j.members] == [(0, False), (1, True)] and j.state == jpb.JOB_STATE_RUNNING
    impatient = svc.adopt(AsyncWorker(w0.job, 0, lease=w0.lease, pull_timeout=1.0, retry=NO_RETRY))
    with pytest.raises(ServiceError) as waiting:
        await impatient.pull(1)
    assert waiting.value.reason == Reason.STEP_WAITING_FOR_WORKERS and waiting.value.metadata["waiting_for"] == "1"
    done = await w1.push(0, *grad(0, 1))  # it comes back: its push renews the lease and closes the step
    assert done.outcome == spb.STEP_OUTCOME_APPLIED
    assert np.array_equal((await w0.pull(1))[1], torch_adamw(SHAPES, P0, HYPER, [[grad(0, 0), grad(0, 1)]]))
    await svc.jobs().heartbeat("wait", 1, w1.lease)
    j = await svc.jobs().get_job("wait")
    assert [m.lost for m in j.members] == [False, False]


@pytest.mark.asyncio
async def test_heartbeats_keep_an_idle_worker_a_member(svc: InProcessService) -> None:
    (w0,) = await job(svc, "idle", ["a"], on_worker_lost=CONTINUE)
    await asyncio.sleep(4 * TIMEOUT)  # no push or pull: only the background heartbeats
    j = await svc.jobs().get_job("idle")
    assert [(m.worker_id, m.lost) for m in j.members] == [(0, False)] and j.members[0].idle_s < TIMEOUT
    assert (await w0.push(0, *grad(0, 0))).outcome == spb.STEP_OUTCOME_APPLIED


@pytest.mark.asyncio
async def test_workers_join_between_steps_and_leave_with_the_step_reporting_it(svc: InProcessService) -> None:
    w0, w1 = await job(svc, "elastic", ["a", "b"], min_workers=2, max_workers=3)
    for w in (w0, w1):
        await w.push(0, *grad(0, w.worker_id))
    w2 = await svc.worker("elastic", "c")  # joins at the current version
    assert w2.worker_id == 2 and not w2.upload_parameters
    version, _, _ = await w2.pull(int(w2.job.version))
    assert version == 1
    for w in (w0, w1, w2):
        await w.push(1, *grad(1, w.worker_id))
    _, values, report = await w2.pull(2)
    assert report is not None and list(report.workers) == [0, 1, 2]
    steps = [[grad(0, 0), grad(0, 1)], [grad(1, 0), grad(1, 1), grad(1, 2)]]
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, steps))
    await w0.push(2, *grad(2, 0))
    await w2.push(2, *grad(2, 2))
    await w2.leave()  # leaves with its push for step 2 in: discarded on every shard
    done = await w1.push(2, *grad(2, 1))
    assert done.outcome == spb.STEP_OUTCOME_APPLIED and done.report is not None
    assert list(done.report.workers) == [0, 1] and list(done.report.missing_workers) == [2]
    _, values, _ = await w0.pull(3)
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, [*steps, [grad(2, 0), grad(2, 1)]]))
    with pytest.raises(ServiceError) as full:  # max_workers: a 4th live member is refused
        for name in ("d", "e"):
            await svc.worker("elastic", name)
    assert (full.value.code, full.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_FULL)


@pytest.mark.asyncio
async def test_bad_heartbeats_and_leaves_get_a_clear_status_and_change_nothing(svc: InProcessService) -> None:
    (w0,) = await job(svc, "hb", ["a"])
    jobs = svc.jobs()
    cases = [
        (jobs.heartbeat("", 0, w0.lease), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "job_id"),
        (jobs.heartbeat("hb", 0, 0), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "lease"),
        (jobs.heartbeat("nope", 0, w0.lease), grpc.StatusCode.NOT_FOUND, Reason.JOB_NOT_FOUND, None),
        (jobs.heartbeat("hb", 0, w0.lease + 7), grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED, None),
        (jobs.heartbeat("hb", 3, w0.lease), grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED, None),
        (jobs.leave_job("hb", 0, w0.lease + 7), grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED, None),
        (jobs.leave_job("hb", 5), grpc.StatusCode.NOT_FOUND, Reason.WORKER_NOT_FOUND, None),
    ]
    for call, code, reason, field in cases:
        with pytest.raises(ServiceError) as err:
            await call
        assert (err.value.code, err.value.reason, err.value.metadata.get("field")) == (code, reason, field), err.value
    j = await jobs.get_job("hb")  # nothing changed: the member and its lease are there
    assert [(m.worker_id, m.lease, m.lost) for m in j.members] == [(0, w0.lease, False)]
    raw = svc.jobs()._channel.unary_unary("/paramserver.v1.JobService/Heartbeat")  # undecodable bytes
    with pytest.raises(grpc.RpcError) as undecodable:
        await raw(b"\xff\xff\xff", timeout=5)
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for lease, code, reason, field in ((0, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "request.lease"),
                                       (w0.lease + 7, grpc.StatusCode.ABORTED, Reason.LEASE_EXPIRED, None)):  # fmt: skip
        stranger = svc.adopt(AsyncWorker(w0.job, 0, lease=lease, retry=NO_RETRY, timeout=TIMEOUT_S))
        with pytest.raises(ServiceError) as pulled:  # only members pull
            await stranger.pull(0)
        assert (pulled.value.code, pulled.value.reason, pulled.value.metadata.get("field")) == (code, reason, field)
    assert (await w0.push(0, *grad(0, 0))).outcome == spb.STEP_OUTCOME_APPLIED  # and the job still trains
