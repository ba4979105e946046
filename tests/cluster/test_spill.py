"""Spilling through the service: a job over its shards' memory budget trains bit for bit like one in
memory, within the budget, with preallocated spill files that are removed with the job; a disk
that cannot hold them, or a budget too small, is a clear error that creates nothing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from paramserver.jobconfig import MAX_JOB_ELEMENTS, MAX_PARAM_ELEMENTS
from paramserver_client import JobClient, Reason, ServiceError, Worker
from tests.conftest import SPILL_DIR, shard_tensors

MIB = 1 << 20
#: 16M parameters: 192 MiB of params + AdamW moments per shard, ~450 MiB for an in-memory shard
#: with its gradient buffers; the budget keeps a third of that.
SHAPES = [("embed.weight", (8192, 1024)), ("blocks.0.w", (1024, 4096)), ("blocks.0.b", (4096,)), ("head.weight", (1024, 3072))]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)
BUDGET = 128 * MIB
STEPS = 3


def train(address: str, job_id: str, p0: np.ndarray, sample: threading.Event | None = None) -> np.ndarray:
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        ws[0].upload(p0)
        for s in range(STEPS):
            for w in ws:
                rng = np.random.default_rng(100 * s + w.worker_id)
                w.push(s, rng.standard_normal(TOTAL, dtype=np.float32), 3 + w.worker_id)
            ws[1].pull(s + 1)
        _, final, _ = ws[0].pull(STEPS)
    return final.copy()


def peak_during(service: object, job_id: str, fn: object) -> tuple[int, object]:
    """Run fn(); return how far the shard process's resident memory rose above where it was."""
    svc = service
    (before,) = svc.run(svc.service.cluster.shard_memory(job_id, reset_peak=True))  # type: ignore[attr-defined]
    result = fn()  # type: ignore[operator]
    (after,) = svc.run(svc.service.cluster.shard_memory(job_id))  # type: ignore[attr-defined]
    return after["peak"] - before["rss"], result


def test_a_spilled_job_trains_like_an_in_memory_one_within_its_budget(address: str, service: object) -> None:
    p0 = np.random.default_rng(0).standard_normal(TOTAL).astype(np.float32)
    ids = [f"spill-{os.getpid()}-{k}" for k in ("mem", "disk")]
    settings = {"optimizer": "adamw", "hyperparameters": {"lr": 1e-3}, "max_grad_norm": 1.0, "num_workers": 2, "num_shards": 1}
    results, rises, memories = [], [], []
    with JobClient(address) as jc:
        try:
            for jid, budget in zip(ids, (0, BUDGET), strict=True):
                jc.create_job(SHAPES, job_id=jid, shard_memory_budget_bytes=budget, **settings)
                if budget:
                    files = sorted((SPILL_DIR / jid).glob("*.spill"))
                    assert files and all(f.stat().st_blocks * 512 >= f.stat().st_size > 0 for f in files)  # preallocated
                rise, final = peak_during(service, jid, lambda jid=jid: train(address, jid, p0))
                results.append(final)
                rises.append(rise)
                memories.append(jc.get_job(jid).shards[0].memory)
            assert np.array_equal(results[0], results[1])
            mem_state, disk_state = (shard_tensors(service, jid)[0] for jid in ids)
            assert mem_state.keys() == disk_state.keys()
            for k in mem_state:
                assert np.array_equal(mem_state[k], disk_state[k]), k
            m = memories[1]
            assert m.budget_bytes == BUDGET and m.spilled_bytes > 0 and m.resident_bytes + m.buffer_bytes <= BUDGET
            assert m.read_bytes > 0 and m.written_bytes > 0 and m.read_bytes_per_second > 0 and m.write_bytes_per_second > 0
            assert memories[0].spilled_bytes == 0 and memories[0].resident_bytes >= TOTAL * 12
            # the spilled job's snapshot (streamed from its tiles) restores in memory, state and all
            snap = jc.create_snapshot(ids[1])
            restored = f"{ids[1]}-restored"
            ids.append(restored)
            job = jc.restore_job(snap.path, job_id=restored, shard_memory_budget_bytes=1 << 50)  # (0 = keep the snapshot's)
            assert job.shards[0].memory.spilled_bytes == 0
            again = shard_tensors(service, restored)[0]
            assert again.keys() == disk_state.keys() and all(np.array_equal(again[k], disk_state[k]) for k in again)
            # the in-memory shard rose by more than the budget; the spilled one stayed within it
            assert rises[0] > BUDGET + 64 * MIB, rises
            assert rises[1] <= BUDGET, (rises, m)
        finally:
            for jid in ids:
                try:
                    jc.delete_job(jid)
                except ServiceError:
                    pass
    time.sleep(0.5)
    assert not list((SPILL_DIR / ids[1]).glob("*.spill"))  # removed with the job


def test_a_disk_that_cannot_hold_the_spill_files_is_resource_exhausted(address: str, job_id: str) -> None:
    st = os.statvfs(SPILL_DIR if SPILL_DIR.exists() else SPILL_DIR.parent)
    free_elements = st.f_bavail * st.f_frsize // 4
    if free_elements >= MAX_JOB_ELEMENTS:
        pytest.skip("the spill disk holds more than the largest job a description may ask for")
    # params alone would fill the disk, in parameters within the per-parameter limit
    count = -(-(free_elements + 1) // MAX_PARAM_ELEMENTS)
    rows = -(-(free_elements + 1) // (count * 1024))
    shapes = [(f"w{i}", (rows, 1024)) for i in range(count)]
    with JobClient(address) as jc:
        with pytest.raises(ServiceError) as err:
            jc.create_job(shapes, job_id=job_id, optimizer="sgd", shard_memory_budget_bytes=256 * MIB)
        e = err.value
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == Reason.SPILL_DISK_FULL
        assert e.metadata["path"].startswith(str(SPILL_DIR)) and int(e.metadata["bytes_needed"]) > int(e.metadata["bytes_free"])
        with pytest.raises(ServiceError) as nf:
            jc.get_job(job_id)
        assert nf.value.code == grpc.StatusCode.NOT_FOUND
    assert not list(Path(SPILL_DIR / job_id).glob("*.spill"))


def test_a_budget_below_the_io_buffers_is_invalid_argument(address: str, job_id: str) -> None:
    with JobClient(address) as jc:
        with pytest.raises(ServiceError) as err:
            jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", shard_memory_budget_bytes=8 * MIB)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.metadata["field"] == "spec.shard_memory_budget_bytes"
