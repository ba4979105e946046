"""The step machine through the data plane: exactly once, stale and early pushes, duplicates, pending steps."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.aio import AsyncWorker
from tests.service.harness import InProcessService

SHAPES = [("w", (40, 9)), ("b", (9,))]
TOTAL = 369
LR = 0.5


def full(value: float) -> np.ndarray:
    return np.full(TOTAL, value, dtype=np.float32)


async def sgd_job(svc: InProcessService, job_id: str, workers: int) -> list[AsyncWorker]:
    """A 2-shard SGD job (lr 0.5) with `workers` workers joined and zeros uploaded."""
    await svc.create(SHAPES, job_id, optimizer="sgd", hyperparameters={"lr": LR}, num_workers=workers, num_shards=2)
    ws = await svc.join(job_id, workers)
    await ws[0].upload(full(0.0))
    return ws


async def params(w: AsyncWorker, version: int) -> np.ndarray:
    got, values, _ = await w.pull(version)
    assert got == version
    return values


@pytest.mark.asyncio
async def test_a_retried_push_gets_the_first_answer_and_is_applied_once(svc: InProcessService) -> None:
    (w,) = await sgd_job(svc, "once", 1)
    first = await w.push(0, full(1.0), 1, request_id="req-0")
    assert first.outcome == spb.STEP_OUTCOME_APPLIED and first.version == 1 and first.report is not None
    again = await w.push(0, full(1.0), 1, request_id="req-0")  # a retry after the step was applied
    assert again == first
    for other, lrs in (((full(7.0), 1), ()), ((full(1.0), 2), ()), ((full(1.0), 1), (0.5,))):  # another gradient, terms, lr
        with pytest.raises(ServiceError) as changed:
            await w.push(0, *other, request_id="req-0", lrs=lrs)
        assert (changed.value.code, changed.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.REQUEST_ID_REUSED)
    assert np.array_equal(await params(w, 1), full(-LR))  # applied once, with the first push's gradient
    assert (await svc.jobs().get_job("once")).version == 1
    with pytest.raises(ServiceError) as reused:  # the same id for another call
        await w.push(1, full(1.0), 1, request_id="req-0")
    assert reused.value.code == grpc.StatusCode.INVALID_ARGUMENT and reused.value.reason == Reason.REQUEST_ID_REUSED
    assert (await w.push(1, full(1.0), 1, request_id="req-1")).version == 2  # the step machine moves on
    assert np.array_equal(await params(w, 2), full(-2 * LR))


@pytest.mark.asyncio
async def test_a_retried_pending_push_gets_its_first_answer_before_and_after_the_step(svc: InProcessService) -> None:
    w0, w1 = await sgd_job(svc, "once-pending", 2)
    first = await w0.push(0, full(2.0), 1, request_id="a")
    assert first.outcome == spb.STEP_OUTCOME_PENDING and first.version == 0 and first.report is None
    assert await w0.push(0, full(2.0), 1, request_id="a") == first  # not DUPLICATE_CONTRIBUTION, not counted twice
    with pytest.raises(ServiceError) as changed:  # the same id with another gradient: refused, not silently dropped
        await w0.push(0, full(100.0), 1, request_id="a")
    assert changed.value.reason == Reason.REQUEST_ID_REUSED
    with pytest.raises(ServiceError) as other:  # the same id from another worker
        await w1.push(0, full(2.0), 1, request_id="a")
    assert other.value.reason == Reason.REQUEST_ID_REUSED
    done = await w1.push(0, full(4.0), 1)
    assert done.outcome == spb.STEP_OUTCOME_APPLIED and done.report is not None and done.report.loss_terms == 2
    assert np.array_equal(await params(w1, 1), full(-LR * (2.0 + 4.0) / 2))
    assert await w0.push(0, full(2.0), 1, request_id="a") == first  # still the first answer, not ABORTED
    assert (await svc.jobs().get_job("once-pending")).version == 1


@pytest.mark.asyncio
async def test_a_push_for_an_applied_step_is_aborted_with_the_current_version(svc: InProcessService) -> None:
    (w,) = await sgd_job(svc, "stale", 1)
    for s in range(2):
        await w.push(s, full(1.0), 1)
    with pytest.raises(ServiceError) as err:
        await w.push(0, full(1.0), 1)
    assert err.value.code == grpc.StatusCode.ABORTED and err.value.reason == Reason.STEP_ALREADY_APPLIED
    assert err.value.metadata["current_version"] == "2" and err.value.metadata["step"] == "0"
    assert np.array_equal(await params(w, 2), full(-2 * LR))


@pytest.mark.asyncio
async def test_a_push_for_a_future_step_is_not_ready(svc: InProcessService) -> None:
    w0, w1 = await sgd_job(svc, "early", 2)
    with pytest.raises(ServiceError) as err:
        await w0.push(1, full(1.0), 1)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == Reason.STEP_NOT_READY
    assert err.value.metadata["current_version"] == "0"
    for w in (w0, w1):  # nothing was recorded: step 0 still takes both workers
        await w.push(0, full(1.0), 1)
    assert np.array_equal(await params(w0, 1), full(-LR))


@pytest.mark.asyncio
async def test_a_second_push_of_a_worker_with_another_request_id_is_a_duplicate(svc: InProcessService) -> None:
    w0, w1 = await sgd_job(svc, "dup", 2)
    assert (await w0.push(0, full(2.0), 1, request_id="a")).outcome == spb.STEP_OUTCOME_PENDING
    with pytest.raises(ServiceError) as err:
        await w0.push(0, full(100.0), 1, request_id="b")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == Reason.DUPLICATE_CONTRIBUTION
    assert err.value.metadata == {"worker_id": "0", "step": "0"}
    done = await w1.push(0, full(4.0), 1)
    assert done.outcome == spb.STEP_OUTCOME_APPLIED and done.report is not None and done.report.loss_terms == 2
    assert np.array_equal(await params(w0, 1), full(-LR * 3.0))  # the first contribution, once


@pytest.mark.asyncio
async def test_a_pending_step_holds_pulls_of_the_next_version_until_the_last_worker_pushes(svc: InProcessService) -> None:
    w0, w1 = await sgd_job(svc, "pending", 2)
    waiting = asyncio.create_task(w1.pull(1))
    pending = await w0.push(0, full(1.0), 1)
    assert pending.outcome == spb.STEP_OUTCOME_PENDING and pending.version == 0 and pending.report is None
    impatient = svc.adopt(AsyncWorker(w0.job, w0.worker_id, pull_timeout=0.3, retry=w0.retry, lease=w0.lease))
    with pytest.raises(ServiceError) as err:  # the version is not published: a pull waits out its deadline
        await impatient.pull(1)
    # ... and says which worker the step waits for, before the caller's own deadline fires
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.reason == Reason.STEP_WAITING_FOR_WORKERS, err.value
    assert err.value.metadata["waiting_for"] == str(w1.worker_id) and f"workers [{w1.worker_id}]" in err.value.message
    assert not waiting.done()
    job = await svc.jobs().get_job("pending")
    assert job.version == 0 and all(s.version == 0 for s in job.shards)
    assert np.array_equal(await params(w0, 0), full(0.0))  # the published version still serves
    done = await w1.push(0, full(3.0), 1)
    assert done.outcome == spb.STEP_OUTCOME_APPLIED and done.version == 1
    version, values, report = await asyncio.wait_for(waiting, 10)
    assert version == 1 and np.array_equal(values, full(-LR * 2.0))
    assert report is not None and report.step == 0 and report.outcome == spb.STEP_OUTCOME_APPLIED
