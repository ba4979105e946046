"""ReadOptimizerState through the real front door and shard hosts (no Ray): a job's optimizer
state per parameter, in torch's layout, equal to torch.optim.AdamW's after the same steps; bad
requests get a clear status."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import torch

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import Reason, ServiceError
from tests.service.harness import InProcessService
from tests.service.test_membership import HYPER, P0, SHAPES, grad


def torch_state(steps: int) -> dict[str, dict[str, Any]]:
    """torch.optim.AdamW (fused, one thread) after `steps` steps of worker 0's gradients: each
    parameter's state by name."""
    params, off = [], 0
    for _, shape in SHAPES:
        n = int(np.prod(shape))
        params.append(torch.tensor(P0[off : off + n].reshape(shape), requires_grad=True))
        off += n
    opt = torch.optim.AdamW(params, **HYPER, fused=True)
    for s in range(steps):
        g, n = grad(s, 0)
        full = torch.from_numpy(g) / n
        off = 0
        for p in params:
            p.grad = full[off : off + p.numel()].view(p.shape).clone()
            off += p.numel()
        opt.step()
    return {name: opt.state[p] for (name, _), p in zip(SHAPES, params, strict=True)}


@pytest.mark.asyncio
async def test_the_optimizer_state_read_from_any_shard_count_is_torchs(svc: InProcessService) -> None:
    await svc.create(SHAPES, "st", optimizer="adamw", hyperparameters=HYPER, num_shards=3, num_workers=1)
    w = await svc.worker("st", "a")
    await w.upload(P0)
    for s in range(3):
        await w.push(s, *grad(s, 0))
        await w.pull(s + 1)
    jc = svc.jobs()
    state = await jc.read_optimizer_state("st")  # a new snapshot at the current version
    assert state.version == 3 and state.snapshot in {s.path for s in await jc.list_snapshots("st")}
    want = torch_state(3)
    assert set(state.tensors) == {name for name, _ in SHAPES}
    for name, shape in SHAPES:
        got = state.tensors[name]
        assert set(got) == {"step", "exp_avg", "exp_avg_sq"}, got.keys()
        assert got["step"].shape == () and float(got["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[key].shape == tuple(shape)
            assert np.array_equal(got[key], want[name][key].numpy()), (name, key)  # bit for bit
    again = await jc.read_optimizer_state("st", state.snapshot)  # the same snapshot, named
    assert all(np.array_equal(again.tensors[n][k], v) for n, d in state.tensors.items() for k, v in d.items())


@pytest.mark.asyncio
async def test_a_bad_state_read_gets_a_clear_status(svc: InProcessService) -> None:
    await svc.create(SHAPES, "sx", optimizer="adamw", hyperparameters=HYPER, num_shards=1, num_workers=1)
    await svc.create(SHAPES, "sy", optimizer="adamw", hyperparameters=HYPER, num_shards=1, num_workers=1)
    for job in ("sx", "sy"):
        w = await svc.worker(job, "a")
        await w.upload(P0)
    jc = svc.jobs()
    other = await jc.create_snapshot("sy")
    cases = [
        (jc.read_optimizer_state(""), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "job_id"),
        (jc.read_optimizer_state("nope"), grpc.StatusCode.NOT_FOUND, Reason.JOB_NOT_FOUND, None),
        (jc.read_optimizer_state("sx", "sx:latest"), grpc.StatusCode.NOT_FOUND, Reason.SNAPSHOT_NOT_FOUND, None),
        (jc.read_optimizer_state("sx", other.path), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "snapshot"),
    ]
    for call, code, reason, field in cases:
        with pytest.raises(ServiceError) as err:
            await call
        assert (err.value.code, err.value.reason, err.value.metadata.get("field")) == (code, reason, field), err.value
    raw = jc._channel.unary_stream("/paramserver.v1.JobService/ReadOptimizerState")
    with pytest.raises(grpc.RpcError) as undecodable:
        async for _ in raw(b"\xff\xff\xff", timeout=5):
            pass
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await jc.get_job("sx")).state == jpb.JOB_STATE_RUNNING  # the service still serves
    assert (await jc.read_optimizer_state("sx")).version == 0
