"""Credentials, TLS and truthful reflection on the real service (Ray shard actors, each serving
its own data port)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from paramserver_client import Credentials, JobClient, Reason, ServiceError, Worker
from tests.conftest import SecuredService

SHAPES = [("w", (8, 4)), ("b", (4,))]
TOTAL = 36
REFLECTION = ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def listed(address: str, method: str, credentials: Credentials | None = None) -> set[str]:
    """The services a port's reflection lists (through `method`: the v1 or the v1alpha service)."""
    channel = grpc.secure_channel(address, _ssl(credentials)) if credentials is not None else grpc.insecure_channel(address)
    with channel:
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (resp,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return {s.name for s in resp.list_services_response.service}


def _ssl(c: Credentials) -> grpc.ChannelCredentials:
    read = lambda p: open(p, "rb").read()  # noqa: E731
    return grpc.ssl_channel_credentials(read(c.tls_ca), read(c.tls_key), read(c.tls_cert))


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_reflection_lists_only_what_each_port_serves(address: str, job_id: str) -> None:
    common = {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    for method in REFLECTION:
        assert listed(address, method) == {"paramserver.v1.JobService", *common}
    with JobClient(address) as jc:
        job = jc.create_job(SHAPES, job_id=job_id, num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 0.1})
    for shard in job.shards:
        for method in REFLECTION:
            assert listed(shard.address, method) == {"paramserver.v1.ShardService", *common}
        assert health(shard.address) == health_pb2.HealthCheckResponse.SERVING


def test_tokens_on_ray_shards_and_rotation(secure_service: SecuredService) -> None:
    job_id = "sec-ray"
    with JobClient(secure_service.address, token=secure_service.admin_token) as admin:
        job = admin.create_job(SHAPES, job_id=job_id, num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 1.0})
        try:
            token = job.worker_token
            with pytest.raises(ServiceError) as info:  # no token at all
                JobClient(secure_service.address, token="").get_job(job_id)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            w = Worker(secure_service.address, job_id, "w", token=token)
            try:
                w.upload(np.zeros(TOTAL, np.float32))
                w.push(0, np.ones(TOTAL, np.float32), 1)
                admin.rotate_job_token(job_id, previous_valid_s=0)  # the worker's token is retired on every shard
                with pytest.raises(ServiceError) as info:
                    w.push(1, np.ones(TOTAL, np.float32), 1)
                assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED)
                newest = admin.rotate_job_token(job_id, previous_valid_s=0).worker_token
                w.set_token(newest)  # the same worker goes on, without leaving the job
                _, params, _ = w.pull(1)
                np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, np.float32))
                w.push(1, np.ones(TOTAL, np.float32), 1)
                _, params, _ = w.pull(2)
                np.testing.assert_array_equal(params, np.full(TOTAL, -2.0, np.float32))
            finally:
                w.close()
        finally:
            admin.delete_job(job_id)


def test_mutual_tls_on_ray_shards(tls_service: SecuredService) -> None:
    c = Credentials(tls_service.admin_token, tls_service.ca_file, tls_service.client_cert, tls_service.client_key)
    job_id = "sec-tls"
    with JobClient(tls_service.address, credentials=c) as admin:
        job = admin.create_job(SHAPES, job_id=job_id, num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 1.0})
        try:
            w = Worker(tls_service.address, job_id, "w", credentials=c)  # an admin joining gets the worker token
            try:
                w.upload(np.zeros(TOTAL, np.float32))
                w.push(0, np.ones(TOTAL, np.float32), 1)
                _, params, _ = w.pull(1)
                np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, np.float32))
            finally:
                w.close()
            for shard in job.shards:
                assert listed(shard.address, REFLECTION[0], c) >= {"paramserver.v1.ShardService"}
                with pytest.raises(grpc.RpcError) as info:  # plaintext to a TLS shard port
                    health(shard.address)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            admin.delete_job(job_id)


def test_remote_optimizer_with_an_admin_token(secure_service: SecuredService) -> None:
    import torch

    from paramserver_client.torch_optim import RemoteOptimizer

    torch.manual_seed(0)
    model, ref = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = RemoteOptimizer(model, secure_service.address, "sec-torch", token=secure_service.admin_token, optimizer="sgd",
                          hyperparameters={"lr": 0.1}, loss="mean")  # fmt: skip
    try:
        assert opt.worker._w.credentials.token.startswith("psj.sec-torch.")  # the shards got the worker token
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step(loss_terms=8)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        torch.optim.SGD(ref.parameters(), lr=0.1).step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q)
    finally:
        opt.close()
        with JobClient(secure_service.address, token=secure_service.admin_token) as jc:
            jc.delete_job("sec-torch")
