"""The asyncio client, RemoteOptimizer in a torch loop, health and reflection."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserver_client import BFLOAT16, JobClient, Reason
from paramserver_client.aio import AsyncJobClient, AsyncWorker
from paramserver_client.codec import decode, encode
from paramserver_client.torch_optim import RemoteOptimizer


@pytest.mark.asyncio
async def test_aio_client_full_flow(address: str, job_id: str) -> None:
    async with AsyncJobClient(address) as jobs:
        job = await jobs.create_job([("a", (300_001,)), ("b", (7, 3))], job_id=job_id, optimizer="sgd",
                                    hyperparameters={"lr": 0.5}, num_workers=2, num_shards=3)  # fmt: skip
        assert job.state == 1  # awaiting parameters
        total = int(job.total_elements)
        w0 = await AsyncWorker.join(address, job_id, "x")
        w1 = await AsyncWorker.join(address, job_id, "y")
        assert {w0.worker_id, w1.worker_id} == {0, 1}
        up = w0 if w0.upload_parameters else w1
        p0 = np.random.default_rng(0).standard_normal(total).astype(np.float32)
        await up.upload(p0)
        assert (await jobs.get_job(job_id)).state == 2  # running
        g0 = np.random.default_rng(1).standard_normal(total).astype(np.float32)
        g1 = np.random.default_rng(2).standard_normal(total).astype(np.float32)
        r0 = await w0.push(0, g0, 3, dtype=BFLOAT16)  # bf16 on the wire
        r1 = await w1.push(0, g1, 5, dtype=BFLOAT16)
        assert {r0.outcome, r1.outcome} == {1, 2}  # one pending, one completing the step
        version, params, report = await w1.pull(1)
        assert version == 1 and report is not None and report.loss_terms == 8
        wire = [decode(encode(g, BFLOAT16), BFLOAT16) for g in (g0 if w0.worker_id == 0 else g1, g1 if w0.worker_id == 0 else g0)]
        expected = p0 - np.float32(0.5) * ((wire[0] + wire[1]) / np.float32(8))
        np.testing.assert_allclose(params, expected, rtol=1e-6, atol=1e-6)
        _, params_bf16, _ = await w0.pull(1, dtype=BFLOAT16)
        np.testing.assert_array_equal(params_bf16, decode(encode(params, BFLOAT16), BFLOAT16))
        await w0.close()
        await w1.close()
        await jobs.leave_job(job_id, 0)
        assert list((await jobs.get_job(job_id)).workers) == [1]


def test_remote_optimizer_trains_like_torch(address: str, job_id: str) -> None:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    data = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 6, generator=data) for n in (5, 11)]
    ys = [x.sum(dim=1, keepdim=True) for x in xs]
    steps = 30
    hyper = {"lr": 0.02, "weight_decay": 0.0}
    results: dict[int, torch.nn.Module] = {}
    errors: list[BaseException] = []
    models = [make(), make()]  # here, not in the threads: make() seeds torch's global generator

    def worker(i: int) -> None:
        try:
            model = models[i]
            opt = RemoteOptimizer(model.named_parameters(), address, job_id, optimizer="adamw", hyperparameters=hyper,
                                  num_workers=2, num_shards=2, worker_name=f"t{i}")  # fmt: skip
            x, y = xs[opt.worker_id], ys[opt.worker_id]
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)  # a mean over this worker's samples
                loss.backward()
                opt.step(loss_terms=len(x), loss_is_mean=True)
            results[opt.worker_id] = model
            opt.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    ref = make()
    opt = torch.optim.AdamW(ref.parameters(), **hyper, fused=True)  # type: ignore[arg-type]
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x_all), y_all).backward()
        opt.step()
    for model in results.values():
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_health_and_reflection(address: str) -> None:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="paramserver.v1.JobService"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"paramserver.v1.JobService", "grpc.health.v1.Health"} <= names
        assert "paramserver.v1.ShardService" not in names  # served by the shards' ports, not here


def test_client_library_needs_neither_ray_nor_torch() -> None:
    code = (
        "import sys, paramserver_client, paramserver_client.aio, paramserver_client.client\n"
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "server_internals = [m for m in sys.modules if m.startswith('paramserver.') and not m.startswith('paramserver.v1')]\n"
        "assert not server_internals, server_internals\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_jobs_are_listed_and_deleted(address: str, job_id: str) -> None:
    with JobClient(address) as jc:
        jc.create_job([("w", (4,))], job_id=job_id, optimizer="sgd", num_workers=1, num_shards=1)
        from paramserver_client import ServiceError

        with pytest.raises(ServiceError) as exists:  # a rerun never joins the old job by accident
            jc.create_job([("w", (4,))], job_id=job_id, optimizer="sgd", num_workers=1, num_shards=1)
        assert (exists.value.code, exists.value.reason) == (grpc.StatusCode.ALREADY_EXISTS, Reason.JOB_ALREADY_EXISTS)
        assert exists.value.metadata["version"] == "0" and "resume=True" in str(exists.value)
        again = jc.create_job([("w", (4,))], job_id=job_id, optimizer="sgd", num_workers=1, num_shards=1, resume=True)
        assert again.job_id == job_id  # same description, resume: the existing job
        assert job_id in {j.job_id for j in jc.list_jobs()}

        with pytest.raises(ServiceError) as err:
            jc.create_job([("w", (5,))], job_id=job_id, optimizer="sgd", num_workers=1, num_shards=1)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        jc.delete_job(job_id)
        assert job_id not in {j.job_id for j in jc.list_jobs()}


def test_remote_optimizer_skips_the_layers_lisa_froze(address: str, job_id: str) -> None:
    """The pull header names the parameters the next update does not train; RemoteOptimizer turns
    their requires_grad off, so backward skips them, and training equals torch AdamW with those
    layers frozen."""
    from paramserver.optim.lisa import sample_layers

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.ModuleDict(
            {
                "embed": torch.nn.Linear(4, 8),
                "blocks": torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)]),
                "head": torch.nn.Linear(8, 1),
            }
        )

    def forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(m["embed"](x))  # type: ignore[index]
        for blk in m["blocks"]:  # type: ignore[index]
            h = torch.tanh(blk(h))
        return m["head"](h)  # type: ignore[index, no-any-return]

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    hyper = {"lr": 1e-2, "active_layers": 1, "interval_steps": 3, "seed": 5}
    model = make()
    names = [n for n, _ in model.named_parameters()]
    opt = RemoteOptimizer(model.named_parameters(), address, job_id, optimizer="lisa", hyperparameters=hyper, num_shards=2)
    ref_model = make()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, fused=True)
    for s in range(9):
        active = sample_layers([0, 1, 2], 1, 5, s // 3)
        frozen = {i for i, n in enumerate(names) if n.startswith("blocks.") and int(n.split(".")[1]) not in active}
        assert opt.worker.frozen == frozen
        opt.zero_grad()
        torch.nn.functional.mse_loss(forward(model, x), y, reduction="sum").backward()
        assert all((p.grad is None) == (i in frozen) for i, p in enumerate(model.parameters()))
        opt.step(loss_terms=1)
        ref.zero_grad()
        torch.nn.functional.mse_loss(forward(ref_model, x), y, reduction="sum").backward()
        for i, p in enumerate(ref_model.parameters()):
            if i in frozen:
                p.grad = None
        ref.step()
    opt.close()
    assert all(p.requires_grad for p in model.parameters())
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
