"""Training through the in-process service equals torch; a non-finite gradient skips the step everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason
from tests.service.harness import InProcessService, assert_same_tensors, torch_adamw

SHAPES = [("scale", ()), ("emb", (37, 11)), ("w1", (11, 23)), ("b1", (23,)), ("w2", (23, 5))]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    """A seeded gradient of a summed loss and its (uneven) loss-term count."""
    rng = np.random.default_rng(1000 * step + worker)
    terms = int(rng.integers(1, 50)) * (worker + 1)
    return (rng.standard_normal(TOTAL) * terms).astype(np.float32), terms


def p0(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(TOTAL).astype(np.float32)


@pytest.mark.asyncio
async def test_two_workers_two_shards_equal_torch_adamw_bitwise(svc: InProcessService) -> None:
    job = await svc.create(SHAPES, "parity", optimizer="adamw", hyperparameters={**HYPER, "betas": [0.9, 0.99]},
                           num_workers=2, num_shards=2)  # fmt: skip
    assert len(job.shards) == 2 and job.total_elements == TOTAL
    cut = int(job.shards[1].ranges[0].start)
    assert any(p.offset < cut < p.offset + p.numel for p in job.layout) and cut % 2 == 1, "a tensor must be cut at an odd offset"
    w0, w1 = await svc.join("parity", 2)
    assert (w0.worker_id, w1.worker_id) == (0, 1) and w0.upload_parameters and not w1.upload_parameters
    init = p0()
    await w0.upload(init)
    steps = 4
    for s in range(steps):
        first = await w1.push(s, *grad(s, 1))  # arrival order must not matter
        assert first.outcome == spb.STEP_OUTCOME_PENDING and first.version == s
        done = await w0.push(s, *grad(s, 0))
        assert done.outcome == spb.STEP_OUTCOME_APPLIED and done.version == s + 1
        assert done.report is not None and done.report.step == s and done.report.loss_terms == grad(s, 0)[1] + grad(s, 1)[1]
        version, _, report = await w1.pull(s + 1)
        assert version == s + 1 and report is not None and report.outcome == spb.STEP_OUTCOME_APPLIED
    _, final, _ = await w0.pull(steps)
    ref = torch_adamw(SHAPES, init, HYPER, [[grad(s, 0), grad(s, 1)] for s in range(steps)])
    assert np.array_equal(final, ref), f"max abs diff {np.abs(final - ref).max():.3e}"
    got = await svc.jobs().get_job("parity")
    assert got.version == steps and got.state == jpb.JOB_STATE_RUNNING and all(s.version == steps for s in got.shards)


@pytest.mark.asyncio
async def test_non_finite_gradient_skips_the_step_on_every_shard(svc: InProcessService) -> None:
    await svc.create(SHAPES, "nan", optimizer="adamw", hyperparameters={**HYPER, "betas": [0.9, 0.99]}, num_workers=2, num_shards=2)
    w0, w1 = await svc.join("nan", 2)
    init = p0()
    await w0.upload(init)
    for w in (w0, w1):
        await w.push(0, *grad(0, w.worker_id))
    _, after0, _ = await w0.pull(1)
    before = await svc.tensors("nan")

    bad, n = grad(1, 0)
    bad[TOTAL - 1] = np.nan  # only on the last shard: the first one must skip too
    assert (await svc.handles("nan"))[0].host.spans[-1].end < TOTAL
    assert (await w0.push(1, bad, n)).outcome == spb.STEP_OUTCOME_PENDING
    result = await w1.push(1, *grad(1, 1))
    assert result.outcome == spb.STEP_OUTCOME_SKIPPED and result.skipped and result.version == 2
    assert result.report is not None and result.report.skip_reason == Reason.NON_FINITE_GRADIENT
    version, params, report = await w1.pull(2)
    assert version == 2 and report is not None and report.outcome == spb.STEP_OUTCOME_SKIPPED
    assert report.skip_reason == Reason.NON_FINITE_GRADIENT and report.step == 1
    assert np.array_equal(params, after0)
    assert_same_tensors(before, await svc.tensors("nan"))  # parameters, moments and step counters
    job = await svc.jobs().get_job("nan")
    assert dict(job.skipped_steps) == {Reason.NON_FINITE_GRADIENT: 1} and job.version == 2

    for w in (w0, w1):  # the next step trains as if the skipped one never came
        await w.push(2, *grad(2, w.worker_id))
    _, final, _ = await w0.pull(3)
    assert np.array_equal(final, torch_adamw(SHAPES, init, HYPER, [[grad(s, 0), grad(s, 1)] for s in (0, 2)]))
