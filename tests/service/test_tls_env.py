"""The Python client's credentials from the environment alone (clients/python/paramserver_client/
credentials.py): PARAMSERVER_TOKEN, PARAMSERVER_TLS_CA, PARAMSERVER_TLS_CERT and PARAMSERVER_TLS_KEY
train a step through a service with mutual TLS and tokens, with no credential argument anywhere;
arguments win over the environment; an incomplete client certificate is a clear error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from paramserver.access import AuthConfig
from paramserver.tls import TlsConfig
from paramserver_client import AsyncJobClient, AsyncWorker, Credentials, JobClient, ServiceError, Worker
from paramserver_client.credentials import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TOKEN_ENV
from tests.certs import Authority, Pair
from tests.service.harness import NO_RETRY, TIMEOUT_S, InProcessService

pytestmark = pytest.mark.asyncio

ADMIN = "tls-env-admin-token-0123456789"
SHAPES = [("w", (4, 3))]
TOTAL = 12
ENV = (TOKEN_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)


@dataclass
class Pki:
    ca: Authority
    server: Pair
    client: Pair


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Authority(tmp_path, "env")
    return Pki(ca, ca.issue("server", server=True), ca.issue("client", server=False))


@pytest_asyncio.fixture
async def mtls(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[InProcessService]:
    """A service with tokens and mutual TLS on every port; the environment cleared of credentials."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    svc = InProcessService(tmp_path, auth=AuthConfig.single(ADMIN), tls=TlsConfig(pki.server.cert, pki.server.key, pki.ca.ca_file))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def set_env(monkeypatch: pytest.MonkeyPatch, pki: Pki, token: str = ADMIN, client: Pair | None = None) -> None:
    client = client or pki.client
    monkeypatch.setenv(TOKEN_ENV, token)
    monkeypatch.setenv(TLS_CA_ENV, pki.ca.ca_file)
    monkeypatch.setenv(TLS_CERT_ENV, client.cert)
    monkeypatch.setenv(TLS_KEY_ENV, client.key)


async def test_a_step_through_mutual_tls_with_credentials_from_the_environment_only(
    mtls: InProcessService, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, pki)
    assert Credentials.resolve() == Credentials(ADMIN, pki.ca.ca_file, pki.client.cert, pki.client.key)
    async with AsyncJobClient(mtls.address, timeout=TIMEOUT_S, retry=NO_RETRY) as jobs:  # no token, no TLS argument
        job = await jobs.create_job(SHAPES, job_id="env", num_workers=2, num_shards=2, optimizer="sgd", hyperparameters={"lr": 1.0})
    # one worker joins with the admin token of the environment (and gets the job's worker token back) ...
    first = mtls.adopt(await AsyncWorker.join(mtls.address, "env", "a", timeout=TIMEOUT_S, pull_timeout=TIMEOUT_S, retry=NO_RETRY))
    assert first.credentials.token.startswith("psj.env.") and first.credentials.tls_cert == pki.client.cert
    # ... the other with the job's worker token in PARAMSERVER_TOKEN
    monkeypatch.setenv(TOKEN_ENV, job.worker_token)
    second = mtls.adopt(await AsyncWorker.join(mtls.address, "env", "b", timeout=TIMEOUT_S, pull_timeout=TIMEOUT_S, retry=NO_RETRY))
    assert second.credentials == Credentials(job.worker_token, pki.ca.ca_file, pki.client.cert, pki.client.key)
    await first.upload(np.zeros(TOTAL, np.float32))
    await first.push(0, np.ones(TOTAL, np.float32), 1)
    await second.push(0, np.full(TOTAL, 3.0, np.float32), 1)
    for w in (first, second):
        version, params, _ = await w.pull(1)
        assert version == 1
        np.testing.assert_array_equal(params, np.full(TOTAL, -2.0, np.float32))  # lr 1 x (1 + 3) / 2 terms


async def test_the_blocking_clients_read_the_environment_too(mtls: InProcessService, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, pki)

    def train() -> np.ndarray:  # in a thread: the blocking clients run their own loops
        with JobClient(mtls.address, timeout=TIMEOUT_S, retry=NO_RETRY) as jobs:
            jobs.create_job(SHAPES, job_id="env-sync", num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 0.5})
        w = Worker(mtls.address, "env-sync", "w", timeout=TIMEOUT_S, pull_timeout=TIMEOUT_S, retry=NO_RETRY)
        try:
            w.upload(np.zeros(TOTAL, np.float32))
            w.push(0, np.ones(TOTAL, np.float32), 1)
            _, params, _ = w.pull(1)
            return params
        finally:
            w.close()

    np.testing.assert_array_equal(await asyncio.to_thread(train), np.full(TOTAL, -0.5, np.float32))


async def list_jobs_code(svc: InProcessService, **kwargs: object) -> grpc.StatusCode:
    """The status of a ListJobs through a client made with `kwargs` (and the environment)."""
    async with AsyncJobClient(svc.address, timeout=5, retry=NO_RETRY, **kwargs) as jobs:  # type: ignore[arg-type]
        try:
            await jobs.list_jobs()
        except ServiceError as err:
            return err.code
    return grpc.StatusCode.OK


async def test_the_environment_is_what_turns_tls_on_and_arguments_win(
    mtls: InProcessService, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, ADMIN)  # a token but no TLS files: plaintext, refused by the TLS port
    assert not Credentials.resolve().tls
    assert await list_jobs_code(mtls) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setenv(TLS_CA_ENV, pki.ca.ca_file)  # TLS, but no client certificate: refused under mTLS
    assert Credentials.resolve().tls
    assert await list_jobs_code(mtls) == grpc.StatusCode.UNAVAILABLE
    set_env(monkeypatch, pki)
    assert await list_jobs_code(mtls) == grpc.StatusCode.OK
    # an argument replaces its field only; the rest still comes from the environment
    assert await list_jobs_code(mtls, token="not-the-admin-token") == grpc.StatusCode.UNAUTHENTICATED
    assert Credentials.resolve(token="t", tls_ca="") == Credentials("t", "", pki.client.cert, pki.client.key)
    # explicit credentials replace the environment as a whole
    assert Credentials.resolve(Credentials("only")) == Credentials("only")
    assert await list_jobs_code(mtls, credentials=Credentials(ADMIN)) == grpc.StatusCode.UNAVAILABLE
    # a certificate without its key (or the reverse) is a clear error, not a failed handshake
    monkeypatch.delenv(TLS_KEY_ENV)
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Credentials.resolve()
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        AsyncJobClient(mtls.address)
    monkeypatch.setenv(TLS_KEY_ENV, pki.client.key)
    monkeypatch.setenv(TLS_CERT_ENV, "")  # empty is unset
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Credentials.resolve()
