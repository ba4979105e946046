"""Quorum and grace window (JobSpec.grace_window_s): a step closes with the members that pushed to
every shard once min_workers of them are in and the grace window ran out, token-weighted over
theirs; a push that reached some shards only is discarded on every shard alike; a late push is
ABORTED STEP_ALREADY_APPLIED with the current version; the report names who contributed and who
was missing; without a grace window the step still waits for every member."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.aio import new_request_id
from paramserver_client.codec import FLOAT32, to_wire
from tests.service.harness import InProcessService, torch_adamw

SHAPES = [("w", (12, 10)), ("b", (10,))]
TOTAL = 130
HYPER = {"lr": 0.01}
GRACE = 0.4


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(100 * step + worker)
    return rng.standard_normal(TOTAL).astype(np.float32), 2 + 3 * worker


@pytest.mark.asyncio
async def test_a_step_closes_with_the_quorum_after_the_grace_window(svc: InProcessService) -> None:
    await svc.create(
        SHAPES, "q", optimizer="adamw", hyperparameters=HYPER, num_workers=3, num_shards=2, min_workers=2, grace_window_s=GRACE
    )
    w0, w1, w2 = await svc.join("q", 3)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    assert (await w0.push(0, *grad(0, 0))).outcome == spb.STEP_OUTCOME_PENDING
    assert (await w1.push(0, *grad(0, 1))).outcome == spb.STEP_OUTCOME_PENDING
    # the quorum is in; the step waits the grace window for worker 2, then closes without it
    version, got, report = await w0.pull(1)
    assert version == 1 and report is not None
    assert (list(report.workers), list(report.missing_workers), report.loss_terms) == ([0, 1], [2], grad(0, 0)[1] + grad(0, 1)[1])
    assert np.array_equal(got, torch_adamw(SHAPES, init, HYPER, [[grad(0, 0), grad(0, 1)]]))
    # worker 2's push of the closed step: ABORTED with the version to resume from; nothing changes
    with pytest.raises(ServiceError) as late:
        await w2.push(0, *grad(0, 2))
    assert (late.value.code, late.value.reason) == (grpc.StatusCode.ABORTED, Reason.STEP_ALREADY_APPLIED)
    assert late.value.metadata["current_version"] == "1"
    # every member pushes the next step: it closes at once with all three
    results = await asyncio.gather(*(w.push(1, *grad(1, w.worker_id)) for w in (w0, w1, w2)))
    assert sorted(r.outcome for r in results).count(spb.STEP_OUTCOME_APPLIED) == 1
    _, got, report = await w2.pull(2)
    assert report is not None and (list(report.workers), list(report.missing_workers)) == ([0, 1, 2], [])
    want = torch_adamw(SHAPES, init, HYPER, [[grad(0, 0), grad(0, 1)], [grad(1, 0), grad(1, 1), grad(1, 2)]])
    assert np.array_equal(got, want)


@pytest.mark.asyncio
async def test_a_push_that_reached_one_shard_only_is_discarded_on_every_shard(svc: InProcessService) -> None:
    """Worker 2 pushes to shard 0 only (its push to shard 1 never comes): the shards propose
    different sets, the coordinator closes the step with the workers every shard holds, and shard
    0 drops worker 2's part, so the step never mixes it in on one shard only."""
    await svc.create(
        SHAPES, "q1", optimizer="adamw", hyperparameters=HYPER, num_workers=3, num_shards=2, min_workers=2, grace_window_s=GRACE
    )
    w0, w1, w2 = await svc.join("q1", 3)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    g2, n2 = grad(0, 2)
    part = await w2.push_shard(0, 0, to_wire(g2, FLOAT32), n2, dtype=FLOAT32, request_id=new_request_id())
    assert part.outcome == spb.STEP_OUTCOME_PENDING
    await w0.push(0, *grad(0, 0))
    await w1.push(0, *grad(0, 1))
    _, got, report = await w1.pull(1)
    assert report is not None and (list(report.workers), list(report.missing_workers)) == ([0, 1], [2])
    assert np.array_equal(got, torch_adamw(SHAPES, init, HYPER, [[grad(0, 0), grad(0, 1)]]))


@pytest.mark.asyncio
async def test_without_a_grace_window_the_step_waits_for_every_member(svc: InProcessService) -> None:
    await svc.create(SHAPES, "q0", optimizer="sgd", hyperparameters=HYPER, num_workers=3, num_shards=2, min_workers=2)
    w0, w1, w2 = await svc.join("q0", 3)
    await w0.upload(np.zeros(TOTAL, dtype=np.float32))
    await w0.push(0, *grad(0, 0))
    await w1.push(0, *grad(0, 1))
    await asyncio.sleep(3 * GRACE)
    assert (await svc.jobs().get_job("q0")).version == 0
    assert (await w2.push(0, *grad(0, 2))).outcome == spb.STEP_OUTCOME_APPLIED


@pytest.mark.asyncio
async def test_a_bad_grace_window_is_refused_naming_it(svc: InProcessService) -> None:
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ServiceError) as err:
            await svc.create(SHAPES, "qbad", optimizer="sgd", hyperparameters=HYPER, num_workers=2, grace_window_s=bad)
        assert (err.value.code, err.value.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "spec.grace_window_s")


@pytest.mark.asyncio
async def test_a_push_that_completed_a_shards_set_but_was_left_out_is_aborted(svc: InProcessService) -> None:
    """Workers 0 and 1 push everywhere; worker 2's push reaches shard 0 only and completes its set
    (so its call waits for the step): the shards agree on {0, 1}, and worker 2's call is answered
    ABORTED STEP_ALREADY_APPLIED, never APPLIED."""
    await svc.create(
        SHAPES, "q2", optimizer="adamw", hyperparameters=HYPER, num_workers=3, num_shards=2, min_workers=2, grace_window_s=GRACE
    )
    w0, w1, w2 = await svc.join("q2", 3)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    await w0.push(0, *grad(0, 0))
    await w1.push(0, *grad(0, 1))
    g2, n2 = grad(0, 2)
    with pytest.raises(ServiceError) as left_out:
        await w2.push_shard(0, 0, to_wire(g2, FLOAT32), n2, dtype=FLOAT32, request_id=new_request_id())
    assert (left_out.value.code, left_out.value.reason) == (grpc.StatusCode.ABORTED, Reason.STEP_ALREADY_APPLIED)
    assert left_out.value.metadata["current_version"] == "1"
    _, got, report = await w0.pull(1)
    assert report is not None and (list(report.workers), list(report.missing_workers)) == ([0, 1], [2])
    assert np.array_equal(got, torch_adamw(SHAPES, init, HYPER, [[grad(0, 0), grad(0, 1)]]))
