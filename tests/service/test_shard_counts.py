"""Through the service: a clipped, spike-guarded job gives the same bits on 1, 2, 3 and 5 shards
(the global norm is reduced over fixed blocks, so the clip coefficient and the guard's decisions do
not depend on how the model is split)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from paramserver.v1 import shard_service_pb2 as spb
from tests.service.harness import InProcessService

# Over three norm blocks (8,192 elements each), so that shards hold whole blocks and cut others.
SHAPES = [("emb", (300, 64)), ("w", (64, 96)), ("b", (96,)), ("head", (64, 7))]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)
SETTINGS: dict[str, Any] = {
    "optimizer": "adamw",
    "hyperparameters": {"lr": 1e-2, "weight_decay": 0.1},
    "num_workers": 2,
    "max_grad_norm": 5.0,
    "spike_window": 4,
    "spike_warmup": 2,
    "spike_threshold_std": 1.0,
}


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    """Gradients over many orders of magnitude (where summation order shows), a spike at step 5."""
    rng = np.random.default_rng(100 * step + worker)
    g = rng.standard_normal(TOTAL) * 10.0 ** rng.integers(-6, 2, TOTAL) * (40.0 if step == 5 else 1.0)
    return g.astype(np.float32), 3 + worker


async def run(svc: InProcessService, shards: int) -> tuple[np.ndarray, list[tuple[int, str, float, float]], dict[str, int]]:
    job_id = f"n{shards}"
    job = await svc.create(SHAPES, job_id, num_shards=shards, **SETTINGS)
    assert len(job.shards) == shards
    w0, w1 = await svc.join(job_id, 2)
    await w0.upload(np.linspace(-1, 1, TOTAL, dtype=np.float32))
    reports = []
    for s in range(8):
        await w0.push(s, *grad(s, 0))
        done = await w1.push(s, *grad(s, 1))
        assert done.report is not None
        r = done.report
        reports.append((r.outcome, r.skip_reason, r.grad_norm, r.clip_coef))
    _, params, _ = await w0.pull(8)
    skips = dict((await svc.jobs().get_job(job_id)).skipped_steps)
    return params, reports, skips


@pytest.mark.asyncio
async def test_clipped_spike_guarded_training_is_bitwise_equal_on_1_2_3_and_5_shards(svc: InProcessService) -> None:
    ref_params, ref_reports, ref_skips = await run(svc, 1)
    assert any(r[0] == spb.STEP_OUTCOME_APPLIED and r[3] < 1.0 for r in ref_reports)  # clipping happened
    assert ref_skips.get("GRADIENT_SPIKE", 0) >= 1  # and the guard skipped the spike
    for shards in (2, 3, 5):
        params, reports, skips = await run(svc, shards)
        assert reports == ref_reports, shards  # the same norms, coefficients and decisions, bit for bit
        assert skips == ref_skips
        assert np.array_equal(params, ref_params), shards
