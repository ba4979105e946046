"""TLS and mutual TLS on every port (front door and shards), with certificates made at test time:
plaintext refused, wrong CA refused, missing, foreign or expired client certificates refused,
expired server certificates refused, and certificate files reloaded when they change."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver.access import AuthConfig
from paramserver.tls import TlsConfig
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import AsyncWorker, Credentials, ServiceError
from tests.certs import Authority, Pair
from tests.service.harness import NO_RETRY, TIMEOUT_S, InProcessService

pytestmark = pytest.mark.asyncio

ADMIN = "tls-test-admin-token-0123456789"
SHAPES = [("w", (4, 3))]
TOTAL = 12


@dataclass
class Pki:
    ca: Authority
    other: Authority
    server: Pair
    client: Pair
    expired_client: Pair
    foreign_client: Pair
    expired_server: Pair


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = Authority(tmp_path, "good"), Authority(tmp_path, "other")
    return Pki(
        ca,
        other,
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        ca.issue("old-client", server=False, expired=True),
        other.issue("client", server=False),
        ca.issue("old-server", server=True, expired=True),
    )


async def started(root: Path, tls: TlsConfig) -> InProcessService:
    svc = InProcessService(root, auth=AuthConfig.single(ADMIN), tls=tls)
    await svc.start()
    return svc


@pytest_asyncio.fixture
async def mtls(tmp_path: Path, pki: Pki) -> AsyncIterator[InProcessService]:
    svc = await started(tmp_path, TlsConfig(pki.server.cert, pki.server.key, client_ca_file=pki.ca.ca_file))
    try:
        yield svc
    finally:
        await svc.close()


def creds(pki: Pki, client: Pair | None, ca: str | None = None, token: str = ADMIN) -> Credentials:
    return Credentials(token, ca or pki.ca.ca_file, client.cert if client else "", client.key if client else "")


async def train_one_step(svc: InProcessService, credentials: Credentials, job_id: str) -> None:
    jobs = svc.jobs(credentials=credentials)
    job = await jobs.create_job(SHAPES, job_id=job_id, num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 1.0})
    w = svc.adopt(await AsyncWorker.join(svc.address, job_id, "w", timeout=TIMEOUT_S, retry=NO_RETRY, credentials=credentials))
    assert w.credentials.token == job.worker_token or w.credentials.token.startswith(f"psj.{job_id}.")
    await w.upload(np.zeros(TOTAL, np.float32))
    await w.push(0, np.ones(TOTAL, np.float32), 1)
    _, params, _ = await w.pull(1)
    np.testing.assert_array_equal(params, np.full(TOTAL, -1.0, np.float32))


async def refused(svc: InProcessService, credentials: Credentials | None) -> grpc.StatusCode:
    """The code of a ListJobs through `credentials` (None: plaintext)."""
    kwargs = {"credentials": credentials} if credentials is not None else {"token": ADMIN}
    with pytest.raises(ServiceError) as info:
        await svc.jobs(**kwargs).list_jobs()
    return info.value.code


async def shard_refused(address: str, credentials: Credentials | None) -> grpc.StatusCode:
    channel = credentials.channel(address, []) if credentials is not None else aio.insecure_channel(address)
    async with channel:
        call = channel.unary_stream("/paramserver.v1.ShardService/PullParameters", request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call(spb.PullParametersRequest(job_id="x"), timeout=5):
                pass
    return info.value.code()


async def test_mutual_tls_trains_and_refuses_every_bad_client(mtls: InProcessService, pki: Pki) -> None:
    await train_one_step(mtls, creds(pki, pki.client), "tls-ok")
    shards = (await mtls.jobs(credentials=creds(pki, pki.client)).get_job("tls-ok")).shards
    bad = {
        "plaintext": None,
        "no client certificate": creds(pki, None),
        "client certificate of another CA": creds(pki, pki.foreign_client),
        "expired client certificate": creds(pki, pki.expired_client),
        "server checked against the wrong CA": creds(pki, pki.client, ca=pki.other.ca_file),
    }
    for what, c in bad.items():
        assert await refused(mtls, c) == grpc.StatusCode.UNAVAILABLE, what
        for shard in shards:  # the shard ports are just as strict
            assert await shard_refused(shard.address, c) == grpc.StatusCode.UNAVAILABLE, what
    assert [j.job_id for j in mtls.coordinator.jobs.values()] == ["tls-ok"]
    # a good client still works; health answers over TLS without a token
    await train_one_step(mtls, creds(pki, pki.client), "tls-ok-2")
    async with creds(pki, pki.client, token="").channel(mtls.address, []) as channel:
        await mtls.health.set("", health_pb2.HealthCheckResponse.SERVING)
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_server_tls_without_client_certificates(tmp_path: Path, pki: Pki) -> None:
    svc = await started(tmp_path, TlsConfig(pki.server.cert, pki.server.key))
    try:
        await train_one_step(svc, creds(pki, None), "tls-server-only")
        assert await refused(svc, None) == grpc.StatusCode.UNAVAILABLE
        assert await refused(svc, creds(pki, None, ca=pki.other.ca_file)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await svc.close()


async def test_expired_server_certificate_is_refused_by_clients(tmp_path: Path, pki: Pki) -> None:
    svc = await started(tmp_path, TlsConfig(pki.expired_server.cert, pki.expired_server.key))
    try:
        assert await refused(svc, creds(pki, None)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await svc.close()


async def test_rotated_certificate_files_are_served_to_new_connections(tmp_path: Path, pki: Pki) -> None:
    live = Pair(str(tmp_path / "live.pem"), str(tmp_path / "live.key"))
    shutil.copy(pki.server.cert, live.cert)
    shutil.copy(pki.server.key, live.key)
    svc = await started(tmp_path, TlsConfig(live.cert, live.key))
    try:
        trusting_new = creds(pki, None, ca=pki.other.ca_file)
        assert await refused(svc, trusting_new) == grpc.StatusCode.UNAVAILABLE
        rotated = pki.other.issue("server", server=True)  # a certificate from another CA replaces it
        shutil.copy(rotated.cert, live.cert)  # the certificate lands first: not a pair with the old key ...
        assert await svc.jobs(credentials=creds(pki, None)).list_jobs() == []  # ... so the old one is still served
        shutil.copy(rotated.key, live.key)
        assert await svc.jobs(credentials=trusting_new).list_jobs() == []
        assert await refused(svc, creds(pki, None)) == grpc.StatusCode.UNAVAILABLE  # the old CA's trust is gone
    finally:
        await svc.close()


async def test_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert_file"):
        TlsConfig(str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"))
