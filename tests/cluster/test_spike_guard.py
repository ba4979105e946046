"""The spike guard skips a spiking step on every shard alike and counts it."""

from __future__ import annotations

import numpy as np

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import JobClient, Reason, Worker
from tests.conftest import shard_tensors


def test_spike_is_skipped_on_every_shard_and_counted(address: str, job_id: str, service: object) -> None:
    n = 301
    with JobClient(address) as jc:
        jc.create_job([("w", (n,))], job_id=job_id, optimizer="adamw", hyperparameters={"lr": 1e-2}, num_workers=1,
                      num_shards=2, spike_window=16, spike_warmup=6, spike_threshold_std=4.0)  # fmt: skip
        rng = np.random.default_rng(0)
        with Worker(address, job_id) as w:
            w.upload(np.zeros(n, dtype=np.float32))
            for s in range(8):
                assert not w.push(s, rng.standard_normal(n).astype(np.float32), 1).skipped
                w.pull(s + 1)
            before = shard_tensors(service, job_id)
            spike = w.push(8, 100 * rng.standard_normal(n).astype(np.float32), 1)
            assert spike.skipped and spike.report is not None and spike.report.skip_reason == Reason.GRADIENT_SPIKE
            version, _, report = w.pull(9)
            assert version == 9 and report is not None and report.outcome == spb.STEP_OUTCOME_SKIPPED
            after = shard_tensors(service, job_id)
            for b, a in zip(before, after, strict=True):  # params, moments and step counter untouched
                assert all(np.array_equal(b[k], a[k]) for k in b)
            bad = rng.standard_normal(n).astype(np.float32)
            bad[3] = np.nan
            assert w.push(9, bad, 1).report.skip_reason == Reason.NON_FINITE_GRADIENT  # type: ignore[union-attr]
            w.pull(10)
            assert not w.push(10, rng.standard_normal(n).astype(np.float32), 1).skipped
            w.pull(11)
        job = jc.get_job(job_id)
        assert dict(job.skipped_steps) == {Reason.GRADIENT_SPIKE: 1, Reason.NON_FINITE_GRADIENT: 1}
        assert job.spec.spike_guard.window == 16
        assert all(float(s["state.0.step"]) == 9.0 for s in shard_tensors(service, job_id))
