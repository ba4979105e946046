"""A snapshot through the coordinator commits, and a job restored from it on another shard count continues bit for bit."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from paramserver import snapshot_names as names
from paramserver.snapshot_store import SnapshotRef, verify
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.aio import AsyncWorker, StepResult
from tests.service.harness import InProcessService

SHAPES = [("scale", ()), ("emb", (37, 11)), ("w1", (11, 23)), ("b1", (23,)), ("w2", (23, 5))]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(1000 * step + worker)
    terms = int(rng.integers(1, 50)) * (worker + 1)
    return (rng.standard_normal(TOTAL) * terms).astype(np.float32), terms


async def train(ws: list[AsyncWorker], steps: range) -> dict[tuple[int, int], StepResult]:
    """Push `steps` from every worker (request ids "sSTEP-wWORKER"); the answers by (step, worker)."""
    answers = {}
    for s in steps:
        for w in reversed(ws):
            answers[s, w.worker_id] = await w.push(s, *grad(s, w.worker_id), request_id=f"s{s}-w{w.worker_id}")
        assert answers[s, ws[0].worker_id].outcome == spb.STEP_OUTCOME_APPLIED
    return answers


def flat_state(tensors: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every tensor of a one-group job over the flat space: each shard holds its pieces in flat order,
    so flat tensors concatenate in shard order; 0-d counters must agree on every shard."""
    out = {}
    for key in tensors[0]:
        values = [t[key] for t in tensors]
        if values[0].ndim == 0:
            assert all(np.array_equal(v, values[0]) for v in values), key
            out[key] = values[0]
        else:
            out[key] = np.concatenate(values)
    return out


@pytest.mark.asyncio
async def test_snapshot_commits_and_a_restore_on_another_shard_count_continues_bitwise(svc: InProcessService) -> None:
    jobs = svc.jobs()
    await svc.create(SHAPES, "src", optimizer="adamw", hyperparameters={"lr": 1e-2, "weight_decay": 0.1}, max_grad_norm=1.0,
                     num_workers=2, num_shards=3)  # fmt: skip
    src = await svc.join("src", 2, "src")
    await src[0].upload(np.random.default_rng(3).standard_normal(TOTAL).astype(np.float32))
    before = await train(src, range(3))
    assert before[2, 0].report is not None and before[2, 0].report.clip_coef < 1.0  # the coordinator's clipping is on the path

    snap = await jobs.create_snapshot("src")
    assert (snap.job_id, snap.version, snap.applied_steps, snap.shards) == ("src", 3, 3, 3)
    where = Path(snap.path)
    assert where.parent.parent == svc.snapshot_dir and (where / names.MANIFEST).is_file()
    assert not (where / names.IN_PROGRESS).exists() and not list(where.glob(".tmp-*"))
    assert verify(svc.coordinator.store, SnapshotRef("src", where.name)).version == 3
    assert [s.path for s in await jobs.list_snapshots("src")] == [snap.path]
    _, at3, _ = await src[0].pull(3)

    after = await train(src, range(3, 6))
    _, final, _ = await src[1].pull(6)
    state = flat_state(await svc.tensors("src"))

    job = await jobs.restore_job(snap.path, job_id="dst", num_shards=2)
    assert job.version == 3 and len(job.shards) == 2 and job.spec.num_workers == 2 and job.spec.max_grad_norm == 1.0
    dst = await svc.join("dst", 2, "dst")
    assert not dst[0].upload_parameters
    version, restored, _ = await dst[1].pull(3)
    assert version == 3 and np.array_equal(restored, at3)
    # exactly once across the restore: a retry of a push made before the snapshot gets its first answer
    # (worker 1 pushed first: PENDING; worker 0 completed the step: APPLIED)
    assert await dst[0].push(2, *grad(2, 0), request_id="s2-w0") == before[2, 0]
    assert await dst[1].push(2, *grad(2, 1), request_id="s2-w1") == before[2, 1]

    again = await train(dst, range(3, 6))
    _, continued, _ = await dst[0].pull(6)
    assert np.array_equal(continued, final), f"max abs diff {np.abs(continued - final).max():.3e}"
    for step_worker, answer in after.items():
        assert again[step_worker].report == answer.report  # norms, clip coefficients, lr
    restored_state = flat_state(await svc.tensors("dst"))
    assert restored_state.keys() == state.keys() and "state.0.exp_avg" in state
    for key, value in state.items():
        assert np.array_equal(restored_state[key], value), key


@pytest.mark.asyncio
async def test_a_restore_into_a_running_job_is_already_exists(svc: InProcessService) -> None:
    """Restoring a snapshot under the id of its own job while that job runs (here: by default, the
    snapshot's job id) must not return the running job as if it were restored."""
    jobs = svc.jobs()
    await svc.create(SHAPES, "live", optimizer="adamw", num_workers=2, num_shards=2)
    ws = await svc.join("live", 2, "live")
    await ws[0].upload(np.zeros(TOTAL, dtype=np.float32))
    await train(ws, range(1))
    snap = await jobs.create_snapshot("live")
    await train(ws, range(1, 2))
    for target in ({}, {"job_id": "live"}):
        with pytest.raises(ServiceError) as err:
            await jobs.restore_job(snap.path, **target)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == Reason.JOB_ALREADY_EXISTS
    assert (await jobs.get_job("live")).version == 2  # untouched
    assert (await jobs.restore_job(snap.path, job_id="elsewhere")).version == 1
